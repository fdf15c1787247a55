"""`merlin-hstu bench gpu-check --dry-run`: every section of the prepared GPU check runs on CPU, so it cannot rot.

The dry run is a subprocess with TRITON_INTERPRET=1 (the interpreter must be chosen before triton is first
imported, which this pytest process may already have done).  Its table and its JSON are checked against each
other and against facts that do not come from the check itself:
  * the parity tolerances catch a real mask mistake (the causal vs the target-aware output of the same inputs);
  * the Triton and the PyTorch attention give the same first training loss (same weights, dropout, negatives);
  * M-FALCON's scores equal the full model's;
  * ratios and rates are the quotients of the printed times.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from merlin_hstu.bench import gpu_check

HAVE_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "merlin_hstu.bench.gpu_check", "--dry-run", "--output", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"dry run failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout, json.loads(out.read_text())


def finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_dry_run_prints_one_table_with_every_section(dry_run):
    stdout, report = dry_run
    assert stdout.startswith("GPU check: CPU") and "[DRY RUN: tiny sizes]" in stdout
    assert f"torch {torch.__version__}" in stdout
    titles = [line for line in stdout.splitlines() if re.match(r"^\d\. ", line)]
    assert [t.split(":")[0] for t in titles] == ["1. parity", "2. speed", "3. train", "4. mfalcon"]
    assert "ERROR" not in stdout and stdout.rstrip().splitlines()[-2].startswith("PASS")
    assert set(report["sections"]) == {"parity", "speed", "train", "mfalcon"}
    assert report["passed"] is True and report["failures"] == []
    assert report["device"]["type"] == "cpu" and report["device"]["dry_run"] is True
    assert report["device"]["torch"] == torch.__version__


def test_parity_passes_for_every_mask_dtype_and_tensor(dry_run):
    stdout, report = dry_run
    parity = report["sections"]["parity"]
    if not HAVE_TRITON:
        assert parity["skipped"] and parity["rows"] == []
        return
    rows = parity["rows"]
    half = report["device"]["half_dtype"]
    expected = {(dtype, mask, tensor) for dtype in ("float32", half) for mask in gpu_check.MASKS
                for tensor in ("out", "dq", "dk", "dv", "dbias")}
    assert {(r["dtype"], r["mask"], r["tensor"]) for r in rows} == expected
    for r in rows:
        assert r["passed"] and r["ref_max_abs"] > 0.1  # every tensor carries signal
        assert r["max_abs_err"] <= gpu_check.TOLERANCES[r["dtype"]] * r["ref_max_abs"]
        if r["dtype"] == "float32":  # exact fp32 products on both sides: summation order only
            assert r["rel_err"] < 1e-5
    assert sum(line.rstrip().endswith("PASS") for line in stdout.splitlines()) == len(rows)


def test_parity_tolerance_catches_a_wrong_mask():
    """The target-aware output differs from the causal one only where candidates would see each other: the
    comparison must FAIL on it at the loosest (bf16) tolerance, and PASS on the same tensor."""
    common = dict(batch=3, max_len=40, heads=2, dim=8, dtype=torch.float32, device="cpu", seed=5)
    causal = gpu_check.parity_inputs("causal", **common)
    targets = gpu_check.parity_inputs("target-aware", **common)
    assert torch.equal(causal["q"], targets["q"]) and torch.equal(causal["attn_bias"], targets["attn_bias"])
    want = gpu_check.attention_with_grads(causal, "pytorch")
    wrong = gpu_check.attention_with_grads(targets, "pytorch")
    tol = gpu_check.TOLERANCES["bfloat16"]
    assert not gpu_check.compare(wrong["out"], want["out"], tol)["passed"]
    assert not gpu_check.compare(wrong["dq"], want["dq"], tol)["passed"]
    same = gpu_check.compare(want["out"], want["out"].clone(), gpu_check.TOLERANCES["float32"])
    assert same["passed"] and same["max_abs_err"] == 0.0


def test_speed_rows_have_times_and_ratios(dry_run):
    _, report = dry_run
    speed = report["sections"]["speed"]
    assert [r["max_len"] for r in speed["rows"]] == list(gpu_check.DRY_SIZES.speed_lengths)
    assert speed["dtype"] == report["device"]["half_dtype"] and speed["failed_cells"] == []
    for r in speed["rows"]:
        assert r["longest"] <= r["max_len"]
        impls = ("triton", "pytorch", "sdpa") if HAVE_TRITON else ("pytorch", "sdpa")
        for impl in impls:
            assert all(finite_positive(r[impl][k]) for k in ("fwd_ms", "bwd_ms", "fwd_bwd_ms")), (impl, r)
        if HAVE_TRITON:
            assert r["pytorch_over_triton"] == pytest.approx(r["pytorch"]["fwd_bwd_ms"] / r["triton"]["fwd_bwd_ms"])
            assert r["sdpa_over_triton"] == pytest.approx(r["sdpa"]["fwd_bwd_ms"] / r["triton"]["fwd_bwd_ms"])


def test_training_step_rows_agree_across_kernels(dry_run):
    _, report = dry_run
    train = report["sections"]["train"]
    assert train["preset"] == "hstu-large-ml1m" and train["device_clean"] is True
    half = report["device"]["half_dtype"]
    by = {(r["kernel"], r["dtype"]): r for r in train["rows"]}
    kernels = ("triton", "pytorch") if HAVE_TRITON else ("pytorch",)
    assert set(by) == {(k, d) for k in kernels for d in ("float32", half)}
    tokens = train["batch_size"] * train["history"]
    for r in by.values():
        assert finite_positive(r["ms"]) and math.isfinite(r["first_loss"]) and math.isfinite(r["loss"])
        assert r["tokens_per_s"] == pytest.approx(tokens / (r["ms"] / 1e3))
    fp32 = by[("pytorch", "float32")]["first_loss"]
    assert by[("pytorch", half)]["first_loss"] == pytest.approx(fp32, rel=1e-2)  # 16-bit autocast: same loss
    if HAVE_TRITON:  # same weights, dropout masks and negatives: only the attention implementation differs
        assert by[("triton", "float32")]["first_loss"] == pytest.approx(fp32, rel=1e-5)
        assert by[("triton", half)]["first_loss"] == pytest.approx(fp32, rel=1e-2)


def test_mfalcon_rows_and_exactness(dry_run):
    _, report = dry_run
    mf = report["sections"]["mfalcon"]
    cached = [r for r in mf["rows"] if r["mode"] == "mfalcon"]
    assert [r["candidates"] for r in cached] == list(gpu_check.DRY_SIZES.mfalcon_candidates)
    for r in mf["rows"]:
        assert finite_positive(r["ms"]) and r["candidates_per_s"] == pytest.approx(r["candidates"] / (r["ms"] / 1e3))
    for r in cached:
        assert r["ms"] == pytest.approx(r["prefill_ms"] + r["score_ms"])
    full = [r for r in mf["rows"] if r["mode"] == "no-cache"]
    assert [r["candidates"] for r in full] == [min(gpu_check.DRY_SIZES.mfalcon_candidates)]
    assert mf["max_abs_diff_vs_no_cache"] < 1e-4  # the KV cache changes the cost, not the scores


def test_off_device_recorder_names_the_package_line():
    """A CPU lengths tensor fed to the mask builder while the check expects 'meta': every tensor it builds is
    off device, and the recorder points at the lines of kernels/attention_ops.py that built them."""
    from merlin_hstu.kernels.attention_ops import valid_attention_mask

    found = gpu_check.off_device_ops(lambda: valid_attention_mask(torch.tensor([3, 2]), 4), "meta")
    where = [f["where"] for f in found]
    assert any(w.startswith("kernels/attention_ops.py:") and w.endswith("in valid_attention_mask") for w in where)
    assert any("aten.arange -> cpu" in f["ops"] for f in found)
    assert gpu_check.off_device_ops(lambda: valid_attention_mask(torch.tensor([3, 2]), 4), "cpu") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_without_cuda_says_so(capsys):
    from merlin_hstu.cli.main import build_parser, main

    args = build_parser().parse_args(["bench", "gpu-check", "--dry-run"])
    assert args.func is gpu_check.run and args.dry_run
    assert main(["bench", "gpu-check", "--output", "unused.json"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--dry-run" in err
    assert gpu_check.main(["--device", "cpu"]) == 2  # full sizes on CPU are refused, not attempted
    assert "--dry-run" in capsys.readouterr().err
