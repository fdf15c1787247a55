"""The `merlin-hstu` CLI end to end: help, preprocess -> train -> evaluate, demo, errors."""
import json

import pandas as pd
import pytest

from merlin_hstu.cli.main import build_parser, main
from merlin_hstu.retrieval.config import load_config, preset_names
from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log

SMALL = ["--set", "train.epochs=2", "--set", "data.max_history=20", "--set", "model.max_seq_len=31",
         "--set", "model.embedding_dim=16", "--set", "model.attention_dim=8", "--set", "model.linear_dim=8"]


@pytest.mark.parametrize("command", ["preprocess", "train", "evaluate", "demo", "presets"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"merlin-hstu {command}" in text
    if command != "presets":
        assert "--" in text and len(text.splitlines()) > 5


def test_top_level_help_lists_subcommands():
    text = build_parser().format_help()
    for command in ("preprocess", "train", "evaluate", "demo", "presets"):
        assert command in text


def test_presets_load_and_are_listed(capsys):
    assert {"demo", "hstu-ml1m", "hstu-large-ml1m", "sasrec-ml1m", "hstu-books", "sasrec-ml20m"} <= set(preset_names())
    large = load_config("hstu-large-ml1m")
    assert (large.model.num_blocks, large.model.num_heads, large.model.attention_dim, large.model.max_seq_len) == (8, 2, 25, 211)
    assert main(["presets"]) == 0
    assert "hstu-large-ml1m" in capsys.readouterr().out


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="epochz"):
        load_config("demo", ["train.epochz=3"])
    with pytest.raises(ValueError, match="max_seq_len"):
        load_config("demo", ["data.max_history=100"])
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("nope")


@pytest.fixture(scope="module")
def small_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("log") / "events.csv"
    generate_event_log(SyntheticConfig(num_users=150, num_items=120, seed=3)).to_csv(path, index=False)
    return path


def test_preprocess_train_evaluate(small_log, tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["preprocess", "--input", str(small_log), "--output", str(data), "--max-history", "20"]) == 0
    assert (data / "processed" / "schema.pbtxt").is_file() and (data / "workflow").is_dir()
    assert main(["preprocess", "--input", str(small_log), "--output", str(data)]) == 2  # exists, no --overwrite
    assert "overwrite" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--output", str(run), "--no-progress", *SMALL]) == 0
    record = json.loads((run / "metrics.json").read_text())
    assert set(record["metrics"]) == {"HSTU", "most-popular"}
    assert len(record["epoch_losses"]) == 2
    assert (run / "training_curves.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--json", "--no-progress"]) == 0
    out = capsys.readouterr().out
    evaluated = json.loads(out[out.index("{"):])
    assert evaluated["HSTU"] == pytest.approx(record["metrics"]["HSTU"])  # train-time eval == reloaded eval


