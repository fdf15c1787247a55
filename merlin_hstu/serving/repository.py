"""One writer and reader of Triton model repositories for every task (retrieval, ranking, CTR).

    REPO/
      serving.json            task, public model, request contract, source run / data / workflow, export settings,
                              model config, library versions
      <model>/config.pbtxt    python backend; inputs / outputs from the contract's TensorSpecs; the contract JSON
                              as the parameter `merlin_hstu_contract` (clients read it with get_model_config)
      <model>/1/model.py      a one-line shim to a merlin_hstu.serving Triton model class
      <model>/1/ensemble/     (the model that runs the graph) Ensemble.save: ensemble.pkl (merlin_hstu.serving op
                              classes and plain values, no model or workflow inside) + each op's artifacts
                              (workflow/ = Workflow.save, TorchScript programs, id mappings)

`write_repository` builds all of it in a staging directory beside REPO (merlin_hstu.common.atomic_dir), runs the
exporter's check on the staged files (the graph loaded as the server loads it, answering a request), and only
then renames it into place: a repository that exists is complete and has served a request.

`export_run(RUN, REPO)` exports a run directory of any task (the task is read from the run):

    retrieval   merlin_hstu.serving.export.export_repository   <name> (ragged) + <name>_batched (executor)
    ranking     merlin_hstu.serving.ranking.export_ranking_run  <name> (executor)
    ctr         merlin_hstu.serving.ctr.export_ctr_run          <name> (executor)
    sid         merlin_hstu.serving.sid.export_sid_repository   <name> + <name>_batched (a retrieval repository;
                (semantic-ID runs, merlin_hstu.sid)               default name sid_topk)
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from merlin_hstu.common.atomic_dir import publish_dir, staging_dir
from merlin_hstu.serving.contract import CONTRACT_PARAMETER, ServingContract, contract_from_dict

SERVING_FILE = "serving.json"
REPOSITORY_FORMAT = 2  # 1: the retrieval-only repositories of earlier releases (no "format" key)
ENSEMBLE_DIR = "ensemble"
BATCHED_MAX_BATCH = 64  # requests per batched execute (each request may hold many users)
EXECUTOR_SHIM = "from merlin_hstu.serving.triton_executor import TritonPythonModel  # noqa: F401\n"
ENTRY_SHIM = "from merlin_hstu.serving.triton_entry import TritonPythonModel  # noqa: F401\n"
DEFAULT_MODEL_NAMES = {"retrieval": "hstu_topk", "ranking": "hstu_ranking", "ctr": "ctr"}


@dataclass
class ExportConfig:
    """Knobs of an export.  The first two apply to every task; the rest to retrieval only."""

    model_name: Optional[str] = None  # the public Triton model (None: hstu_topk | hstu_ranking | ctr by task)
    instances: int = 2  # instances of the model that runs the graph (2 measured best on 2 cores)
    # retrieval only
    top_k: int = 10  # default K of a request (a request may ask for 1..max_k)
    exclude_history: bool = True  # default: drop each user's history window from the results (eval protocol)
    entry_instances: int = 8  # plain-model instances = its requests in flight (each waits on the batched model)
    max_queue_delay_us: int = 0  # extra wait to grow a batch; 0: batch whatever is queued when an instance frees
    prune_unused_inputs: bool = True  # drop workflow branches the model never reads (the action lists)

    def __post_init__(self) -> None:
        name = self.model_name
        if name is not None and (not name or not name.replace("_", "").replace("-", "").isalnum()):
            raise ValueError(f"ExportConfig.model_name must be letters, digits, '_' or '-', got {name!r}")
        for field_name in ("top_k", "entry_instances", "instances"):
            if int(getattr(self, field_name)) < 1:
                raise ValueError(f"ExportConfig.{field_name} must be >= 1, got {getattr(self, field_name)}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"ExportConfig.max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")

    def name_for(self, task: str) -> str:
        return self.model_name or DEFAULT_MODEL_NAMES[task]

    @property
    def batched_name(self) -> str:
        """Retrieval: the model behind Triton's dynamic batcher."""
        return f"{self.name_for('retrieval')}_batched"


