"""`tr.Trainer` and the native loop compute the same training (issue 14, "Numbers").

The T4R HSTU retrieval model of `retrieval_model_from_schema` (default input stack "native": E * sqrt(D), the native
item-table init) is trained by `tr.Trainer` with the arguments `merlin-hstu bench t4r-vs-native` gives it, on our
session workflow's leave-one-out rows, through T4R's Merlin loader. Every batch the Trainer feeds the model is
recorded, and the native model (`HSTURetrievalModel` with the same initial weights, its own loss
`next_item_training_loss` and optimizer `make_retrieval_optimizer`) replays those batches. Dropout is 0 and the loss
is the full softmax, so both sides are deterministic: the losses must agree step by step and the weights at the end.

Tolerance: the two sides run the same float32 operations in a different order (T4R pads to H + 1 and removes the
padding positions with its own gather; the native batch is as wide as its longest row), so they differ by float32
rounding; Adam divides by sqrt(v) and can amplify that in the smallest gradients. Over the 14 steps here the
measured gap is 2e-7 relative (losses) and 6e-8 absolute (weights); the tolerances, 1e-5, leave 50x / 160x room
for other BLAS builds. Any real difference (no sqrt(D) scale, another init, a dropped batch, a shifted label,
another lr or schedule) moves the loss by far more: T4R's stock input stack, with the same weights, is 1.6e-2 off at
the first step (second test); without the scale the initial loss is 7.9 instead of 12.3 (docs/t4r.md).
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import transformers4rec.torch as tr

from merlin_hstu.bench.t4r_vs_native import training_arguments
from merlin_hstu.common import schema as roles
from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log
from merlin_hstu.retrieval.config import load_config
from merlin_hstu.retrieval.data import LeaveOneOut, load_processed
from merlin_hstu.retrieval.model import next_item_training_loss
from merlin_hstu.retrieval.train import build_model, make_retrieval_optimizer
from merlin_hstu.t4r.data import parquet_files, retrieval_trainer_splits
from merlin_hstu.t4r.retrieval import GenerativeRetrievalTask, retrieval_model_from_schema
from merlin_hstu.workflows.session_workflow import SessionWorkflowConfig, preprocess

H = 12
OVERRIDES = [f"data.max_history={H}", "model.embedding_dim=16", "model.num_blocks=1", "model.num_heads=1",
             "model.attention_dim=16", "model.linear_dim=16", f"model.max_seq_len={H + 1}", "model.linear_dropout=0",
             "model.kernel=pytorch", "train.input_dropout=0", "train.loss=full_softmax", "train.batch_size=32",
             "train.learning_rate=0.003", "train.epochs=2", "train.seed=5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    log = generate_event_log(SyntheticConfig(num_users=200, num_items=80, min_events=4, max_events=18, seed=11))
    processed = preprocess(log, root / "workflow", SessionWorkflowConfig(max_length=H + 2, min_length=3))
    splits = retrieval_trainer_splits(root / "workflow", root / "splits", max_history=H)
    return processed, splits


def t4r_parts(model):
    body = model.heads[0].body
    return body[0], body[1].transformer


def native_weights_from(model, item_column: str) -> dict:
    """The native model's state dict taken from a T4R retrieval model (same tensors, native names)."""
    inputs, hstu = t4r_parts(model)
    weights = {"item_embedding.weight": inputs.to_merge["categorical_module"].embedding_tables[item_column].weight,
               "position_embedding.weight": hstu.position_embeddings.weight}
    weights.update({f"encoder.{k}": v for k, v in hstu.encoder.state_dict().items()})
    return {k: v.detach().clone() for k, v in weights.items()}


def train_with_trainer(cfg, processed, splits, tmp_path, input_stack="native"):
    """(model's initial native weights, recorded batches, per-step losses, trainer, model) of a tr.Trainer run."""
    item, stamps = roles.item_list_column(processed.schema), roles.timestamp_list_column(processed.schema)
    torch.manual_seed(cfg.train.seed)
    task = GenerativeRetrievalTask.from_configs(cfg.train.loss_config(), cfg.head)
    model = retrieval_model_from_schema(processed.schema, cfg.model, splits.max_sequence_length, task=task,
                                        input_dropout=cfg.train.input_dropout, input_stack=input_stack)
    initial = native_weights_from(model, item)
    batches, losses = [], []
    inputs, _ = t4r_parts(model)

    def record_batch(module, args, kwargs):
        if kwargs.get("training"):
            batch = args[0] if args else kwargs["inputs"]
            batches.append({"ids": batch[item].detach().clone(), "timestamps": batch[stamps].detach().clone()})

    def record_loss(module, args, kwargs, output):
        if kwargs.get("training"):
            losses.append(float(output["loss"]))

    inputs.register_forward_pre_hook(record_batch, with_kwargs=True)
    model.register_forward_hook(record_loss, with_kwargs=True)
    trainer = tr.Trainer(model=model, args=training_arguments(cfg, tmp_path / "trainer", splits.max_sequence_length),
                         schema=splits.schema, train_dataset_or_path=parquet_files(splits.train))
    trainer.train()
    return initial, batches, losses, trainer, model


def replay_natively(cfg, table, initial: dict, batches: list) -> tuple:
    """The native model from `initial`, trained by the native optimizer on `batches`: (losses, final weights)."""
    torch.manual_seed(0)
    native = build_model(table, cfg)
    assert set(native.state_dict()) == set(initial)  # every native parameter comes from the T4R model
    native.load_state_dict(initial)
    native.train()
    optimizer = make_retrieval_optimizer(cfg)(native)
    pool = table.candidate_ids
    losses = []
    for recorded in batches:
        ids = recorded["ids"]
        batch = {"ids": ids, "lengths": (ids != 0).sum(1) - 1, "timestamps": recorded["timestamps"]}  # history + target
        optimizer.zero_grad()
        loss = next_item_training_loss(native, batch, pool, cfg.train.loss_config())
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses, {k: v.detach().clone() for k, v in native.state_dict().items()}


