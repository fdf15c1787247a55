"""Export a trained DLRM-HSTU ranking model with its fitted ranking workflow for Triton serving.

    repo = export_ranking_ensemble(model, "runs/ranking-data", "runs/ranking_repo")   # preprocess_ranking output
    merlin-hstu serve runs/ranking_repo                                                 # the serving issue's server
    scores = query_ranking("127.0.0.1:8000", [RankingRequest(history_item_ids=[...], history_actions=[...],
                           history_timestamps=[...], candidate_item_ids=[...], contextual={"age": 25})])
    scores.scores["click"]       # [Lc] probabilities, candidates of all requests in order (offsets: scores.offsets)

Request to model "executor_model" (B users per request; list inputs travel as `<name>__values` / `<name>__offsets`):

    history_item_id     ragged [B]   raw item ids (the log's dtype: INT64 or BYTES), any order
    history_action      ragged [B]   INT64 action bitmasks, aligned with the items
    history_timestamp   ragged [B]   INT64 unix seconds, aligned with the items
    candidate_item_id   ragged [B]   raw item ids to score
    query_timestamp     [B] INT64    the candidates' query time; < 0: the latest history time (the workflow's rule)
    <feature>           [B]          one raw value per contextual feature (ranking.json), the log's dtype

Response: one ragged FP32 output per task (`<task>__values` [Lc], `<task>__offsets` [B+1]): sigmoid(logit) for a
binary task, the predicted value for a regression task.

Graph (merlin-systems executor, merlin-integration.md section 3.3 design B, as `merlin_hstu.serving.ctr`):

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
attention normaliser is the constant N, so this changes no number.  The trace drops the model's Python-side
checks, so the encoder checks what they checked (sequence length <= N) before calling it.
"""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

import merlin.dtypes as md
from merlin.dag import ColumnSelector, DataFormats
from merlin.schema import ColumnSchema, Schema
from merlin.table import TensorTable

from merlin_hstu.serving.ctr import InlineWorkflow, TorchScriptOp, write_repository
from merlin_hstu.ranking.model import DlrmHSTU
from merlin_hstu.ranking.batch import RankingBatch
from merlin_hstu.ranking.data import CONTEXT_PREFIX, read_meta

HISTORY_ITEMS = "history_item_id"
HISTORY_ACTIONS = "history_action"
HISTORY_TIMES = "history_timestamp"
CANDIDATE_ITEMS = "candidate_item_id"
QUERY_TIMESTAMP = "query_timestamp"
LIST_INPUTS = (HISTORY_ITEMS, HISTORY_ACTIONS, HISTORY_TIMES, CANDIDATE_ITEMS)
# encoder -> model columns
_CANDIDATE_TIMES = "candidate_timestamp"
_CONTEXT = "contextual"  # [B, c] encoded contextual values
ITEM_INPUT = "item_id"  # the ranking workflow's item column (after normalize_ranking_log)
MODEL_FILE = "ranking_model.pt"
RANKING_RECORD = "ranking_serving.json"


class RankingServingError(ValueError):
    """A ranking request the exported model cannot score; the message names the field and the fix."""


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


def trace_ranking_model(model: DlrmHSTU) -> torch.jit.ScriptModule:
    """TorchScript of `model` (eval mode, pure-PyTorch attention) taking the jagged tensors of JaggedDlrmHSTU."""
    if not isinstance(model, DlrmHSTU):
        raise ValueError(f"export_ranking_ensemble needs a trained merlin_hstu.ranking.model.DlrmHSTU, got "
                         f"{type(model).__name__} (ranking runs are not saved as directories; pass the model)")
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
    lengths = [history, 1]
    g = torch.Generator().manual_seed(0)
    items = torch.randint(1, model.num_items, (sum(lengths),), generator=g)
    actions = torch.randint(0, 2 ** model.num_action_bits, (sum(lengths),), generator=g)
    times = torch.arange(sum(lengths), dtype=torch.long) * 3600 + 1_600_000_000
    offsets = torch.tensor([0] + lengths).cumsum(0)
    cand_items = torch.randint(1, model.num_items, (sum(cands),), generator=g)
    cand_times = torch.full((sum(cands),), 1_700_000_000, dtype=torch.long)
    cand_offsets = torch.tensor([0] + cands).cumsum(0)
    ctx = torch.zeros(2, c, dtype=torch.long)
    example = (items, actions, times, offsets, cand_items, cand_times, cand_offsets, ctx)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about the model's Python-side checks (dropped on purpose)
        return torch.jit.trace(JaggedDlrmHSTU(model), example, check_trace=False)


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
        out = self._ops[column].transform(ColumnSelector([column]), frame)
        return np.asarray(out[column].to_numpy(), dtype=np.int64)

    def transform(self, col_selector: ColumnSelector, table: TensorTable) -> TensorTable:
        offsets = np.asarray(table[HISTORY_ITEMS].offsets, dtype=np.int64)
        for name in (HISTORY_ACTIONS, HISTORY_TIMES):
            if not np.array_equal(np.asarray(table[name].offsets, dtype=np.int64), offsets):
                raise RankingServingError(f"{name} must have one value per history_item_id in every row")
        counts = np.diff(offsets)
        cand_offsets = np.asarray(table[CANDIDATE_ITEMS].offsets, dtype=np.int64)
        num_cands = np.diff(cand_offsets)
        if (counts < 1).any() or (num_cands < 1).any():
            raise RankingServingError("every request row needs >= 1 history event (history_item_id) and >= 1 "
                                      "candidate (candidate_item_id)")
        times = np.asarray(table[HISTORY_TIMES].values, dtype=np.int64)
        row = np.repeat(np.arange(len(counts)), counts)
        # chronological per row, stable (np.lexsort is), then the most recent max_uih_len events
        order = np.lexsort((times, row))
        position = np.arange(len(order)) - offsets[row]
        kept = np.minimum(counts, self.max_uih_len)
        order = order[position >= (counts - kept)[row]]
        tokens = len(self.contextual) + self.tokens_per_event * kept + num_cands
        if (tokens > self.max_seq_len).any():
            b = int(np.argmax(tokens > self.max_seq_len))
            raise RankingServingError(
                f"candidate_item_id: request row {b} has {num_cands[b]} candidates; with {kept[b]} history events "
                f"and {len(self.contextual)} contextual tokens its sequence has {tokens[b]} tokens > the model's "
                f"max_seq_len={self.max_seq_len}; send at most {self.max_seq_len - tokens[b] + num_cands[b]} "
                "candidates for this user per request")
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


