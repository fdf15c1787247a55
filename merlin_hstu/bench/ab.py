"""`merlin-hstu bench ab`: two versions of this code base timed back to back on the same machine.

`--base REV` is checked out into a temporary git worktree; `--head` is another revision or, by default, the
working tree.  Each round starts one fresh process per version, alternating which goes first, and every process
times the same retrieval training steps (forward, backward, AdamW step) on the same batches, then one full
evaluation (every eval user scored over the whole catalogue).  The process runs its version's code: a small
package folder of symlinks (`merlin_hstu/`, with `kernels/` and `workflows/` mapped in as the installed package
maps them) goes first on PYTHONPATH, ahead of the editable install.

Printed per version: median wall s/step over the timed steps of all rounds, CPU-s/step (process time, all
threads), evaluation seconds, peak RSS, the first step's loss; then the ratios head / base, and how far the
head's first-step gradients are from the base's (max |difference| / max |base| per parameter tensor).  Both versions ran in
this one command, interleaved, so the ratios are the numbers to quote (absolute times on a shared 2-core
machine drift between runs).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# The timed program (run in a fresh interpreter with one version's code first on sys.path).  It uses only APIs
# that every version since the one-pipeline issue has.
PROBE = r'''
import json, resource, sys, time, torch
from pathlib import Path
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
import merlin_hstu
assert str(Path(merlin_hstu.__file__).resolve()).startswith(spec["root"]), merlin_hstu.__file__
from merlin_hstu.bench.retrieval import resolve_dataset
from merlin_hstu.retrieval.config import load_config
from merlin_hstu.retrieval.data import LeaveOneOut, load_processed
from merlin_hstu.retrieval.train import RetrievalTrainingTask, build_model, evaluate_model, make_retrieval_optimizer
cfg = load_config(spec["model"], spec["overrides"])
try:  # the loop's precision context (bf16 autocast or nothing), where this version has it
    from merlin_hstu.train.config import autocast
    precision = lambda: autocast(torch.device("cpu"), cfg.train.precision)
except ImportError:
    import contextlib
    precision = contextlib.nullcontext
data_dir, _ = resolve_dataset(spec["dataset"], None, Path(spec["cache"]), cfg.data.max_history)
table = load_processed(data_dir)
split = LeaveOneOut(table, max_history=cfg.data.max_history)
torch.manual_seed(cfg.train.seed)
model = build_model(table, cfg)
task = RetrievalTrainingTask(split, cfg, torch.device("cpu"))
optimizer = make_retrieval_optimizer(cfg)(model)
batches = task.epoch_batches(0)
model.train()
wall, cpu, losses = [], [], []
for step in range(spec["steps"]):
    batch = next(batches)
    t, c = time.perf_counter(), time.process_time()
    optimizer.zero_grad(set_to_none=True)
    with precision():
        loss, _ = task.loss(model, batch)
    loss.backward()
    optimizer.step()
    wall.append(time.perf_counter() - t); cpu.append(time.process_time() - c); losses.append(float(loss))
    if step == 0 and spec.get("grads"):  # the first step's gradients, for the parent to compare (not timed)
        torch.save({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
                   spec["grads"])
eval_seconds = None
if spec["eval"]:
    t = time.perf_counter()
    with precision():
        evaluate_model(model, split, cfg)
    eval_seconds = time.perf_counter() - t
print("AB-RESULT " + json.dumps({"wall": wall, "cpu": cpu, "losses": losses, "eval_seconds": eval_seconds,
                                 "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
'''


def package_farm(tree: Path, into: Path) -> Path:
    """A folder whose `merlin_hstu` package is `tree`'s code, laid out as the installed package maps it."""
    pkg = into / "merlin_hstu"
    pkg.mkdir(parents=True)
    for entry in (tree / "merlin_hstu").iterdir():
        if entry.name not in ("kernels", "workflows"):
            (pkg / entry.name).symlink_to(entry)
    (pkg / "kernels").symlink_to(tree / "kernels")
    (pkg / "workflows").symlink_to(tree / "workflows")
    return into


