"""`merlin-hstu train | evaluate --task ranking | ctr`: the one CLI for every task, run directories that round-trip
(saved model + config give back the trained model's metrics), presets per task, loop flags, errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from merlin_hstu.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

RANKING_SMALL = ["--set", "model.embedding_dim=8", "--set", "model.num_blocks=1", "--set", "model.num_heads=1",
                 "--set", "model.attention_dim=4", "--set", "model.linear_dim=4", "--set", "model.max_seq_len=16",
                 "--set", "model.multitask_hidden=8", "--set", "train.epochs=2", "--set", "train.batch_size=8",
                 "--no-progress"]


@pytest.fixture(scope="module")
def ranking_data(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_ranking_export import CONFIG, event_log

    from merlin_hstu.workflows import ranking_workflow as rw

    root = tmp_path_factory.mktemp("cli_ranking")
    return rw.preprocess_ranking(event_log(num_users=40), root / "data", CONFIG).output_dir


@pytest.fixture(scope="module")
def criteo_data(tmp_path_factory):
    from merlin_hstu.ctr.data import SyntheticCriteoConfig, generate_synthetic_criteo, write_criteo_tsv
    from merlin_hstu.workflows.criteo_workflow import CriteoWorkflowConfig, preprocess_criteo

    root = tmp_path_factory.mktemp("cli_ctr")
    frame = generate_synthetic_criteo(SyntheticCriteoConfig(num_rows=800, seed=4, max_cardinality=60)).frame
    src = write_criteo_tsv(frame, root / "day_0.tsv")
    return preprocess_criteo(src, root / "criteo", CriteoWorkflowConfig(freq_threshold=2, valid_fraction=0.25)).path


def test_train_and_evaluate_ranking_round_trip(ranking_data, tmp_path, capsys):
    from merlin_hstu.train.run_dir import load_run

    run_dir = tmp_path / "rank"
    assert main(["train", "--task", "ranking", "--data", str(ranking_data), "--output", str(run_dir),
                 "--kernel", "pytorch", *RANKING_SMALL]) == 0
    printed = capsys.readouterr().out
    assert "trained in" in printed and "on cpu (fp32)" in printed
    run_record = json.loads((run_dir / "run.json").read_text())
    assert run_record["task"] == "ranking" and run_record["model_type"] == "dlrm-hstu"
    assert run_record["data"] == str(Path(ranking_data).resolve()) and run_record["steps"] > 0
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["kernel"] == "pytorch" and config["model"]["embedding_dim"] == 8
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert main(["evaluate", "--run", str(run_dir), "--json", "--no-progress"]) == 0
    out = capsys.readouterr().out
    evaluated = json.loads(out[out.index("{"):])
    assert evaluated == saved["metrics"]  # the reloaded model scores exactly as the trained one did
    run = load_run(run_dir, expected_task="ranking")
    assert run.model.config.embedding_dim == 8 and not run.model.training
    with pytest.raises(ValueError, match="is a ranking run, not a ctr run"):
        load_run(run_dir, expected_task="ctr")
    assert not (tmp_path / "rank.incomplete").exists()
    # an existing run is never replaced silently
    capsys.readouterr()
    assert main(["train", "--task", "ranking", "--data", str(ranking_data), "--output", str(run_dir),
                 *RANKING_SMALL]) == 2
    assert "already holds a run; pass --overwrite" in capsys.readouterr().err
    assert json.loads((run_dir / "metrics.json").read_text()) == saved
    assert main(["train", "--task", "ranking", "--data", str(ranking_data), "--output", str(run_dir), "--overwrite",
                 *RANKING_SMALL]) == 0


def test_train_ranking_resume_continues_an_interrupted_run(ranking_data, tmp_path, capsys):
    """A run whose process stopped after some steps (checkpoints left in OUT.incomplete/) resumes to the same end."""
    from merlin_hstu.ranking.config import load_config
    from merlin_hstu.ranking.train import train_ranking
    from merlin_hstu.cli.train import fingerprint_of
    from merlin_hstu.train.run_dir import checkpoint_dir

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [*RANKING_SMALL, "--set", "train.epochs=3", "--checkpoint-every", "2"]
    assert main(["train", "--task", "ranking", "--data", str(ranking_data), "--output", str(full), *args]) == 0
    # interrupt a run after 3 steps the way the CLI would have left it (its fingerprint, its checkpoint directory)
    overrides = [a for a in args if a.startswith(("model.", "train."))] + ["train.checkpoint_every=2"]
    cfg = load_config("dlrm-hstu", overrides)
    dataset = cfg.data.load(ranking_data)
    torch.manual_seed(cfg.train.seed)
    train_ranking(cfg.build_model(dataset), dataset, cfg.train, progress=False,
                  checkpoint_dir=checkpoint_dir(resumed), stop_after_steps=3,
                  fingerprint=fingerprint_of(cfg.to_dict(), str(ranking_data)))
    assert main(["train", "--task", "ranking", "--data", str(ranking_data), "--output", str(resumed), *args,
                 "--resume"]) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, resumed))
    assert a["metrics"] == b["metrics"] and a["epoch_losses"] == b["epoch_losses"]
    assert json.loads((resumed / "run.json").read_text())["resumed_from"] == 2
    # without --resume, leftover checkpoints are discarded with a note, not silently reused
    train_ranking(cfg.build_model(dataset), dataset, cfg.train, progress=False,
                  checkpoint_dir=checkpoint_dir(tmp_path / "fresh"), stop_after_steps=2,
                  fingerprint=fingerprint_of(cfg.to_dict(), str(ranking_data)))
    capsys.readouterr()
    assert main(["train", "--task", "ranking", "--data", str(ranking_data), "--output", str(tmp_path / "fresh"),
                 *args]) == 0
    assert "discarding the unfinished run" in capsys.readouterr().out
    assert json.loads((tmp_path / "fresh" / "run.json").read_text())["resumed_from"] is None


def test_train_and_evaluate_ctr_round_trip_in_bf16(criteo_data, tmp_path, capsys):
    run_dir = tmp_path / "ctr"
    assert main(["train", "--task", "ctr", "--data", str(criteo_data), "--output", str(run_dir), "--config", "dlrm",
                 "--precision", "bf16", "--set", "model.embedding_dim=4", "--set", "train.epochs=2",
                 "--no-progress"]) == 0
    assert "on cpu (bf16)" in capsys.readouterr().out
    record = json.loads((run_dir / "run.json").read_text())
    assert (record["task"], record["model_type"], record["precision"]) == ("ctr", "dlrm", "bf16")
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 < saved["metrics"]["auc"] < 1.0 and saved["epoch_losses"][1] < saved["epoch_losses"][0]
    assert main(["evaluate", "--run", str(run_dir), "--task", "ctr", "--json"]) == 0
    out = capsys.readouterr().out
    evaluated = json.loads(out[out.index("{"):])
    # evaluation runs in fp32: equal to the in-training (bf16-trained, fp32-evaluated) numbers
    assert evaluated == pytest.approx(saved["metrics"], abs=1e-6)


def test_train_errors_name_the_problem(criteo_data, ranking_data, tmp_path, capsys):
    base = ["train", "--task", "ctr", "--data", str(criteo_data), "--output", str(tmp_path / "x"), "--no-progress"]
    assert main([*base, "--kernel", "triton"]) == 2
    assert "has no HSTU attention" in capsys.readouterr().err
    assert main([*base, "--set", "train.colour=red"]) == 2
    assert "unknown train key(s) ['colour']" in capsys.readouterr().err
    assert main([*base, "--set", "model.type=gbdt"]) == 2
    assert "unknown model.type 'gbdt'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--device", "cuda"]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
    assert main(["train", "--task", "ranking", "--data", str(ranking_data), "--output", str(tmp_path / "y"),
                 "--set", "model.depth=3", "--no-progress"]) == 2
    assert "unknown dlrm-hstu (DlrmHSTUConfig) option(s) ['depth']" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_presets_of_every_task_are_listed_and_load(capsys):
    from merlin_hstu.ctr.config import load_config as ctr_config
    from merlin_hstu.ranking.config import load_config as ranking_config

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("retrieval:", "ranking:", "ctr:", "hstu-large-ml1m", "dlrm-hstu", "dlrm-baseline", "wukong",
                 "logreg"):
        assert name in out
    assert ranking_config("dlrm-hstu-wukong").model["interaction"] == "wukong"
    assert ctr_config("wukong", ["model.num_layers=3"]).model["num_layers"] == 3
    with pytest.raises(ValueError, match="unknown preset 'nope' of task 'ranking'"):
        ranking_config("nope")