@dataclass
class TritonModel:
    """One python-backend model of a repository."""

    name: str
    contract: ServingContract
    shim: str = EXECUTOR_SHIM  # model.py: which merlin_hstu.serving class Triton runs
    ensemble: Any = None  # a merlin-systems Ensemble, saved to <name>/1/ensemble with its op artifacts
    batched: bool = False  # max_batch_size > 0 + dynamic batching; every input allow_ragged_batch
    instances: int = 1
    max_queue_delay_us: int = 0


def _tensor_block(name: str, dtype: str, dims, extra: str = "") -> str:
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims)} ]{extra} }}'


def model_config(model: TritonModel) -> str:
    """config.pbtxt of `model`, from its contract's TensorSpecs."""
    c = model.contract
    if model.batched:
        inputs = [_tensor_block(s.name, s.dtype, s.dims, " allow_ragged_batch: true") for s in c.inputs(batched=True)]
        batching = [f"max_batch_size: {BATCHED_MAX_BATCH}",
                    f"dynamic_batching {{ max_queue_delay_microseconds: {model.max_queue_delay_us} }}"]
    else:
        inputs = [_tensor_block(s.name, s.dtype, s.dims, " optional: true" if s.optional else "")
                  for s in c.inputs()]
        batching = ["max_batch_size: 0"]
    outputs = [_tensor_block(s.name, s.dtype, s.dims) for s in c.outputs()]
    # the contract as a config parameter: JSON, quoted for protobuf text
    contract = json.dumps(json.dumps(c.to_dict(), separators=(",", ":")))
    return "\n".join([
        f'name: "{model.name}"',
        'backend: "python"',
        *batching,
        "input [", ",\n".join(inputs), "]",
        "output [", ",\n".join(outputs), "]",
        f"instance_group [ {{ kind: KIND_CPU count: {model.instances} }} ]",
        f'parameters {{ key: "{CONTRACT_PARAMETER}" value {{ string_value: {contract} }} }}',
        "",
    ])


