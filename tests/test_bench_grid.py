"""`merlin-hstu bench grid` (merlin_hstu/bench/grid.py): the rows differ only in encoder / loss / event-type input,
the eval loss is the plain full-catalogue cross-entropy, the best row by NDCG@10 is marked, and a dataset without
event types gets n/a for the action rows."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from merlin_hstu.bench.grid import eval_loss, experiment_config, grid_configs
from merlin_hstu.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
TINY = ["--epochs", "1", "--dim", "16", "--blocks", "1", "--heads", "1", "--max-history", "12", "--no-progress"]


def args(**kw):
    base = dict(max_history=12, epochs=1, batch_size=64, num_negatives=16, threads=0, dim=16, blocks=1, heads=2,
                overrides=[])
    base.update(kw)
    return argparse.Namespace(**base)


def test_grid_rows_differ_only_in_encoder_loss_and_actions():
    from merlin_hstu.encoders.sasrec import SASRecEncoderConfig

    rows = {r.name: r for r in grid_configs()}
    assert len(rows) == 9 and {"sasrec-full", "hstu-sampled+actions", "sasrec-gpt-sampled"} <= set(rows)
    cfgs = {name: experiment_config(row, args()) for name, row in rows.items()}
    for name, cfg in cfgs.items():
        assert cfg.data.max_history == 12 and cfg.model.embedding_dim == 16 and cfg.model.num_blocks == 1
        assert cfg.model.num_heads == 2 and cfg.model.max_seq_len == 13 and cfg.train.ks == (5, 10, 50)
        assert cfg.train.loss == rows[name].loss and cfg.inputs.actions == rows[name].actions
        assert isinstance(cfg.model, SASRecEncoderConfig) == name.startswith("sasrec")
        assert (cfg.train.learning_rate, cfg.train.batch_size, cfg.train.num_negatives) == (1e-3, 64, 16)
    assert cfgs["sasrec-gpt-sampled"].model.activation == "gelu" and cfgs["sasrec-sampled"].model.activation == "relu"
    assert cfgs["hstu-full+actions"].inputs.action_embedding_dim == 2


def test_gelu_sasrec_differs_from_relu_only_in_the_feed_forward():
    from merlin_hstu.encoders.sasrec import PointwiseFeedForward, SASRecEncoderConfig

    torch.manual_seed(0)
    relu, gelu = PointwiseFeedForward(8, 8, 0.0), PointwiseFeedForward(8, 8, 0.0, "gelu")
    gelu.load_state_dict(relu.state_dict())
    z = torch.randn(2, 5, 8)
    hidden = torch.nn.functional.conv1d(z.transpose(1, 2), relu.conv1.weight, relu.conv1.bias)
    want = z + torch.nn.functional.conv1d(0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2))), relu.conv2.weight,
                                          relu.conv2.bias).transpose(1, 2)
    torch.testing.assert_close(gelu(z), want, rtol=1e-5, atol=1e-6)
    assert "activation" not in SASRecEncoderConfig().to_dict()  # ReLU configs keep their saved keys
    assert SASRecEncoderConfig(activation="gelu").to_dict()["activation"] == "gelu"
    with pytest.raises(ValueError, match="model.activation"):
        SASRecEncoderConfig(activation="swish")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log

    root = tmp_path_factory.mktemp("grid")
    events = generate_event_log(SyntheticConfig(num_users=120, num_items=90, min_events=4, max_events=25, seed=1))
    events.to_parquet(root / "ev.parquet")
    events.drop(columns=["action"]).to_parquet(root / "ev_plain.parquet")
    for name, log in (("data", "ev.parquet"), ("plain", "ev_plain.parquet")):
        extra = ["--action-column", "none"] if name == "plain" else []
        assert main(["preprocess", "--input", str(root / log), "--output", str(root / name), "--max-history", "12",
                     *extra]) == 0
    return root


def test_eval_loss_is_the_plain_full_catalogue_cross_entropy(datasets):
    from merlin_hstu.retrieval.data import LeaveOneOut, load_processed
    from merlin_hstu.retrieval.train import build_model

    cfg = experiment_config(grid_configs()[6], args())  # hstu-sampled
    table = load_processed(datasets / "data")
    torch.manual_seed(3)
    model = build_model(table, cfg).eval()
    split = LeaveOneOut(table, max_history=12)
    got = eval_loss(model, split, cfg)
    total, n = 0.0, 0
    invalid = set(int(i) for i in table.non_candidate_ids)
    with torch.no_grad():
        for batch in split.batches(split.eval, 1000):
            scores = model.score_all_items(batch["ids"], batch["lengths"], batch.get("timestamps")).double()
            for b in range(scores.shape[0]):
                row = [float(scores[b, v]) / cfg.train.temperature for v in range(table.num_items) if v not in invalid]
                top = max(row)
                log_z = top + math.log(sum(math.exp(x - top) for x in row))
                total += log_z - float(scores[b, batch["targets"][b]]) / cfg.train.temperature
                n += 1
    assert n == len(split.eval.lengths) and got == pytest.approx(total / n, rel=1e-6)  # fp32 scores


def test_grid_command_marks_the_best_and_skips_action_rows_without_event_types(datasets, tmp_path, capsys):
    configs = "hstu-sampled,hstu-sampled+actions,sasrec-gpt-sampled"
    assert main(["bench", "grid", "--dataset", str(datasets / "data"), "--configs", configs, "--output",
                 str(tmp_path / "a"), *TINY]) == 0
    record = json.loads((tmp_path / "a" / "grid.json").read_text())
    results = record["results"]
    assert list(results) == configs.split(",") and all(r is not None for r in results.values())
    best = max(results, key=lambda n: results[n]["mean"]["ndcg@10"])
    assert f"**{best}** (best NDCG@10)" in record["markdown"] and "| most-popular |" in record["markdown"]
    for r in results.values():
        assert set(r["mean"]) == {"ndcg@5", "ndcg@10", "ndcg@50", "hr@5", "hr@10", "hr@50", "mrr", "eval_loss"}
        assert 0 <= r["mean"]["ndcg@10"] <= r["mean"]["hr@10"] <= 1 and r["mean"]["eval_loss"] > 0
    assert (tmp_path / "a" / "grid.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["bench", "grid", "--dataset", str(datasets / "plain"), "--configs", "hstu-sampled,hstu-sampled+actions",
                 "--output", str(tmp_path / "b"), *TINY]) == 0
    out = capsys.readouterr().out
    assert "event types absent" in out and "| hstu-sampled+actions | n/a |" in out
    assert main(["bench", "grid", "--dataset", str(datasets / "data"), "--configs", "gru4rec", *TINY]) == 2
    assert "unknown ['gru4rec']" in capsys.readouterr().err
