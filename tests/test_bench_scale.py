"""`merlin-hstu bench scale` and the 1B-user plan (merlin_hstu/bench/scale.py): the plan's arithmetic against
hand-computed values (and the parameter count against a real STU stack and the reference's measured HSTU-large
count), and the command at tiny sizes: every printed figure parses and is positive, and the sharded table bytes
are exactly rows x dim x 4 / ranks."""
from __future__ import annotations

import json
import re

import pytest

from merlin_hstu.bench.scale import (
    PlanInputs,
    activation_bytes,
    dense_parameters,
    flops_per_token,
    format_plan,
    plan,
)


def by_name(rows):
    return {r["name"]: r for r in rows}


def test_dense_parameters_count_a_real_stu_stack_and_the_reference():
    from merlin_hstu.encoders.stu import HSTUEncoderConfig, STUStack

    for kw in ({"embedding_dim": 16, "num_blocks": 3, "num_heads": 2, "attention_dim": 4, "linear_dim": 6,
                "max_seq_len": 20, "num_time_buckets": 7},
               {"embedding_dim": 8, "num_blocks": 1, "num_heads": 1, "attention_dim": 8, "linear_dim": 8,
                "max_seq_len": 5, "time_bias": False}):
        stack = STUStack(HSTUEncoderConfig(**kw))
        c = stack.config
        assert dense_parameters(c.embedding_dim, c.num_blocks, c.num_heads, c.attention_dim, c.linear_dim,
                                c.max_seq_len, c.num_time_buckets, time_bias=c.time_bias) == \
            sum(p.numel() for p in stack.parameters())
    # reference-hstu.md: ML-1M HSTU-large (D 50, 8 blocks, 2 heads of 25, N 211) has 313,000 parameters, of which
    # 197,650 are item embeddings; the rest is the stack plus the learnable positions (211 x 50)
    by_hand = 8 * (50 * (2 * 2 * 25 + 2 * 2 * 25) + 2 * 25 * 50 + 50 + (2 * 211 - 1) + 129)
    assert by_hand == 104_800 == dense_parameters(50, 8, 2, 25, 25, 211, 128)
    assert by_hand + 211 * 50 + 197_650 == 313_000


def test_plan_arithmetic_equals_hand_computed_values():
    p = PlanInputs()  # 1e9 users, 1e8 items, d 256, 16 blocks x 8 heads of 32, W 1024, 1e11 events, 8 x 80 GB
    rows = by_name(plan(p))
    assert rows["item table"]["value"] == pytest.approx(1e8 * 256 * 4 / 1e9) == pytest.approx(102.4)
    assert rows["row-wise Adagrad state"]["value"] == pytest.approx(0.4)
    assert rows["Adam state (for comparison)"]["value"] == pytest.approx(204.8)
    # per layer: matmuls 2 (256 (512 + 512) + 256 x 256) = 655,360; causal attention 2 x 512 x 8 x 64 = 524,288
    assert flops_per_token(256, 16, 8, 32, 32, 1024) == 3 * 16 * (655_360 + 524_288) == 56_623_104
    assert rows["training FLOPs per token"]["value"] == 56_623_104
    # per layer floats: 2 x 8 x 1024^2 + 1024 x 1024 + 3 x 1024 x 256 + 3 x 1024 x 256 = 19,398,656
    assert activation_bytes(256, 16, 8, 32, 32, 1024) == 4 * 16 * 19_398_656
    assert activation_bytes(256, 16, 8, 32, 32, 1024, fused=True) == 4 * 16 * (19_398_656 - 16_777_216)
    assert rows["GPU-hours per epoch"]["value"] == pytest.approx(1e11 / 1e6 / 3600)
    assert rows["implied sustained TFLOP/s per GPU"]["value"] == pytest.approx(56.623104)
    assert rows["usable memory per GPU"]["value"] == pytest.approx(64.0)
    # (102.4 + 0.4) GB over GPUs with 64 GB less the dense state: 2 GPUs, 1 node; with Adam 307.2 GB < 512: 1 node
    assert rows["GPUs to hold table + Adagrad state"]["value"] == 2
    assert rows["nodes to hold table + Adam state (for comparison)"]["value"] == 1
    assert rows["hours per epoch on 1 node(s) of 8 GPUs"]["value"] == pytest.approx(1e11 / 1e6 / 3600 / 8)
    assert rows["brute-force top-K FLOPs per request"]["value"] == 2 * 1e8 * 256
    assert rows["serving table per shard (bf16)"]["value"] == pytest.approx(1e8 * 256 * 2 / 8 / 1e9)
    assert rows["brute-force requests / s per shard set"]["value"] == pytest.approx(8 * 200e12 / 5.12e10)
    assert rows["user tower FLOPs per request"]["value"] == pytest.approx(56_623_104 / 3 * 1024)
    assert rows["candidates merged per request"]["value"] == 8 * 200
    assert {r["status"] for r in plan(p)} == {"assumption", "extrapolated"}  # nothing measured without a record
    # the CPU figures: 2e4 tokens/s at 1e6 FLOPs per token on 2 processes = 10 GFLOP/s per process
    p.cpu_tokens_per_s, p.cpu_model_flops_per_token, p.cpu_processes = 2e4, 1e6, 2
    rows = by_name(plan(p))
    assert rows["CPU training tokens / s (bench scale, its model)"]["status"] == "measured"
    assert rows["CPU sustained GFLOP/s per process"]["value"] == pytest.approx(10.0)
    assert rows["CPU process-hours per epoch at the plan's model"]["value"] == \
        pytest.approx(1e11 * 56_623_104 / 1e10 / 3600)
    assert "[measured]" in format_plan(p) and "items x d x 4 B" in format_plan(p)


