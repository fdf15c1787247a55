"""Export a trained DLRM-HSTU ranking model with its fitted ranking workflow as a Triton model repository.

    merlin-hstu export --run runs/rank --output runs/rank_repo          # any task's run; this module for ranking
    repo = export_ranking_ensemble(model, "runs/ranking-data", "runs/ranking_repo")   # or a model + its data dir
    with ServingClient("127.0.0.1:8000") as client:                      # merlin_hstu.serving.client
        scores = client.predict([RankingRequest(history_item_ids=[...], history_actions=[...],
                                                history_timestamps=[...], candidate_item_ids=[...],
                                                contextual={"age": 25})])
    scores.scores["click"]       # [Lc] probabilities, candidates of all requests in order (offsets: scores.offsets)

The request contract (what the request holds and how it is checked) is `merlin_hstu.serving.ranking_contract`.

Graph (merlin-systems Ensemble run in-process by `merlin_hstu.serving.triton_executor`, merlin-integration.md
section 3.3 design B, as for retrieval and CTR):

    request >> RankingRequestEncoder(fitted ranking workflow) >> PredictRanking(TorchScript DLRM-HSTU)

Encoding: the ranking workflow ends in a per-user Groupby and `RankingSamples`, which decide what the
candidates are from event times, so it cannot take "this history, these candidates" as they are.  The encoder
runs the workflow's own fitted ops on the request instead: its item op (Categorify; RawItemIds for raw ids) on
history and candidate ids, and its contextual Categorify on the contextual values.  Those are the exact mappings
of training: an unseen item or value gets Categorify's OOV id 2, a missing contextual value (None / "") the
null id 1.  The rest of the workflow's rule is re-stated here (few lines, tested against the workflow's output):

    events   = the history sorted by time, STABLY (equal times keep request order), as ChronologicalGroupby
    UIH      = events[-max_uih_len:]                      (ranking.json's max_uih_len)
    query    = query_timestamp if >= 0 else max(UIH times) (RankingDataset: candidates carry the query time)

Model: `torch.jit.trace` of a wrapper that builds the RankingBatch from jagged tensors and calls
`DlrmHSTU.forward`.  The tracer freezes the data-dependent widths that Python ints carry (the padded width of
the attention); the example it traces holds one user whose sequence has exactly max_seq_len tokens, so every
frozen width is N, an upper bound of every valid request.  Padding past a sequence's length is masked and the
attention normaliser is the constant N, so this changes no number (the export checks the traced program against
the eager model on a second, differently shaped batch).  The trace drops the model's Python-side checks, so the
contract checks what they checked (sequence length <= N) before the model runs.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

import merlin.dtypes as md
from merlin.dag import ColumnSelector, DataFormats
from merlin.schema import ColumnSchema, Schema
from merlin.table import TensorTable

from merlin_hstu.common import schema as roles
from merlin_hstu.ranking.batch import RankingBatch
from merlin_hstu.ranking.data import CONTEXT_PREFIX, read_meta
from merlin_hstu.ranking.model import DlrmHSTU
from merlin_hstu.serving.contract import BadRequest
from merlin_hstu.serving.ops import InlineWorkflow, TorchScriptOp, transform_with_nulls
from merlin_hstu.serving.ranking_contract import (  # noqa: F401  (RankingRequest, RankingScores: re-exported)
    CANDIDATE_ITEMS,
    HISTORY_ACTIONS,
    HISTORY_ITEMS,
    HISTORY_TIMES,
    LIST_INPUTS,
    QUERY_TIMESTAMP,
    RankingContract,
    RankingRequest,
    RankingScores,
    check_sequence_lengths,
)
from merlin_hstu.serving.repository import (
    EXECUTOR_SHIM,
    ExportConfig,
    TritonModel,
    check_serves,
    export_settings,
    write_repository,
)

# encoder -> model columns
_CANDIDATE_TIMES = "candidate_timestamp"
_CONTEXT = "contextual"  # [B, c] encoded contextual values
ITEM_INPUT = roles.ITEM_BASE  # the ranking workflow's item column (normalize_ranking_log renames the raw one to it)
MODEL_FILE = "ranking_model.pt"

RankingServingError = BadRequest  # the name of earlier releases: a request the model cannot score


# ------------------------------------------------------------------------------------------------------------
# The TorchScript model
# ------------------------------------------------------------------------------------------------------------
class JaggedDlrmHSTU(nn.Module):
    """Traceable view of DlrmHSTU: jagged tensors in, [Lc, T] logits / values out (RankingBatch built inside)."""

    def __init__(self, model: DlrmHSTU):
        super().__init__()
        self.model = model

    def forward(self, history_items: Tensor, history_actions: Tensor, history_times: Tensor,
                history_offsets: Tensor, candidate_items: Tensor, candidate_times: Tensor,
                candidate_offsets: Tensor, contextual: Tensor) -> Tensor:
        tasks = self.model.tasks
        batch = RankingBatch(history_items, history_actions, history_times, history_offsets, candidate_items,
                             candidate_times, candidate_offsets,
                             torch.zeros(candidate_items.shape[0], len(tasks)), tasks,
                             {name: contextual[:, f] for f, name in enumerate(self.model.contextual_names)})
        return self.model(batch)


def _example(model: DlrmHSTU, history: Sequence[int], cands: Sequence[int], seed: int) -> tuple:
    """Jagged inputs of JaggedDlrmHSTU: users with `history[b]` events and `cands[b]` candidates."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, model.num_items, (sum(history),), generator=g)
    actions = torch.randint(0, 2 ** model.num_action_bits, (sum(history),), generator=g)
    times = torch.arange(sum(history), dtype=torch.long) * 3600 + 1_600_000_000
    offsets = torch.tensor([0, *history]).cumsum(0)
    cand_items = torch.randint(1, model.num_items, (sum(cands),), generator=g)
    cand_times = torch.full((sum(cands),), 1_700_000_000, dtype=torch.long)
    cand_offsets = torch.tensor([0, *cands]).cumsum(0)
    ctx = torch.stack([torch.randint(0, int(model.contextual_cardinalities[name]), (len(history),), generator=g)
                       for name in model.contextual_names], 1) if model.num_contextual else \
        torch.zeros(len(history), 0, dtype=torch.long)
    return items, actions, times, offsets, cand_items, cand_times, cand_offsets, ctx