def build_ranking_ensemble(model: DlrmHSTU, dataset_dir):
    """The serving `Ensemble` for `model`, trained on the preprocess_ranking output in `dataset_dir`."""
    import nvtabular as nvt
    from merlin.systems.dag.ensemble import Ensemble

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
    tasks = [(t.name, t.kind) for t in model.tasks]
    clash = sorted({name for name, _ in tasks} & set(LIST_INPUTS + (QUERY_TIMESTAMP,) + tuple(contextual)))
    if clash:
        raise ValueError(f"task name(s) {clash} collide with request inputs; rename the tasks")
    workflow = nvt.Workflow.load(str(workflow_dir))
    kinds = request_kinds(workflow, contextual)

    def raw(kind: str):
        return md.int64 if kind == "int64" else md.string

    columns = [ColumnSchema(HISTORY_ITEMS, dtype=raw(kinds[ITEM_INPUT]), is_list=True, is_ragged=True),
               ColumnSchema(HISTORY_ACTIONS, dtype=md.int64, is_list=True, is_ragged=True),
               ColumnSchema(HISTORY_TIMES, dtype=md.int64, is_list=True, is_ragged=True),
               ColumnSchema(CANDIDATE_ITEMS, dtype=raw(kinds[ITEM_INPUT]), is_list=True, is_ragged=True),
               ColumnSchema(QUERY_TIMESTAMP, dtype=md.int64)]
    columns += [ColumnSchema(f, dtype=raw(kinds[f])) for f in contextual]
    request = Schema(columns)
    encoder = RankingRequestEncoder(workflow, meta, model.config.max_seq_len, model.tokens_per_event)
    graph = request.column_names >> encoder >> PredictRanking(traced, tasks)
    return Ensemble(graph, request)


def export_ranking_ensemble(model: DlrmHSTU, dataset_dir, output, overwrite: bool = False) -> Path:
    """Write the Triton model repository (executor_model + artifacts + ranking_serving.json); temp dir, rename.

    `dataset_dir` is the preprocess_ranking output the model was trained on (workflow/ and ranking.json)."""
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; remove it or pass overwrite=True")
    ensemble = build_ranking_ensemble(model, dataset_dir)
    meta = read_meta(dataset_dir)
    record = {"dataset": str(Path(dataset_dir).resolve()), "model": "executor_model",
              "tasks": [{"name": t.name, "kind": t.kind} for t in model.tasks],
              "contextual": list(meta["contextual_cardinalities"]), "max_uih_len": int(meta["max_uih_len"]),
              "max_seq_len": model.config.max_seq_len, "model_config": model.config.to_dict()}
    return write_repository(_WithRecord(ensemble, record), output, overwrite=True)


class _WithRecord:
    """Ensemble.export plus the serving record (ranking_serving.json) in the same staging directory."""

    def __init__(self, ensemble, record: dict):
        self.ensemble, self.record = ensemble, record

    def export(self, path: str) -> None:
        self.ensemble.export(path)
        (Path(path) / RANKING_RECORD).write_text(json.dumps(self.record, indent=2))


# ------------------------------------------------------------------------------------------------------------
# Client
# ------------------------------------------------------------------------------------------------------------
@dataclass
class RankingRequest:
    """One user's raw request: history events (any order; equal times keep this order), candidates, context."""

    history_item_ids: Sequence
    history_actions: Sequence[int]
    history_timestamps: Sequence[int]
    candidate_item_ids: Sequence
    contextual: Mapping[str, object] = field(default_factory=dict)
    query_timestamp: Optional[int] = None  # None: the latest history time