def test_bad_event_log_exits_2_and_names_the_column(small_log, tmp_path, capsys):
    df = pd.read_csv(small_log).drop(columns=["timestamp"])
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    assert main(["preprocess", "--input", str(bad), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "timestamp" in err and "error:" in err
    assert not (tmp_path / "out").exists()


def test_no_timestamp_column_switches_time_bias_off(small_log, tmp_path, capsys):
    assert main(["demo", "--data", str(small_log), "--timestamp-column", "none", "--output", str(tmp_path / "d"),
                 "--no-progress", "--no-serve", *SMALL]) == 0
    assert "time bias is switched off" in capsys.readouterr().out
    assert load_config(tmp_path / "d" / "run" / "config.yaml").model.time_bias is False


def test_demo_meets_its_acceptance_bar(tmp_path, capsys):
    """The `make demo` job itself (default config, embedded dataset): HSTU HR@10 >= 2x most-popular."""
    assert main(["demo", "--output", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "demo" / "run" / "metrics.json").read_text())["metrics"]
    assert metrics["HSTU"]["hr@10"] >= 2 * metrics["most-popular"]["hr@10"]
    assert out.count("top-10") >= 3 and "[5/6]" in out and "[6/6]" in out
    # recommendations are printed as raw item ids (the synthetic catalogue starts at 100000)
    rec_line = next(line for line in out.splitlines() if "-> top-10" in line)
    assert all(int(x) >= 100_000 for x in rec_line.split("top-10 [")[1].rstrip("]").split(", "))


def test_dataset_choices_match_the_registry():
    from merlin_hstu.cli.main import _dataset_names
    from merlin_hstu.workflows.datasets import dataset_names

    assert _dataset_names() == dataset_names()


def test_preprocess_named_dataset_and_bench_smoke(tmp_path, shared_data, capsys):
    """`preprocess --dataset ml-100k` on the staged copy, then a 2-step bench run writing its JSON/markdown/PNG."""
    out = tmp_path / "ml100k"
    assert main(["preprocess", "--dataset", "ml-100k", "--output", str(out)]) == 0
    assert (out / "candidates.parquet").is_file()
    bench_out = tmp_path / "bench"
    assert main(["bench", "--dataset", str(out), "--model", "hstu-ml1m", "--epochs", "1", "--max-steps", "2",
                 "--output", str(bench_out), "--no-progress", "--set", "train.eval_batch_size=512"]) == 0
    record = json.loads((bench_out / "bench.json").read_text())
    assert record["runs"][0]["steps"] == 2
    assert record["timing"]["seconds_per_step"] > 0 and record["timing"]["peak_rss_gb"] > 0
    assert set(record["mean"]) >= {"hr@10", "ndcg@10", "hr@50", "mrr"}
    assert (bench_out / "bench.png").stat().st_size > 1000
    markdown = (bench_out / "bench.md").read_text()
    assert "seconds per training step" in markdown
    # the recorded command reproduces the run, overrides included
    assert "--max-steps 2 --set train.eval_batch_size=512`" in markdown
    assert "### hstu-ml1m" in capsys.readouterr().out
    # `bench compare` reads the record back: one table row with its numbers, and the per-epoch figure
    assert main(["bench", "compare", str(bench_out), "--output", str(tmp_path / "cmp.png"),
                 "--markdown", str(tmp_path / "cmp.md")]) == 0
    row = (tmp_path / "cmp.md").read_text().splitlines()[2].split(" | ")
    assert row[0] == "| hstu-ml1m" and row[2:4] == ["1", "1"]
    assert float(row[4]) == pytest.approx(record["mean"]["hr@10"], abs=5e-5)
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    (tmp_path / "bad.json").write_text("{}")
    assert main(["bench", "compare", str(tmp_path / "bad.json")]) == 2
    assert "is not a retrieval bench record" in capsys.readouterr().err


def test_help_imports_nothing_heavy():
    """`merlin-hstu [COMMAND] --help` must not import torch / NVTabular / T4R / pandas (seconds each); the probe
    builds the real parser in a fresh interpreter.  Timing lives in `merlin-hstu bench cli`, not here."""
    from merlin_hstu.cli.help_speed import heavy_imports, subcommands

    commands = subcommands()
    assert {"train", "export", "serve", "query", "bench", "preprocess-ranking"} <= set(commands)
    for command in [None, "train", "bench", "serve"]:
        assert heavy_imports(command) == [], command


def test_lazy_kernel_exports_are_the_functions_whatever_was_imported_first():
    """The kernels package resolves its exports lazily; no export may be shadowed by a submodule of the same
    name (importing a submodule sets it as a package attribute), whichever import order a process takes."""
    import subprocess
    import sys

    probe = (
        "import importlib, pkgutil, types, merlin_hstu.kernels as k\n"
        "for m in pkgutil.iter_modules(k.__path__):\n"
        "    if m.name != 'triton_hstu_attention': importlib.import_module('merlin_hstu.kernels.' + m.name)\n"
        "bad = [n for n in k.__all__ if isinstance(getattr(k, n), types.ModuleType)]\n"
        "print('BAD', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "BAD []", out


def test_user_data_epochs_come_from_early_stopping(small_log, tmp_path, capsys):
    """A user's own log without --config or --set train.epochs: at most USER_DATA_MAX_EPOCHS, early stopping on
    every user's second-to-last event, the best epoch's weights kept; an explicit epoch count turns it off."""
    from merlin_hstu.cli.main import USER_DATA_MAX_EPOCHS, USER_DATA_PATIENCE

    sizes = [*SMALL[2:], "--set", "train.learning_rate=0.02"]  # no train.epochs; converges within ~10 epochs
    assert main(["demo", "--data", str(small_log), "--output", str(tmp_path / "d"), "--no-progress", "--no-serve",
                 *sizes]) == 0
    out = capsys.readouterr().out
    assert "epochs from the data" in out and "early stopping:" in out
    cfg = load_config(tmp_path / "d" / "run" / "config.yaml")
    assert (cfg.train.epochs, cfg.train.validation_fraction, cfg.train.early_stopping_patience) == \
        (USER_DATA_MAX_EPOCHS, 1.0, USER_DATA_PATIENCE)
    run = json.loads((tmp_path / "d" / "run" / "run.json").read_text())
    losses = json.loads((tmp_path / "d" / "run" / "metrics.json").read_text())["epoch_losses"]
    assert run["stopped_early"] and len(losses) < USER_DATA_MAX_EPOCHS
    assert len(losses) - run["best_epoch"] == USER_DATA_PATIENCE  # stopped PATIENCE epochs after the best one

    data = tmp_path / "d" / "dataset"
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "fixed"), "--no-progress", *SMALL]) == 0
    assert "epochs from the data" not in capsys.readouterr().out
    fixed = load_config(tmp_path / "fixed" / "config.yaml")
    assert (fixed.train.epochs, fixed.train.validation_fraction, fixed.train.early_stopping_patience) == (2, 0.0, 0)
