"""One run-directory format for every task.

    RUN/
      run.json             {"format": 2, "task": "retrieval" | "ranking" | "ctr", "model_type", "data", "workflow",
                            "device", "precision", "steps", "resumed_from", ...}
      config.yaml          the task's full experiment config (preset + overrides): `train` retrains it
      model.pt             {"task", "model_type", "model_config", the build arguments, "state_dict"}
      metrics.json         final metrics, per-epoch losses and metrics, timings
      training_curves.png  loss (and evaluated metrics) per epoch
    RUN.incomplete/        while training: checkpoints/ (resumable), removed once RUN is published

RUN is written in a staging directory and renamed into place (by rank 0 alone in a multi-process run), so a RUN that
exists is complete; checkpoints make a
killed run resumable (`merlin-hstu train ... --resume`). Run directories written before `run.json` existed are
retrieval runs and still load.

Each task package writes and reads its own model (`retrieval.train`, `ranking.train`, `ctr.train`: `save_run` /
`load_run`); `load_run` here finds the task and delegates, which is what `evaluate`, `export` and `serve` call.
"""
from __future__ import annotations

import importlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from merlin_hstu.common.atomic_dir import publish_dir, staging_dir, write_file
from merlin_hstu.common.plots import pyplot, save_figure

RUN_FORMAT = 2
RUN_FILE = "run.json"
TASK_MODULES = {"retrieval": "merlin_hstu.retrieval.train", "ranking": "merlin_hstu.ranking.train",
                "ctr": "merlin_hstu.ctr.train"}


@dataclass
class LoadedRun:
    task: str
    model: Any  # torch.nn.Module in eval mode, on the CPU
    config: Any  # the task's experiment config
    record: dict  # run.json merged with metrics.json
    path: Path


def work_dir(run_dir: str | Path) -> Path:
    """`RUN.incomplete`: where a run in progress keeps its checkpoints (beside RUN, so it survives a crash)."""
    run_dir = Path(run_dir)
    return run_dir.parent / f"{run_dir.name}.incomplete"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return work_dir(run_dir) / "checkpoints"


def open_work_dir(work: Path, resume: bool, what: str = "run") -> Path:
    """Start or continue the unfinished `work` folder of a run or bench: with `resume` it is kept (a note when there
    is none, then the work starts from the beginning); without it an unfinished one is discarded, with a note."""
    work = Path(work)
    if resume and not work.exists():
        print(f"note: --resume but {work} does not exist; starting from the beginning")
    elif not resume and work.exists():
        print(f"note: discarding the unfinished {what} in {work} (pass --resume to continue it)")
        shutil.rmtree(work)
    return work


# A bench's finished runs and stages, kept in its work folder so that `--resume` reuses them (bench amazon, sid,
# hllm): each is a JSON record with this format and the run's fingerprint.
RUN_RESULT_FORMAT = 1


def run_dir_name(dataset: str, name: str, seed: int) -> str:
    """`<dataset>/<name>-s<seed>`: where a bench keeps one run in its work folder, the dataset (a name or a path)
    made one safe folder name."""
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', dataset).strip('_') or 'dataset'}/{name}-s{seed}"


def finished_run(run_dir: Path, fingerprint: str, record: str = "result.json") -> Optional[dict]:
    """The record (`run_dir / record`) of a run or stage that finished before the bench was killed, or None. One of
    another config or dataset is refused: it is not this bench's run."""
    path = run_dir / record
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    if done.get("format") != RUN_RESULT_FORMAT or done.get("fingerprint") != fingerprint:
        raise ValueError(f"{path} is the result of another configuration or dataset; resume with the same "
                         "arguments, or run without --resume (which starts again) or into another --output")
    return done


def resumable_run(run_dir: Path, fingerprint: str, resume: bool, label: str, train: Callable[[Path], dict],
                  record: str = "result.json", checkpoints: str = "checkpoints") -> dict:
    """One run (or stage) of a bench that survives a kill: under `resume`, the record of a run that finished is
    reused (`finished_run`); otherwise `train(run_dir / checkpoints)` trains it, continuing from the newest
    checkpoint there under `resume`, and returns its record (with "resumed_from", the loop's). The record is
    written to `run_dir / record` with the format and `fingerprint`, then the checkpoints are removed. -> the
    record, without the format and fingerprint."""
    done = finished_run(run_dir, fingerprint, record) if resume else None
    if done is not None:
        print(f"{label}: finished before the interruption; reusing {run_dir / record}")
    else:
        done = {"format": RUN_RESULT_FORMAT, "fingerprint": fingerprint, **train(run_dir / checkpoints)}
        if done.get("resumed_from") is not None:
            print(f"{label}: continued from step {done['resumed_from']} of the interrupted run")
        write_file(run_dir / record, json.dumps(done, indent=2, default=str))
        shutil.rmtree(run_dir / checkpoints, ignore_errors=True)
    return {k: v for k, v in done.items() if k not in ("format", "fingerprint")}