def test_trainer_and_native_loop_train_the_same_model(data, tmp_path, one_thread):
    processed, splits = data
    cfg = load_config("demo", OVERRIDES)
    table = load_processed(processed.path)
    split = LeaveOneOut(table, max_history=H)
    n_train = len(split.train.lengths)
    initial, batches, t4r_losses, trainer, model = train_with_trainer(cfg, processed, splits, tmp_path)

    # the number of optimizer steps: every epoch is ceil(n / batch) steps, the last batch kept
    steps_per_epoch = math.ceil(n_train / cfg.train.batch_size)
    assert trainer.state.global_step == len(batches) == len(t4r_losses) == cfg.train.epochs * steps_per_epoch
    # every epoch shows each native train sample exactly once, right-padded to H + 1 (the history + the target)
    def rows(chunk):
        return Counter(tuple(r[r != 0].tolist()) for b in chunk for r in b["ids"])
    native_rows = Counter(tuple(split.train.ids[i, :n + 1].tolist()) for i, n in enumerate(split.train.lengths))
    for epoch in range(cfg.train.epochs):
        chunk = batches[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]
        assert rows(chunk) == native_rows
        for b in chunk:
            assert b["ids"].shape[1] == H + 1
            real = b["ids"] != 0
            assert torch.equal(real, torch.arange(H + 1) < real.sum(1, keepdim=True))  # padding on the right

    native_losses, native_final = replay_natively(cfg, table, initial, batches)
    assert t4r_losses[0] == pytest.approx(native_losses[0], rel=1e-5)
    assert t4r_losses == pytest.approx(native_losses, rel=1e-5)
    assert t4r_losses[-1] < t4r_losses[0] - 0.5  # it trained (so the comparison is not of two frozen models)
    trained = native_weights_from(model, roles.item_list_column(processed.schema))
    for name, weight in native_final.items():
        torch.testing.assert_close(trained[name], weight, rtol=1e-5, atol=1e-5, msg=name)


def test_trainer_and_native_loop_agree_without_history_negatives(data, tmp_path, one_thread):
    """train.history_negatives=false reaches the T4R task through `from_configs`: the Trainer's losses equal the
    native loop's with the same option, and differ from the native loss that keeps seen items as negatives."""
    processed, splits = data
    cfg = load_config("demo", OVERRIDES + ["train.history_negatives=false", "train.epochs=1", "train.max_steps=4"])
    table = load_processed(processed.path)
    initial, batches, t4r_losses, _, _ = train_with_trainer(cfg, processed, splits, tmp_path)
    assert len(t4r_losses) == 4
    native_losses, _ = replay_natively(cfg, table, initial, batches)
    assert t4r_losses == pytest.approx(native_losses, rel=1e-5)
    with_history = load_config("demo", OVERRIDES + ["train.epochs=1", "train.max_steps=4"])
    unmasked_losses, _ = replay_natively(with_history, table, initial, batches[:1])
    assert t4r_losses[0] < unmasked_losses[0] - 1e-3  # seen items left the first step's softmax


def test_t4r_stock_input_stack_is_a_different_model(data, tmp_path, one_thread):
    """input_stack="t4r" (T4R's unscaled embeddings, its N(0, 0.05) init) stays available and is not the native
    model: with its own weights copied into the native model, the first losses differ (the sqrt(D) scale)."""
    processed, splits = data
    cfg = load_config("demo", OVERRIDES + ["train.epochs=1", "train.max_steps=2"])
    table = load_processed(processed.path)
    initial, batches, t4r_losses, _, model = train_with_trainer(cfg, processed, splits, tmp_path, input_stack="t4r")
    assert t4r_parts(model)[1].config.input_scale == "none"
    assert initial["item_embedding.weight"][1:].std() == pytest.approx(0.05, rel=0.15)  # T4R's init
    native_losses, _ = replay_natively(cfg, table, initial, batches)
    assert abs(t4r_losses[0] - native_losses[0]) > 1e-3 * abs(native_losses[0])  # 1e4 x the parity gap


def test_input_scale_is_saved_and_older_configs_load_unscaled(tmp_path):
    """input_scale round-trips through save_pretrained; a config.json written before the field existed loads as
    "none" (the model it was trained as); the scale multiplies the inputs exactly; a bad value is named."""
    import json

    import transformers

    from merlin_hstu.t4r.encoders import HSTUConfig, HSTUModel

    torch.manual_seed(0)
    model = HSTUModel(HSTUConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                                 max_position_embeddings=8, dropout=0.0)).eval()
    assert model.config.input_scale == "sqrt_d"
    model.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["input_scale"] == "sqrt_d"
    assert transformers.AutoConfig.from_pretrained(tmp_path / "new").input_scale == "sqrt_d"
    old = json.loads((tmp_path / "new" / "config.json").read_text())
    del old["input_scale"]
    model.save_pretrained(tmp_path / "old")
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    legacy = transformers.AutoModel.from_pretrained(tmp_path / "old").eval()
    assert legacy.config.input_scale == "none"
    x, lengths = torch.randn(2, 5, 16), torch.tensor([5, 3])
    with torch.no_grad():
        torch.testing.assert_close(model(x, lengths=lengths)[0], legacy(x * 4.0, lengths=lengths)[0])
    with pytest.raises(ValueError, match=r"HSTUConfig.input_scale must be one of \('sqrt_d', 'none'\).*'sqrt'"):
        HSTUConfig(input_scale="sqrt")