FIELDS = {
    "nvtabular": re.compile(r"^nvtabular workers=(\d+): rows/s ([\d.]+) \(rows (\d+), seconds ([\d.]+);"),
    "train": re.compile(r"^train processes=(\d+): samples/s ([\d.]+) tokens/s ([\d.]+) \(steps (\d+), global batch "
                        r"(\d+), samples (\d+), mean length ([\d.]+), seconds ([\d.]+)"),
    "memory": re.compile(r"^memory rows=(\d+) dim=(\d+) ranks=(\d+) rank=(\d+): table bytes (\d+) optimizer bytes "
                         r"(\d+)"),
}


def test_bench_scale_at_tiny_sizes_prints_positive_figures(tmp_path, capsys):
    from merlin_hstu.cli.main import main

    out = tmp_path / "scale"
    assert main(["bench", "scale", "--users", "40", "--user-factor", "2", "--item-factor", "1",
                 "--dask-workers", "0,2", "--nproc", "1,2", "--steps", "2", "--batch-size", "16",
                 "--max-history", "10", "--set", "model.embedding_dim=16", "--set", "model.num_blocks=1",
                 "--table-rows", "1000,3000", "--table-dim", "8", "--ranks", "1,2", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    head = text.splitlines()[0]
    for key in ("machine: ", "; cores ", "; torch ", "; device ", "; date "):
        assert key in head
    found = {name: [m.groups() for m in map(pattern.match, text.splitlines()) if m] for name, pattern in
             FIELDS.items()}
    assert [int(g[0]) for g in found["nvtabular"]] == [0, 2]
    assert [int(g[0]) for g in found["train"]] == [1, 2]
    assert len(found["memory"]) == 2 + 2 * 2
    for g in found["nvtabular"]:  # rows/s, rows, seconds
        assert all(float(v) > 0 for v in g[1:]), g
    for g in found["train"]:  # samples/s, tokens/s, steps, batch, samples, mean length, seconds
        assert all(float(v) > 0 for v in g), g
        assert float(g[2]) >= float(g[1])  # every sample has >= 1 token
    for rows, dim, ranks, rank, table, optimizer in (tuple(map(int, g)) for g in found["memory"]):
        assert table == rows * dim * 4 // ranks and optimizer == rows * 4 // ranks  # row-wise: 1 float per row
    record = json.loads((out / "scale.json").read_text())
    assert record["machine"]["cores"] and record["machine"]["date"] and record["machine"]["device"] == "cpu"
    assert record["expansion"]["users"] == 80

    # the plan takes the measured CPU throughput of the record
    assert main(["bench", "scale", "--plan", "--measured", str(out / "scale.json")]) == 0
    plan_text = capsys.readouterr().out
    assert "CPU training tokens / s (bench scale, its model)" in plan_text and "[measured]" in plan_text
    assert main(["bench", "scale", "--parts", "train,gpu", "--output", str(tmp_path / "x")]) == 2
    assert "--parts" in capsys.readouterr().err