def _versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for package in ("merlin-hstu", "torch", "merlin-core", "merlin-systems", "nvtabular", "nvidia-pytriton"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_repository(output: str | Path, models: Sequence[TritonModel], record: dict,
                     check: Optional[Callable[[Path], None]] = None, overwrite: bool = False) -> Path:
    """Write a model repository atomically (module docstring).  `models[0]` is the public model; `record` goes to
    serving.json (with task, contract, models, time and versions added); `check(staged_repo)` runs before
    anything is published and raises if the staged repository cannot serve."""
    from merlin_hstu.serving.ops import graph_ops

    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; remove it or pass overwrite=True (--overwrite)")
    contract = models[0].contract
    staging = staging_dir(output)
    try:
        for model in models:
            version = staging / model.name / "1"
            version.mkdir(parents=True)
            (staging / model.name / "config.pbtxt").write_text(model_config(model))
            (version / "model.py").write_text(model.shim)
            if model.ensemble is not None:
                graph_dir = version / ENSEMBLE_DIR
                model.ensemble.save(str(graph_dir))
                for op in graph_ops(model.ensemble):
                    op.save_artifacts(str(graph_dir))
        if check is not None:
            check(staging)
        serving = {"format": REPOSITORY_FORMAT, "task": contract.task, "model_name": models[0].name,
                   "models": [m.name for m in models], "contract": contract.to_dict(), **record,
                   "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions()}
        (staging / SERVING_FILE).write_text(json.dumps(serving, indent=2, default=str))
        publish_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def read_serving_record(repo: str | Path) -> dict:
    path = Path(repo) / SERVING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{repo} is not a merlin-hstu model repository ({SERVING_FILE} is missing); "
                                "create one with `merlin-hstu export --run RUN --output REPO`")
    return json.loads(path.read_text())


def ensemble_dir(repo: str | Path) -> Path:
    """The directory of the repository's saved serving graph (the model that runs it)."""
    repo = Path(repo)
    found = sorted(repo.glob(f"*/1/{ENSEMBLE_DIR}/ensemble.pkl"))
    if len(found) != 1:
        raise FileNotFoundError(f"{repo} should hold exactly one <model>/1/{ENSEMBLE_DIR}/ensemble.pkl, found "
                                f"{[str(p.parent) for p in found]}")
    return found[0].parent


def open_repository(repo: str | Path):
    """-> (contract, ServingEnsemble): an exported repository loaded in-process, as its Triton model loads it."""
    from merlin_hstu.serving.core import ServingEnsemble

    contract = contract_from_dict(read_serving_record(repo)["contract"])
    return contract, ServingEnsemble.load(ensemble_dir(repo), contract)


def check_serves(repo: Path, contract: ServingContract, request_arrays: dict,
                 expect: Callable[[tuple], Optional[str]]) -> None:
    """The export check: load the (staged) repository's graph as its Triton model does and serve one request;
    `expect(outputs)` says what is wrong with the answer, or None."""
    from merlin_hstu.serving.core import ServingEnsemble

    served = ServingEnsemble.load(ensemble_dir(repo), contract)
    problem = expect(served.run([contract.validate(request_arrays)])[0])
    if problem:
        raise RuntimeError(f"the exported {contract.task} graph answered a one-request check wrongly: {problem}; "
                           "the export is broken")


def export_run(run_dir: str | Path, output: str | Path, config: Optional[ExportConfig] = None,
               task: Optional[str] = None, data: Optional[str] = None, overwrite: bool = False,
               beam_width: Optional[int] = None) -> Path:
    """Export a run directory of any task.  `task`: check that the run is of this task; `data`: the dataset
    directory to take the fitted workflow from, when the run does not record it (or it moved); `beam_width`:
    semantic-ID runs only (the served beam width)."""
    from merlin_hstu.sid import SID_TASK
    from merlin_hstu.sid.train import is_sid_run
    from merlin_hstu.train.run_dir import run_task

    if is_sid_run(run_dir):  # a retrieval repository around the decoder's beam search (merlin_hstu.serving.sid)
        if task is not None and task != SID_TASK:
            raise ValueError(f"{run_dir} is a {SID_TASK} run, not a {task} run; drop --task or pass a {task} run")
        from merlin_hstu.serving.sid import DEFAULT_MODEL_NAME, export_sid_repository

        config = config or ExportConfig()
        if config.model_name is None:
            config = replace(config, model_name=DEFAULT_MODEL_NAME)
        return export_sid_repository(run_dir, data, output, config, overwrite=overwrite, beam_width=beam_width)
    found = run_task(run_dir)
    if beam_width is not None:
        raise ValueError(f"a beam width applies to semantic-ID runs only; {run_dir} is a {found} run")
    if task is not None and task != found:
        raise ValueError(f"{run_dir} is a {found} run, not a {task} run; drop --task or pass a {task} run")
    config = config or ExportConfig()
    if found == "retrieval":
        from merlin_hstu.serving.export import export_repository

        return export_repository(run_dir, output, config, overwrite=overwrite, data=data)
    if found == "ranking":
        from merlin_hstu.serving.ranking import export_ranking_run

        return export_ranking_run(run_dir, output, config, data=data, overwrite=overwrite)
    from merlin_hstu.serving.ctr import export_ctr_run

    return export_ctr_run(run_dir, output, config, data=data, overwrite=overwrite)


def export_settings(config: ExportConfig, task: str) -> dict:
    """The settings serving.json records: the shared ones, plus retrieval's own for retrieval."""
    d = asdict(config)
    d["model_name"] = config.name_for(task)
    if task != "retrieval":
        d = {k: d[k] for k in ("model_name", "instances")}
    return d
