"""`merlin-hstu bench ab` (merlin_hstu/bench/ab.py): each version's timing process runs that version's code (a
package farm of symlinks ahead of the editable install), and the command prints both versions and their ratios."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from merlin_hstu.bench.ab import package_farm
from merlin_hstu.cli.main import main

REPO = Path(__file__).resolve().parents[1]


def test_package_farm_maps_the_tree_as_the_installed_package(tmp_path):
    farm = package_farm(REPO, tmp_path / "farm")
    assert (farm / "merlin_hstu" / "kernels" / "attention_ops.py").resolve() == REPO / "kernels" / "attention_ops.py"
    assert (farm / "merlin_hstu" / "workflows").resolve() == REPO / "workflows"
    probe = "import merlin_hstu.kernels.dispatch as d, merlin_hstu; print(merlin_hstu.__file__, d.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=farm, env={"PYTHONPATH": str(farm), "PATH": ""},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0].startswith(str(farm)) and Path(out[1]).resolve() == REPO / "kernels" / "dispatch.py"


def test_bench_ab_times_two_versions_and_prints_ratios(tmp_path, capsys):
    from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log

    log = tmp_path / "ev.parquet"
    generate_event_log(SyntheticConfig(num_users=60, num_items=90, min_events=4, max_events=20, seed=1)).to_parquet(log)
    assert main(["preprocess", "--input", str(log), "--output", str(tmp_path / "data"), "--max-history", "16"]) == 0
    capsys.readouterr()
    small = ["--set", "data.max_history=16", "--set", "model.max_seq_len=17", "--set", "model.embedding_dim=16",
             "--set", "model.attention_dim=8", "--set", "model.linear_dim=8", "--set", "train.batch_size=32"]
    assert main(["bench", "ab", "--base", "HEAD", "--model", "demo", "--dataset", str(tmp_path / "data"),
                 "--steps", "2", "--warmup", "1", "--rounds", "1", "--threads", "1", "--json",
                 str(tmp_path / "ab.json"), *small]) == 0
    out = capsys.readouterr().out
    assert "| base (HEAD) |" in out and "| head (working tree) |" in out and "ratios head / base" in out
    record = json.loads((tmp_path / "ab.json").read_text())
    assert set(record["ratios"]) >= {"s_per_step", "cpu_s_per_step", "peak_rss_gb"}
    assert record["summary"]["base"]["losses"][0] > 0 and len(record["summary"]["head"]["losses"]) == 2
    # first-step gradients compared tensor by tensor (this change touches no training math: equal to rounding)
    grads = record["first_step_gradients"]
    assert grads["tensors"] >= 5 and grads["only_in_one"] == [] and grads["max_relative"] < 1e-5
    assert "first-step gradients: max relative difference" in out
    # the temporary worktree is gone
    listed = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True).stdout
    assert "merlin-hstu-ab-" not in listed


def test_bench_ab_head_only_settings_time_bf16_against_fp32(tmp_path, capsys):
    """--head-set applies to one side only: bf16 autocast on the head changes its first loss (the probe runs the
    forward under the loop's precision context), by bf16 rounding only."""
    from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log

    log = tmp_path / "ev.parquet"
    generate_event_log(SyntheticConfig(num_users=60, num_items=90, min_events=4, max_events=20, seed=1)).to_parquet(log)
    assert main(["preprocess", "--input", str(log), "--output", str(tmp_path / "data"), "--max-history", "16"]) == 0
    small = ["--set", "data.max_history=16", "--set", "model.max_seq_len=17", "--set", "model.embedding_dim=16",
             "--set", "model.attention_dim=8", "--set", "model.linear_dim=8", "--set", "train.batch_size=32"]
    assert main(["bench", "ab", "--base", "HEAD", "--head", "HEAD", "--model", "demo", "--dataset",
                 str(tmp_path / "data"), "--steps", "1", "--warmup", "0", "--rounds", "1", "--threads", "1",
                 "--no-eval", "--head-set", "train.precision=bf16", "--json", str(tmp_path / "ab.json"), *small]) == 0
    assert "head only: --set train.precision=bf16" in capsys.readouterr().out
    record = json.loads((tmp_path / "ab.json").read_text())
    assert record["specs"]["head"]["overrides"][-1] == "train.precision=bf16"
    assert "train.precision=bf16" not in record["specs"]["base"]["overrides"]
    fp32, bf16 = record["summary"]["base"]["first_loss"], record["summary"]["head"]["first_loss"]
    assert fp32 != bf16 and abs(bf16 - fp32) / fp32 < 0.02
    assert 1e-6 < record["first_step_gradients"]["max_relative"] < 0.5  # bf16 rounding shows in the gradients