def checkout(repo: Path, rev: str, into: Path) -> Path:
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(into), rev], check=True,
                   capture_output=True, text=True)
    return into


def run_probe(farm: Path, root: Path, spec: dict) -> dict:
    from merlin_hstu.workflows.datasets import SHARED_DATA

    env = dict(os.environ, PYTHONPATH=str(farm) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MERLIN_HSTU_SHARED_DATA=str(SHARED_DATA))
    spec = {**spec, "root": str(root.resolve())}
    # cwd = the farm: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(spec)], env=env, capture_output=True, text=True,
                          cwd=str(farm))
    line = next((x for x in done.stdout.splitlines() if x.startswith("AB-RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"the timing process for {root} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(line[len("AB-RESULT "):])


def gradient_difference(base_file: Path, head_file: Path) -> dict:
    """The first step's gradients of the two versions, tensor by tensor: max |g_head - g_base| / max |g_base|
    (the worst tensor's), over the parameter names both versions have."""
    import torch

    base, head = torch.load(base_file), torch.load(head_file)
    common = sorted(set(base) & set(head))
    worst, worst_name = 0.0, None
    for name in common:
        b, h = base[name].double(), head[name].double()
        if b.shape != h.shape:
            raise RuntimeError(f"first-step gradient of {name}: shape {tuple(b.shape)} (base) vs {tuple(h.shape)}")
        rel = float((h - b).abs().max() / b.abs().max().clamp(min=1e-30))
        if rel > worst or worst_name is None:
            worst, worst_name = rel, name
    return {"max_relative": worst, "worst_tensor": worst_name, "tensors": len(common),
            "only_in_one": sorted(set(base) ^ set(head))}


def summarize(results: list, warmup: int) -> dict:
    wall = [t for r in results for t in r["wall"][warmup:]]
    cpu = [t for r in results for t in r["cpu"][warmup:]]
    evals = [r["eval_seconds"] for r in results if r["eval_seconds"] is not None]
    return {"s_per_step": statistics.median(wall), "cpu_s_per_step": statistics.median(cpu),
            "eval_seconds": statistics.median(evals) if evals else None,
            "peak_rss_gb": max(r["peak_rss_gb"] for r in results), "first_loss": results[0]["losses"][0],
            "losses": results[0]["losses"]}


def run(args) -> int:
    from merlin_hstu.bench.retrieval import machine_info, machine_summary

    repo = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True, capture_output=True,
                               text=True).stdout.strip())
    work = Path(tempfile.mkdtemp(prefix="merlin-hstu-ab-"))
    trees = {}
    try:
        trees["base"] = checkout(repo, args.base, work / "base")
        trees["head"] = checkout(repo, args.head, work / "head") if args.head else repo
        farms = {name: package_farm(tree, work / f"farm-{name}") for name, tree in trees.items()}
        spec = {"model": args.model, "dataset": args.dataset, "cache": str(Path(args.cache).resolve()),
                "overrides": list(args.overrides), "steps": args.steps, "threads": args.threads,
                "eval": not args.no_eval}
        specs = {"base": {**spec, "overrides": [*args.overrides, *args.base_overrides]},
                 "head": {**spec, "overrides": [*args.overrides, *args.head_overrides]}}
        # the dataset is preprocessed once, here, so both versions read the same cached files
        from merlin_hstu.bench.retrieval import resolve_dataset
        from merlin_hstu.retrieval.config import load_config

        history = load_config(args.model, list(args.overrides)).data.max_history
        resolve_dataset(args.dataset, None, Path(spec["cache"]), history)
        print(f"machine: {machine_summary(machine_info())}")
        print(f"base {args.base} vs head {args.head or 'working tree'}: {args.model} on {args.dataset}, "
              f"{args.steps} steps (first {args.warmup} not timed), {args.threads} threads, {args.rounds} rounds")
        for name, extra in (("base", args.base_overrides), ("head", args.head_overrides)):
            if extra:
                print(f"  {name} only: " + " ".join(f"--set {o}" for o in extra))
        results = {"base": [], "head": []}
        grads = {name: work / f"grads-{name}.pt" for name in specs}
        for r in range(args.rounds):
            order = ["base", "head"] if r % 2 == 0 else ["head", "base"]
            for name in order:
                spec_r = {**specs[name], "grads": str(grads[name])} if r == 0 else specs[name]
                results[name].append(run_probe(farms[name], trees[name], spec_r))
                got = results[name][-1]
                print(f"  round {r + 1} {name}: {statistics.median(got['wall'][args.warmup:]):.3f} s/step"
                      + (f", eval {got['eval_seconds']:.1f} s" if got["eval_seconds"] is not None else ""), flush=True)
        summary = {name: summarize(rs, args.warmup) for name, rs in results.items()}
        b, h = summary["base"], summary["head"]
        print("\n| version | s/step | CPU-s/step | eval s | peak RSS GB | first loss |")
        print("|---|---|---|---|---|---|")
        for name, label in (("base", args.base), ("head", args.head or "working tree")):
            s = summary[name]
            ev = f"{s['eval_seconds']:.1f}" if s["eval_seconds"] is not None else "-"
            print(f"| {name} ({label}) | {s['s_per_step']:.3f} | {s['cpu_s_per_step']:.3f} | {ev} | "
                  f"{s['peak_rss_gb']:.2f} | {s['first_loss']:.6f} |")
        ratios = {"s_per_step": h["s_per_step"] / b["s_per_step"],
                  "cpu_s_per_step": h["cpu_s_per_step"] / b["cpu_s_per_step"],
                  "peak_rss_gb": h["peak_rss_gb"] / b["peak_rss_gb"]}
        if b["eval_seconds"] and h["eval_seconds"]:
            ratios["eval_seconds"] = h["eval_seconds"] / b["eval_seconds"]
        print("ratios head / base (measured in this run): "
              + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items()))
        print(f"first-step loss relative difference: {abs(h['first_loss'] - b['first_loss']) / abs(b['first_loss']):.2e}")
        grad_diff = gradient_difference(grads["base"], grads["head"])
        print(f"first-step gradients: max relative difference {grad_diff['max_relative']:.2e} "
              f"(max |head - base| / max |base| per tensor; worst {grad_diff['worst_tensor']}, "
              f"{grad_diff['tensors']} tensors)"
              + (f"; only in one version: {', '.join(grad_diff['only_in_one'])}" if grad_diff["only_in_one"] else ""))
        if args.json:
            Path(args.json).write_text(json.dumps({"base": args.base, "head": args.head or "working tree",
                                                   "summary": summary, "ratios": ratios, "specs": specs,
                                                   "first_step_gradients": grad_diff,
                                                   "machine": machine_info()}, indent=2, default=str))
    finally:
        for name, tree in trees.items():
            if tree != repo:
                subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def register_subcommands(subparsers, bench_subparsers) -> None:
    """Hook for merlin_hstu.cli.main.EXTENSION_MODULES: adds `bench ab`."""
    p = bench_subparsers.add_parser("ab", help="two revisions' training step and evaluation, timed back to back",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, metavar="REV", help="the revision to compare against (e.g. HEAD~3)")
    p.add_argument("--head", metavar="REV", help="the other revision (default: the working tree)")
    p.add_argument("--model", default="hstu-large-ml1m", help="retrieval preset (default hstu-large-ml1m)")
    p.add_argument("--dataset", default="ml-1m-prefix", help="dataset name or preprocess output (default ml-1m-prefix)")
    p.add_argument("--cache", default="runs/datasets", help="where named datasets are preprocessed once")
    p.add_argument("--steps", type=int, default=14, help="training steps per process (default 14)")
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="processes per version, alternating (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process (default 2)")
    p.add_argument("--no-eval", action="store_true", help="skip the timed full evaluation")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both versions")
    p.add_argument("--base-set", dest="base_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the base only, e.g. --base HEAD --head-set train.precision=bf16 times "
                        "fp32 against bf16 on the same code")
    p.add_argument("--head-set", dest="head_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the head only")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    p.set_defaults(func=run)