def run_record(fitted, model_type: str, data_dir=None, workflow_dir=None, steps: int = 0) -> dict:
    """The run.json fields every task records: model type, data and workflow paths, and the loop's facts
    (`fitted`: the `FitResult` of `merlin_hstu.train.loop.fit`, None for a model trained elsewhere)."""
    if workflow_dir is None and data_dir is not None and (Path(data_dir) / "workflow").is_dir():
        workflow_dir = Path(data_dir) / "workflow"
    return {"model_type": model_type, "data": str(Path(data_dir).resolve()) if data_dir else None,
            "workflow": str(Path(workflow_dir).resolve()) if workflow_dir else None,
            "device": fitted.device if fitted else "cpu", "precision": fitted.precision if fitted else "fp32",
            "steps": fitted.steps if fitted else steps,
            "resumed_from": fitted.resumed_from if fitted else None,
            "stopped_early": fitted.stopped_early if fitted else False,
            "best_epoch": fitted.best_epoch if fitted else None}


def write_run(run_dir: str | Path, task: str, files: Dict[str, Callable[[Path], None]], record: dict) -> Path:
    """Publish RUN atomically: each `files[name](path)` writes one file into the staging directory; `record` goes to
    run.json with the format and task. The work directory (checkpoints) is removed once RUN is in place."""
    if task not in TASK_MODULES:
        raise ValueError(f"unknown task {task!r}; use one of {sorted(TASK_MODULES)}")
    final = Path(run_dir)
    from merlin_hstu.distributed.context import is_main_process

    if not is_main_process():  # a multi-process run: every rank holds the same model; rank 0 writes it
        return final
    tmp = staging_dir(final)
    try:
        for name, write in files.items():
            write(tmp / name)
        (tmp / RUN_FILE).write_text(json.dumps({"format": RUN_FORMAT, "task": task, **record}, indent=2,
                                               default=str))
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work_dir(final), ignore_errors=True)
    return final


def cpu_state_dict(model) -> dict:
    """The model's weights on the CPU (a run directory loads anywhere)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def publish_run(run_dir: str | Path, task: str, config_yaml: str, blob: dict, record: dict, run: dict,
                plot: Callable[[Path], Any]) -> Path:
    """The files of every task's run directory: config.yaml, model.pt (`blob`), metrics.json (`record`),
    training_curves.png (`plot(path)`), run.json (`run`), published atomically by `write_run`."""
    import torch

    return write_run(run_dir, task, {
        "config.yaml": lambda path: path.write_text(config_yaml),
        "model.pt": lambda path: torch.save(blob, path),
        "metrics.json": lambda path: path.write_text(json.dumps(record, indent=2, default=str)),
        "training_curves.png": plot,
    }, run)


def read_record(run_dir: str | Path) -> dict:
    """run.json merged with metrics.json ({} parts when absent)."""
    run_dir = Path(run_dir)
    record: dict = {}
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        record.update(json.loads(metrics.read_text()))
    run = run_dir / RUN_FILE
    if run.is_file():
        record.update(json.loads(run.read_text()))
    return record


def run_task(run_dir: str | Path) -> str:
    """The task of a run directory: run.json's, or "retrieval" for directories written before run.json existed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist (train one with `merlin-hstu train`)")
    run = run_dir / RUN_FILE
    if run.is_file():
        task = json.loads(run.read_text()).get("task")
        if task not in TASK_MODULES:
            raise ValueError(f"{run}: unknown task {task!r}")
        return task
    if (run_dir / "model.pt").is_file() and (run_dir / "config.yaml").is_file():
        return "retrieval"
    raise FileNotFoundError(f"{run_dir} is not a merlin-hstu run directory: run.json and model.pt are missing")


def load_run(run_dir: str | Path, expected_task: Optional[str] = None) -> LoadedRun:
    """Any task's run: its model (eval mode, CPU), config and record."""
    task = run_task(run_dir)
    if expected_task is not None and task != expected_task:
        raise ValueError(f"{run_dir} is a {task} run, not a {expected_task} run; pass --task {task} or another run")
    model, config, record = importlib.import_module(TASK_MODULES[task]).load_run(run_dir)
    return LoadedRun(task, model, config, record, Path(run_dir))


def plot_losses(losses, path, title: str):
    """Training loss per epoch as a PNG (a convenience: the numbers are in metrics.json)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(range(1, len(losses) + 1), losses, marker="o")
    ax.set(title=f"{title}: training loss", xlabel="epoch", ylabel="loss")
    return save_figure(fig, path)