@dataclass
class RankingScores:
    """Per task [Lc] scores (probabilities for binary tasks), candidates of all requests in request order."""

    scores: Dict[str, np.ndarray]
    offsets: np.ndarray  # [B+1]: request b's candidates are [offsets[b], offsets[b+1])

    def user(self, b: int) -> Dict[str, np.ndarray]:
        return {k: v[self.offsets[b]:self.offsets[b + 1]] for k, v in self.scores.items()}


def _ids(values: Sequence, kind: str) -> np.ndarray:
    if kind == "int64":
        return np.asarray(values, dtype=np.int64)
    return np.array([b"" if v is None else str(v).encode("utf-8") for v in values], dtype=object)


def ranking_inputs(requests: Sequence[RankingRequest], contextual: Sequence[str], datatypes: Mapping[str, str]
                   ) -> list:
    """tritonclient HTTP inputs for `requests` (`datatypes`: Triton datatype per input name, from the model's
    metadata); raises RankingServingError naming the bad field."""
    item_kind = "string" if datatypes[f"{HISTORY_ITEMS}__values"] == "BYTES" else "int64"
    import tritonclient.http as th

    if not requests:
        raise RankingServingError("query_ranking needs at least one RankingRequest")
    lists: Dict[str, List[np.ndarray]] = {name: [] for name in LIST_INPUTS}
    for b, r in enumerate(requests):
        n = len(r.history_item_ids)
        for name, values in (("history_actions", r.history_actions), ("history_timestamps", r.history_timestamps)):
            if len(values) != n:
                raise RankingServingError(f"request {b}: {name} has {len(values)} values but history_item_ids has "
                                          f"{n}; send one action bitmask and one timestamp per history event")
        if n < 1 or len(r.candidate_item_ids) < 1:
            raise RankingServingError(f"request {b}: needs >= 1 history event and >= 1 candidate_item_ids")
        missing = [f for f in contextual if f not in r.contextual]
        if missing:
            raise RankingServingError(f"request {b}: contextual lacks {missing}; the model was trained with "
                                      f"contextual features {list(contextual)} (None = missing value)")
        lists[HISTORY_ITEMS].append(_ids(r.history_item_ids, item_kind))
        lists[HISTORY_ACTIONS].append(np.asarray(r.history_actions, dtype=np.int64))
        lists[HISTORY_TIMES].append(np.asarray(r.history_timestamps, dtype=np.int64))
        lists[CANDIDATE_ITEMS].append(_ids(r.candidate_item_ids, item_kind))
    inputs = []

    def add(name: str, array: np.ndarray) -> None:
        dtype = datatypes[name]
        if dtype != "BYTES":
            array = array.astype(th.triton_to_np_dtype(dtype))  # offsets travel as INT32
        inputs.append(th.InferInput(name, list(array.shape), dtype))
        inputs[-1].set_data_from_numpy(array)

    for name, parts in lists.items():
        add(f"{name}__values", np.concatenate(parts))
        add(f"{name}__offsets", np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64))
    add(QUERY_TIMESTAMP, np.array([-1 if r.query_timestamp is None else int(r.query_timestamp) for r in requests],
                                  dtype=np.int64))
    for f in contextual:
        add(f, _ids([r.contextual[f] for r in requests], "string" if datatypes[f] == "BYTES" else "int64"))
    return inputs


def query_ranking(url: str, requests: Union[RankingRequest, Sequence[RankingRequest]],
                  model_name: str = "executor_model") -> RankingScores:
    """Per-task candidate scores from a server running an `export_ranking_ensemble` repository.

    The request contract (task names, contextual features, id dtypes) is read from the model's metadata."""
    import tritonclient.http as th

    requests = [requests] if isinstance(requests, RankingRequest) else list(requests)
    with th.InferenceServerClient(url) as client:
        metadata = client.get_model_metadata(model_name)
        datatypes = {i["name"]: i["datatype"] for i in metadata["inputs"]}
        known = set(LIST_INPUTS) | {QUERY_TIMESTAMP}
        contextual = [i["name"] for i in metadata["inputs"]
                      if i["name"] not in known and i["name"].split("__")[0] not in known]
        tasks = sorted({o["name"].rsplit("__", 1)[0] for o in metadata["outputs"]})
        inputs = ranking_inputs(requests, contextual, datatypes)
        outputs = [th.InferRequestedOutput(f"{t}__{part}") for t in tasks for part in ("values", "offsets")]
        result = client.infer(model_name, inputs, outputs=outputs)
    scores = {t: result.as_numpy(f"{t}__values").reshape(-1) for t in tasks}
    return RankingScores(scores, result.as_numpy(f"{tasks[0]}__offsets").reshape(-1).astype(np.int64))