def trace_ranking_model(model: DlrmHSTU) -> torch.jit.ScriptModule:
    """TorchScript of `model` (eval mode, pure-PyTorch attention) taking the jagged tensors of JaggedDlrmHSTU,
    checked against the eager model on a second batch of another shape."""
    if not isinstance(model, DlrmHSTU):
        raise ValueError(f"export_ranking_ensemble needs a trained merlin_hstu.ranking.model.DlrmHSTU, got "
                         f"{type(model).__name__} (ranking export serves model.type dlrm-hstu runs; the "
                         "dlrm-baseline / item-prior baselines are benchmark references and are not exported)")
    model = copy.deepcopy(model).eval().requires_grad_(False).cpu()
    model.config.kernel = "pytorch"  # the artifact runs anywhere; Triton kernels are not traceable
    model.encoder.config.kernel = "pytorch"
    c, per, n = model.num_contextual, model.tokens_per_event, model.config.max_seq_len
    # user 0 fills exactly N tokens (see the module docstring); user 1 is short, so no shape equals another's
    history = max((n - c - 1) // per, 1)
    cands = [n - c - per * history, 1]
    if cands[0] < 1:
        raise ValueError(f"DlrmHSTUConfig.max_seq_len={n} leaves no room for one history event and one candidate "
                         f"after {c} contextual tokens")
    wrapper = JaggedDlrmHSTU(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about the model's Python-side checks (dropped on purpose)
        traced = torch.jit.trace(wrapper, _example(model, [history, 1], cands, 0), check_trace=False)
        check = _example(model, [1, max(history // 2, 1), 2], [1, 2, 1], 1)
        want, got = wrapper(*check), traced(*check)
    if want.shape != got.shape or not torch.allclose(want, got, atol=1e-5, rtol=1e-5):
        raise RuntimeError("the traced ranking model disagrees with the eager model on a batch of another shape; "
                           "it cannot be exported as TorchScript")
    return traced


# ------------------------------------------------------------------------------------------------------------
# Operators
# ------------------------------------------------------------------------------------------------------------
def _text_or_int(values: np.ndarray, kind: str) -> np.ndarray:
    """Triton BYTES -> str (the fitted Categorify knows str); "" -> None (missing); integers -> int64."""
    values = np.asarray(values).reshape(-1)
    if kind == "int64":
        return values.astype(np.int64)
    text = [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]
    return np.array([None if v is None or v == "" else str(v) for v in text], dtype=object)


def _workflow_op(workflow, column: str):
    """The fitted op of `workflow` whose selector names `column` (Categorify / RawItemIds)."""
    from merlin.dag import postorder_iter_nodes

    for node in postorder_iter_nodes(workflow.output_node):
        if node.op is not None and hasattr(node.op, "fit") and node.selector is not None \
                and column in node.selector.names:
            return node.op
    raise ValueError(f"the ranking workflow has no fitted op for column {column!r}; export needs the workflow "
                     "written by preprocess_ranking")


class RankingRequestEncoder(InlineWorkflow):
    """Raw request lists -> encoded, chronological, truncated jagged tensors (module docstring's rule)."""

    def __init__(self, workflow=None, meta: Optional[dict] = None, max_seq_len: int = 0, tokens_per_event: int = 1):
        super().__init__(workflow)
        meta = meta or {}
        self.max_uih_len = int(meta.get("max_uih_len", 0))
        self.contextual = list(meta.get("contextual_cardinalities", {}))
        self.max_seq_len = int(max_seq_len)
        self.tokens_per_event = int(tokens_per_event)
        self.kinds = request_kinds(workflow, self.contextual) if workflow is not None else {}
        self._ops: Dict[str, object] = {}  # column -> fitted op, found once per loaded workflow

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("workflow", "_ops")}

    def load_artifacts(self, artifact_path: Optional[str] = None) -> None:
        super().load_artifacts(artifact_path)
        self._ops = {}

    def compute_input_schema(self, root_schema: Schema, parents_schema: Schema, deps_schema: Schema,
                             selector: ColumnSelector) -> Schema:
        return parents_schema + deps_schema

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector,
                              prev_output_schema: Optional[Schema] = None) -> Schema:
        ragged = [ColumnSchema(n, dtype=md.int64, is_list=True, is_ragged=True)
                  for n in (HISTORY_ITEMS, HISTORY_ACTIONS, HISTORY_TIMES, CANDIDATE_ITEMS, _CANDIDATE_TIMES)]
        return Schema(ragged + [ColumnSchema(_CONTEXT, dtype=md.int64, dims=(None, len(self.contextual)))])

    def _encode(self, column: str, values: np.ndarray, kind: str) -> np.ndarray:
        import pandas as pd

        frame = pd.DataFrame({column: _text_or_int(values, kind)})
        if column not in self._ops:
            self._ops[column] = _workflow_op(self.workflow, column)
        op = self._ops[column]
        out = transform_with_nulls(lambda f: op.transform(ColumnSelector([column]), f), frame,
                                   [column] if kind == "string" else [])
        return np.asarray(out[column].to_numpy(), dtype=np.int64)

    def transform(self, col_selector: ColumnSelector, table: TensorTable) -> TensorTable:
        offsets = np.asarray(table[HISTORY_ITEMS].offsets, dtype=np.int64)
        counts = np.diff(offsets)
        cand_offsets = np.asarray(table[CANDIDATE_ITEMS].offsets, dtype=np.int64)
        num_cands = np.diff(cand_offsets)
        times = np.asarray(table[HISTORY_TIMES].values, dtype=np.int64)
        row = np.repeat(np.arange(len(counts)), counts)
        # chronological per row, stable (np.lexsort is), then the most recent max_uih_len events
        order = np.lexsort((times, row))
        position = np.arange(len(order)) - offsets[row]
        kept = np.minimum(counts, self.max_uih_len)
        order = order[position >= (counts - kept)[row]]
        # the traced model cannot check this itself (the contract did, for served requests)
        check_sequence_lengths(counts, num_cands, self.max_uih_len, len(self.contextual), self.tokens_per_event,
                               self.max_seq_len)
        items = self._encode(ITEM_INPUT, np.asarray(table[HISTORY_ITEMS].values)[order], self.kinds[ITEM_INPUT])
        cands = self._encode(ITEM_INPUT, np.asarray(table[CANDIDATE_ITEMS].values), self.kinds[ITEM_INPUT])
        kept_offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
        kept_times = times[order]
        latest = np.maximum.reduceat(kept_times, kept_offsets[:-1])
        query = np.asarray(table[QUERY_TIMESTAMP].values, dtype=np.int64).reshape(-1)
        query = np.where(query < 0, latest, query)
        contextual = [self._encode(CONTEXT_PREFIX + f, np.asarray(table[f].values), self.kinds[f])
                      for f in self.contextual]
        return TensorTable({
            f"{HISTORY_ITEMS}__values": items, f"{HISTORY_ITEMS}__offsets": kept_offsets,
            f"{HISTORY_ACTIONS}__values": np.asarray(table[HISTORY_ACTIONS].values, dtype=np.int64)[order],
            f"{HISTORY_ACTIONS}__offsets": kept_offsets,
            f"{HISTORY_TIMES}__values": kept_times, f"{HISTORY_TIMES}__offsets": kept_offsets,
            f"{CANDIDATE_ITEMS}__values": cands, f"{CANDIDATE_ITEMS}__offsets": cand_offsets,
            f"{_CANDIDATE_TIMES}__values": np.repeat(query, num_cands), f"{_CANDIDATE_TIMES}__offsets": cand_offsets,
            _CONTEXT: (np.stack(contextual, axis=1) if contextual else np.zeros((len(counts), 0), np.int64)),
        })

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.NUMPY_TENSOR_TABLE


class PredictRanking(TorchScriptOp):
    """The traced DLRM-HSTU: encoded jagged tensors -> one ragged output per task (sigmoid for binary tasks)."""

    model_file = MODEL_FILE

    def __init__(self, model=None, tasks: Sequence[Tuple[str, str]] = ()):
        super().__init__()
        self.model = model
        self.tasks = [tuple(t) for t in tasks]  # (name, kind)

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector,
                              prev_output_schema: Optional[Schema] = None) -> Schema:
        return Schema([ColumnSchema(name, dtype=md.float32, is_list=True, is_ragged=True) for name, _ in self.tasks])

    def transform(self, col_selector: ColumnSelector, table: TensorTable) -> TensorTable:
        def t(name: str, part: str = "values") -> Tensor:
            column = table[name]
            return torch.from_numpy(np.ascontiguousarray(getattr(column, part), dtype=np.int64))

        cand_offsets = t(CANDIDATE_ITEMS, "offsets")
        contextual = torch.from_numpy(np.ascontiguousarray(table[_CONTEXT].values, dtype=np.int64))
        with torch.inference_mode():
            out = self.model(t(HISTORY_ITEMS), t(HISTORY_ACTIONS), t(HISTORY_TIMES), t(HISTORY_ITEMS, "offsets"),
                             t(CANDIDATE_ITEMS), t(_CANDIDATE_TIMES), cand_offsets,
                             contextual.reshape(cand_offsets.numel() - 1, -1))
        columns = {}
        for i, (name, kind) in enumerate(self.tasks):
            values = torch.sigmoid(out[:, i]) if kind == "binary" else out[:, i]
            columns[f"{name}__values"] = values.float().numpy()
            columns[f"{name}__offsets"] = cand_offsets.numpy()
        return TensorTable(columns)

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.NUMPY_TENSOR_TABLE


# ------------------------------------------------------------------------------------------------------------
# Build and export
# ------------------------------------------------------------------------------------------------------------
def request_kinds(workflow, contextual: Sequence[str]) -> Dict[str, str]:
    """"int64" or "string" per raw input: the item column and each contextual feature (the workflow's input dtype)."""
    schema = workflow.input_schema

    def kind(column: str) -> str:
        dtype = schema[column].dtype
        return "int64" if dtype.element_type in (md.ElementType.Int, md.ElementType.UInt) else "string"

    return {ITEM_INPUT: kind(ITEM_INPUT), **{f: kind(CONTEXT_PREFIX + f) for f in contextual}}


def _load_parts(model: DlrmHSTU, dataset_dir):
    """(workflow, meta, traced model, contract) for `model` trained on the preprocess_ranking output `dataset_dir`."""
    import nvtabular as nvt

    from merlin_hstu.workflows.ops import RawItemIds

    dataset_dir = Path(dataset_dir)
    meta = read_meta(dataset_dir)
    workflow_dir = dataset_dir / "workflow"
    if not workflow_dir.is_dir():
        raise FileNotFoundError(f"{dataset_dir} has no fitted workflow/ directory; export needs the output of "
                                "preprocess_ranking (processed/, workflow/, ranking.json)")
    traced = trace_ranking_model(model)
    contextual = list(meta["contextual_cardinalities"])
    if tuple(contextual) != tuple(model.contextual_names):
        raise ValueError(f"the model's contextual features {list(model.contextual_names)} differ from the dataset's "
                         f"{contextual} (ranking.json); build the model from this dataset")
    if int(meta["num_items"]) != model.num_items:
        raise ValueError(f"the model has {model.num_items} item rows but the dataset's workflow encodes "
                         f"{meta['num_items']}; build the model from this dataset")
    tasks = [[t.name, t.kind] for t in model.tasks]
    clash = sorted({name for name, _ in tasks} & set(LIST_INPUTS + (QUERY_TIMESTAMP,) + tuple(contextual)))
    if clash:
        raise ValueError(f"task name(s) {clash} collide with request inputs; rename the tasks")
    workflow = nvt.Workflow.load(str(workflow_dir))
    kinds = request_kinds(workflow, contextual)
    item_op = _workflow_op(workflow, ITEM_INPUT)
    raw = isinstance(item_op, RawItemIds)
    contract = RankingContract(
        item_dtype=kinds[ITEM_INPUT], contextual={f: kinds[f] for f in contextual}, tasks=tasks,
        max_uih_len=int(meta["max_uih_len"]), max_seq_len=int(model.config.max_seq_len),
        tokens_per_event=int(model.tokens_per_event), item_encoding="raw" if raw else "categorify",
        max_item_id=int(item_op.max_id) if raw else None)
    return workflow, meta, traced, contract


def _ensemble(workflow, meta: dict, traced, contract: RankingContract, model: DlrmHSTU):
    from merlin.systems.dag.ensemble import Ensemble

    def raw(kind: str):
        return md.int64 if kind == "int64" else md.string

    item = raw(contract.item_dtype)
    columns = [ColumnSchema(HISTORY_ITEMS, dtype=item, is_list=True, is_ragged=True),
               ColumnSchema(HISTORY_ACTIONS, dtype=md.int64, is_list=True, is_ragged=True),
               ColumnSchema(HISTORY_TIMES, dtype=md.int64, is_list=True, is_ragged=True),
               ColumnSchema(CANDIDATE_ITEMS, dtype=item, is_list=True, is_ragged=True),
               ColumnSchema(QUERY_TIMESTAMP, dtype=md.int64)]
    columns += [ColumnSchema(f, dtype=raw(kind)) for f, kind in contract.contextual.items()]
    request = Schema(columns)
    encoder = RankingRequestEncoder(workflow, meta, model.config.max_seq_len, model.tokens_per_event)
    graph = request.column_names >> encoder >> PredictRanking(traced, [tuple(t) for t in contract.tasks])
    return Ensemble(graph, request)


def build_ranking_ensemble(model: DlrmHSTU, dataset_dir):
    """The serving `Ensemble` for `model`, trained on the preprocess_ranking output in `dataset_dir`."""
    workflow, meta, traced, contract = _load_parts(model, dataset_dir)
    return _ensemble(workflow, meta, traced, contract, model)


def ranking_contract(model: DlrmHSTU, dataset_dir) -> RankingContract:
    return _load_parts(model, dataset_dir)[3]


def _example_request(contract: RankingContract) -> dict:
    """One user, one history event, one candidate (an id the workflow maps: raw ids 1, any text otherwise)."""
    item = 1 if contract.item_dtype == "int64" else "x"
    context = {f: (1 if kind == "int64" else "x") for f, kind in contract.contextual.items()}
    return contract.request_arrays([RankingRequest([item], [0], [1_600_000_000], [item], context)])


def export_ranking_ensemble(model: DlrmHSTU, dataset_dir, output, overwrite: bool = False,
                            config: Optional[ExportConfig] = None, source: Optional[dict] = None) -> Path:
    """Write the Triton model repository for `model` (its fitted workflow from `dataset_dir`, the
    preprocess_ranking output it was trained on): one executor model, serving.json; staged, checked, renamed."""
    config = config or ExportConfig()
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; remove it or pass overwrite=True (--overwrite)")
    workflow, meta, traced, contract = _load_parts(model, dataset_dir)
    contract.model_name = config.name_for("ranking")
    ensemble = _ensemble(workflow, meta, traced, contract, model)
    models = [TritonModel(contract.model_name, contract, EXECUTOR_SHIM, ensemble=ensemble, instances=config.instances)]

    def expect(outputs) -> Optional[str]:
        values = outputs[0::2]
        if any(v.shape != (1,) or not np.all(np.isfinite(v)) for v in values):
            return f"per-task scores {[v.tolist() for v in values]} for one candidate"
        return None

    record = {**(source or {}), "data": str(Path(dataset_dir).resolve()),
              "workflow": str((Path(dataset_dir) / "workflow").resolve()), "export": export_settings(config, "ranking"),
              "max_uih_len": int(meta["max_uih_len"]), "model": model.config.to_dict()}
    example = _example_request(contract)
    return write_repository(output, models, record, overwrite=overwrite,
                            check=lambda repo: check_serves(repo, contract, example, expect))


def export_ranking_run(run_dir, output, config: Optional[ExportConfig] = None, data=None,
                       overwrite: bool = False) -> Path:
    """`merlin-hstu export` for a ranking run: its model, and the dataset it records (or `data`)."""
    from merlin_hstu.train.run_dir import load_run

    run = load_run(run_dir, expected_task="ranking")
    dataset_dir = data or run.record.get("data")
    if not dataset_dir:
        raise ValueError(f"{run_dir} does not record its dataset; pass --data with the preprocess-ranking output it "
                         "was trained on")
    return export_ranking_ensemble(run.model, dataset_dir, output, overwrite, config,
                                   source={"run_dir": str(Path(run_dir).resolve()),
                                           "model_type": run.record.get("model_type")})
