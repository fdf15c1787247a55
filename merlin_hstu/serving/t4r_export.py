"""Export a model trained with `tr.Trainer` (docs/t4r.md, "Training with tr.Trainer on our workflows") for Triton,
the Merlin way or through merlin-hstu's endpoint, for each of the three tasks.

    repo  = export_t4r_model(trainer.model, data_dir, "t4r_repo")                   # mode="merlin-hstu"
    stock = export_t4r_model(trainer.model, data_dir, "t4r_stock", mode="stock")    # the standard Merlin graph

`data_dir` is the workflow output the model was trained on: a `merlin-hstu preprocess` directory (retrieval), a
`preprocess-ranking` directory (ranking) or a `preprocess_criteo` directory (CTR); its fitted `workflow/` turns raw
requests into model inputs.  The task is read from the model (`t4r_task`): a `GenerativeRetrievalTask`, a
`DlrmHSTUHead`, or one `BinaryClassificationTask` on tabular features.

mode="stock": the standard merlin-systems graph, exported by merlin-systems (`stock.export_stock_ensemble`):

    workflow.input_schema.column_names >> TransformWorkflow(workflow) >> PredictPyTorch(TorchScript, in, out)
    Ensemble(graph, workflow.input_schema).export(output)

  with the two documented CPU workarounds (merlin-integration.md §3.3 A: the PyTorch node on the python backend;
  UTF-8 text in the workflow node) and node models named after the executor, so the three tasks share a server.
  A request holds the workflow's raw input columns, one row per event (retrieval, ranking) or per example (CTR):

    retrieval  executor `t4r_retrieval_stock`: item_ids [B, K] (raw ids, best first), scores [B, K]
    ranking    executor `t4r_ranking_stock`: candidate_item_ids (raw ids of the candidates the workflow takes: each
               user's last events) and one ragged score list per task (__values [Lc], __offsets [B+1])
    ctr        executor `t4r_ctr_stock`: click_probability [B]

mode="merlin-hstu": our repository format and executor (serving.json, contracts, `ServingClient`, bad requests
answered 400), built by the exporters of the native runs:

    retrieval  `export.write_retrieval_repository`: request >> SessionWorkflowFromRequest >> PredictHSTUTopK
               >> DecodeItemIds, the top-K program a `TopKScorer` around the traced T4R model
    ranking    `ranking.export_ranking_ensemble` of the model's DlrmHSTU (history + named candidates in)
    ctr        `ctr.export_ctr_ensemble` of the traced T4R model (it answers probabilities, not logits)

The TorchScript program is the same in both modes of a task.  A T4R retrieval model sees at most its
`max_sequence_length` L events: both modes keep each user's most recent L (T4R's own padding would keep the
oldest).  It predicts at the last event's time (T4R's masking gives the padded positions that time), so its
contract refuses `query_timestamp`.  Both modes rank every item the T4R task ranks (ids >= its first_item_id) and
drop the user's window with `exclude_history` (ExportConfig; the stock program fixes it at export).
"""
import copy
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from merlin_hstu.common import schema as roles
from merlin_hstu.serving.repository import ExportConfig

TASKS = ("retrieval", "ranking", "ctr")
MODES = ("merlin-hstu", "stock")
STOCK_NAMES = {task: f"t4r_{task}_stock" for task in TASKS}  # the stock executor models (node models: <name>_<i>_*)
CANDIDATE_IDS = "candidate_item_ids"  # stock ranking: the raw ids of the candidates the workflow took


# ------------------------------------------------------------------------------------------------------------
# The task of a T4R model, and the model made ready for TorchScript
# ------------------------------------------------------------------------------------------------------------
def t4r_task(model) -> str:
    """"retrieval" | "ranking" | "ctr" for a `tr.Model` built by merlin_hstu.t4r (retrieval_model_from_schema,
    ranking_model_from_schema, wukong_ctr_model or the same heads by hand)."""
    import transformers4rec.torch as tr

    from merlin_hstu.t4r.ranking import DlrmHSTUHead
    from merlin_hstu.t4r.retrieval import GenerativeRetrievalTask

    if not isinstance(model, tr.Model):
        raise ValueError(f"export_t4r_model needs a transformers4rec tr.Model (what tr.Trainer trains), got "
                         f"{type(model).__name__}; export native runs with `merlin-hstu export --run RUN`")
    if len(model.heads) != 1:
        raise ValueError(f"export_t4r_model serves a model with one head, this one has {len(model.heads)}")
    head = model.heads[0]
    if isinstance(head, DlrmHSTUHead):
        return "ranking"
    tasks = list(head.prediction_task_dict.values())
    if len(tasks) == 1 and isinstance(tasks[0], GenerativeRetrievalTask):
        return "retrieval"
    if len(tasks) == 1 and isinstance(tasks[0], tr.BinaryClassificationTask):
        return "ctr"
    raise ValueError(f"export_t4r_model serves GenerativeRetrievalTask, DlrmHSTUHead or one BinaryClassificationTask "
                     f"heads; this model's head has {[type(t).__name__ for t in tasks]}")


_TRACEABLE = {}


def _traceable_class(cls):
    """`cls` (a T4R EmbeddingFeatures class) whose `item_embedding_table` is None when no feature is the item id.

    Why: T4R's property asserts `item_id is not None`, and torch.jit.trace reads every attribute of every module,
    so a tabular (CTR) model, which has no item id, cannot be traced as it is.  Only the copy being traced gets
    this class; the traced program holds no Python class."""
    if cls not in _TRACEABLE:
        def item_embedding_table(self):
            return None if self.item_id is None else self.embedding_tables[self.item_id]

        _TRACEABLE[cls] = type(cls.__name__, (cls,), {"item_embedding_table": property(item_embedding_table)})
    return _TRACEABLE[cls]


def _inference_copy(model):
    """A copy in eval mode without gradients, on the CPU, T4R's top-k off (the program ranks itself), with the
    pure-PyTorch attention (Triton kernels are not traceable) and traceable embedding blocks."""
    from transformers4rec.torch.features.embedding import EmbeddingFeatures

    model = copy.deepcopy(model).eval().requires_grad_(False).cpu()
    model.top_k = None
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "kernel"):
            config.kernel = "pytorch"
        if isinstance(module, EmbeddingFeatures) and module.item_id is None:
            module.__class__ = _traceable_class(type(module))
    return model


def _trace(module: nn.Module, example: tuple, check: tuple, what: str):
    """torch.jit.trace, checked against the eager module on an input of other shapes (1e-5)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python-side checks and shapes frozen on purpose
        traced = torch.jit.trace(module, example, check_trace=False)
        want, got = module(*check), traced(*check)
    finite = torch.isfinite(want)
    if want.shape != got.shape or not torch.equal(finite, torch.isfinite(got)) or \
            not torch.allclose(want[finite], got[finite], atol=1e-5, rtol=1e-5):
        raise RuntimeError(f"the traced {what} disagrees with the eager T4R model on a batch of another shape; it "
                           "cannot be exported as TorchScript")
    return traced


def _check_data(data) -> Path:
    data = Path(data)
    if not (data / "workflow").is_dir():
        raise FileNotFoundError(f"{data} has no fitted workflow/ directory; pass the workflow output the model was "
                                "trained on (merlin-hstu preprocess / preprocess-ranking / preprocess_criteo)")
    return data


# ------------------------------------------------------------------------------------------------------------
# Retrieval
# ------------------------------------------------------------------------------------------------------------
class T4RRetrievalScores(nn.Module):
    """Traceable: `TopKScorer.window`'s padded window [B, L + 1] -> the T4R model's scores of every item [B, V].

    The window has one column more than the model's L = max_sequence_length (the native query-time slot); it
    is never a real event here, so the model sees the first L columns, right-padded as T4R's loader pads."""

    def __init__(self, model, item_list: str, time_list: Optional[str], action_list: Optional[str]):
        super().__init__()
        self.model = model
        self.item_list, self.time_list, self.action_list = item_list, time_list, action_list
        self.width = int(model.max_sequence_length)

    def forward(self, ids: Tensor, lengths: Tensor, times: Tensor, actions: Tensor) -> Tensor:
        inputs = {self.item_list: ids[:, :self.width]}
        if self.time_list:
            inputs[self.time_list] = times[:, :self.width]
        if self.action_list:
            inputs[self.action_list] = actions[:, :self.width]
        return self.model(inputs)


def _retrieval_columns(model, workflow) -> Tuple[str, Optional[str], Optional[str]]:
    """(item list, timestamp list or None, action list or None) the T4R model reads, named by the workflow."""
    out = workflow.output_schema
    reads = list(model.input_schema.column_names)
    item_list = roles.item_list_column(out)
    time_list = roles.timestamp_list_column(out)
    action_list = roles.action_list_column(out)
    if item_list not in reads:
        raise ValueError(f"the model reads {reads}, not the workflow's item list {item_list!r}; export it with the "
                         "workflow output it was trained on")
    served = {item_list, time_list, action_list} - {None}
    other = [c for c in reads if c not in served]
    if other:
        raise ValueError(f"the model reads column(s) {other} that retrieval serving does not build (it serves the "
                         f"item, timestamp and action lists {sorted(served)}); train without them to export")
    return (item_list, time_list if time_list in reads else None, action_list if action_list in reads else None)


def build_t4r_scorer(model, workflow) -> Tuple[torch.jit.ScriptModule, Tuple[str, Optional[str], Optional[str]]]:
    """The top-K program of a T4R retrieval model: `merlin_hstu.serving.scorer.TopKScorer` (the program native
    exports serve) around the traced T4R model, with the model's L as the history window; -> (program, the lists
    it reads)."""
    from merlin_hstu.serving.scorer import TopKScorer

    model = _inference_copy(model)
    columns = _retrieval_columns(model, workflow)
    task = model.heads[0].prediction_task_dict
    output = next(iter(task.values())).output
    rankable = output.rankable.clone()
    num_items, width = rankable.shape[0], int(model.max_sequence_length or 0)
    if width < 1:
        raise ValueError("the T4R model has no max_sequence_length; build it with retrieval_model_from_schema "
                         "(tr.Model(..., max_sequence_length=L))")
    if int(rankable.sum()) - width < 1:
        raise ValueError(f"only {int(rankable.sum())} rankable items for a history window of {width}: top-K needs "
                         "more candidates than history items")
    scores = T4RRetrievalScores(model, *columns)
    first = int(torch.nonzero(rankable)[0])

    def window(lengths: List[int], seed: int) -> tuple:
        g = torch.Generator().manual_seed(seed)
        ids = torch.zeros(len(lengths), width + 1, dtype=torch.long)
        times = torch.zeros_like(ids)
        for b, n in enumerate(lengths):
            ids[b, :n] = torch.randint(first, num_items, (n,), generator=g)
            times[b, :n + 1] = 1_600_000_000 + 3600 * torch.arange(n + 1)
        actions = (ids > 0).long()  # id 1 (null) is a row of every action table
        return ids, torch.tensor(lengths), times, actions

    traced = _trace(scores, window([width, 3], 0), window([1, 5, width, 2], 1), "retrieval model")
    scorer = TopKScorer(traced, torch.jit.script(nn.Identity()), rankable, width, columns[2] is not None)
    return torch.jit.script(scorer.eval()), columns


def session_columns(data: Path) -> SimpleNamespace:
    """The raw id / item / action / timestamp columns of a session-workflow output (its data_report.json)."""
    from merlin_hstu.workflows.session_workflow import DATA_REPORT_FILE, read_data_report

    report = read_data_report(data)
    if not report or "columns" not in report:
        raise FileNotFoundError(f"{data}/{DATA_REPORT_FILE} (which names the raw columns) is missing; re-run "
                                "`merlin-hstu preprocess` to write it")
    c = report["columns"]
    return SimpleNamespace(id_column=c["id"], item_column=c[roles.ROLE_ITEM],
                           action_column=c.get(roles.ROLE_ACTION), timestamp_column=c.get(roles.ROLE_TIMESTAMP))


def retrieval_serving_parts(model, data, config: ExportConfig, prune: bool = True):
    """`export.ServingParts` of a T4R retrieval model: the serving workflow, the top-K program, the item mapping
    and the request contract.  `prune`: drop the workflow's action branch when nothing reads it."""
    from merlin_hstu.serving.contract import RequestContract
    from merlin_hstu.serving.export import ServingParts, _dtype_kind, _raw_columns, item_ids_of
    from merlin_hstu.workflows.session_workflow import load_serving_workflow

    data = _check_data(data)
    workflow_path = data / "workflow"
    workflow = load_serving_workflow(workflow_path)
    columns = session_columns(data)
    raw_columns = _raw_columns(columns, workflow, workflow_path)
    kinds = {c: _dtype_kind(workflow.input_schema[c].dtype) for c in raw_columns}
    scorer, (item_list, time_list, action_list) = build_t4r_scorer(model, workflow)
    action_column = columns.action_column if columns.action_column in raw_columns else None
    timestamp_column = columns.timestamp_column if columns.timestamp_column in raw_columns else None
    reads_actions = bool(action_column) and (
        action_list is not None or not prune or roles.interleaved_list_column(workflow.output_schema) is not None)
    if action_column and not reads_actions:
        workflow.remove_inputs([action_column])  # as export.load_serving_parts: the branch nothing reads
    items = item_ids_of(workflow, workflow_path)
    num_items = int(scorer.rankable.shape[0])
    if len(items.mapping) != num_items:
        raise ValueError(f"the workflow encodes {len(items.mapping)} item ids but the model scores {num_items}; "
                         f"{workflow_path} is not the workflow this model was trained on")
    if bool(scorer.rankable[:items.first_id].any()):
        raise ValueError(f"the model's task ranks ids below {items.first_id}, which are padding / null / OOV rows of "
                         "this workflow; build the task with first_item_id=" + str(items.first_id))
    mapping = items.mapping
    item_kind = kinds[columns.item_column]
    if items.encoding == "categorify" and item_kind == "int64":
        mapping = np.array([-1 if v is None else int(v) for v in mapping], dtype=np.int64)
    if config.top_k > scorer.max_k:
        raise ValueError(f"top_k={config.top_k} is larger than this catalogue allows: {int(scorer.rankable.sum())} "
                         f"rankable items minus a history window of {scorer.max_history} = {scorer.max_k}")
    contract = RequestContract(
        id_column=columns.id_column, id_dtype=kinds[columns.id_column], item_column=columns.item_column,
        item_dtype=item_kind, action_column=action_column, action_dtype=kinds.get(action_column),
        reads_actions=reads_actions, timestamp_column=timestamp_column, max_history=int(scorer.max_history),
        max_k=int(scorer.max_k), default_k=config.top_k, exclude_history=config.exclude_history,
        model_name=config.name_for("retrieval"), batched_model_name=config.batched_name,
        item_encoding=items.encoding, max_item_id=items.max_id, query_time=False,
        extra={"item_list": item_list, "uses_time": time_list is not None,
               **({"action_list": action_list} if action_list else {})})
    return ServingParts(None, model, None, {}, workflow, workflow_path, scorer, mapping, contract, None,
                        items.first_id)


def _export_retrieval(model, data, output, mode: str, config: ExportConfig, overwrite: bool) -> Path:
    import merlin.dtypes as md
    from merlin.schema import ColumnSchema, Schema

    from merlin_hstu.serving.contract import OUT_ITEM_IDS, OUT_SCORES
    from merlin_hstu.serving.export import write_retrieval_repository
    from merlin_hstu.serving.repository import export_settings
    from merlin_hstu.serving.stock import StockScorer, export_stock_ensemble

    # the stock graph runs the whole fitted workflow, exactly as TransformWorkflow(wf) does
    parts = retrieval_serving_parts(model, data, config, prune=mode == "merlin-hstu" and config.prune_unused_inputs)
    if mode == "merlin-hstu":
        record = {**_source(model, data), "workflow": str(parts.workflow_path.resolve()),
                  "export": export_settings(config, "retrieval")}
        return write_retrieval_repository(parts, Path(output).resolve(), config, record, overwrite)
    c = parts.contract
    if c.extra.get("action_list"):
        raise ValueError("the model reads the action list; the stock program feeds it item and time lists only: "
                         "export it with mode='merlin-hstu'")
    if c.item_dtype != "int64":
        raise ValueError(f"the raw item ids ({c.item_column!r}) are text; a TorchScript program cannot answer text, "
                         "so the stock graph cannot return raw ids: export with mode='merlin-hstu'")
    item_list = c.extra["item_list"]
    time_list = roles.timestamp_list_column(parts.workflow.output_schema) if c.extra["uses_time"] else None
    raw_ids = torch.from_numpy(np.asarray(parts.item_mapping, dtype=np.int64))
    k = int(config.top_k)
    program = torch.jit.script(StockScorer(parts.scorer, item_list, time_list or "", k, config.exclude_history,
                                           raw_ids))
    model_in = Schema([ColumnSchema(n, dtype=md.int64, is_list=True, is_ragged=True) for n in (item_list, time_list)
                       if n])
    model_out = Schema([ColumnSchema(OUT_SCORES, dtype=md.float32, dims=(None, k)),
                        ColumnSchema(OUT_ITEM_IDS, dtype=md.int64, dims=(None, k))])
    return export_stock_ensemble(parts.workflow, program, model_in, model_out, output,
                                 name=config.model_name or STOCK_NAMES["retrieval"], overwrite=overwrite)


# ------------------------------------------------------------------------------------------------------------
# Ranking
# ------------------------------------------------------------------------------------------------------------
class StockRankingModel(nn.Module):
    """PredictPyTorch's program for ranking: the ranking workflow's outputs (ragged history and candidate lists,
    query time, contextual ids) -> [raw candidate ids, their offsets, then per task values and offsets] (sigmoid for
    binary tasks), around the traced DlrmHSTU of `ranking.trace_ranking_model`."""

    contextual: List[str]
    num_tasks: int

    def __init__(self, traced, history: Dict[str, str], candidate: str, query_time: str, contextual: List[str],
                 binary: Tensor, raw_ids: Tensor):
        super().__init__()
        self.model = traced
        self.items, self.actions = history[roles.ROLE_ITEM], history[roles.ROLE_ACTION]
        self.times = history[roles.ROLE_TIMESTAMP]
        self.candidate, self.query_time, self.contextual = candidate, query_time, contextual
        self.register_buffer("binary", binary)
        self.register_buffer("raw_ids", raw_ids)
        self.num_tasks = int(binary.shape[0])

    def forward(self, feats: Dict[str, Tensor]) -> List[Tensor]:
        offsets = feats[self.items + "__offsets"].long()
        candidates = feats[self.candidate + "__values"].long()
        cand_offsets = feats[self.candidate + "__offsets"].long()
        query = feats[self.query_time].reshape(-1).long()
        cand_times = torch.repeat_interleave(query, cand_offsets[1:] - cand_offsets[:-1])
        batch = offsets.shape[0] - 1
        contextual = torch.zeros(batch, 0, dtype=torch.long)
        if len(self.contextual) > 0:
            contextual = torch.stack([feats[c].reshape(-1).long() for c in self.contextual], 1)
        out = self.model(feats[self.items + "__values"].long(), feats[self.actions + "__values"].long(),
                         feats[self.times + "__values"].long(), offsets, candidates, cand_times, cand_offsets,
                         contextual)
        out = torch.where(self.binary.unsqueeze(0), torch.sigmoid(out), out)
        result = [self.raw_ids[candidates], cand_offsets]
        for t in range(self.num_tasks):
            result.append(out[:, t].contiguous().float())
            result.append(cand_offsets)
        return result


def _ranking_dlrm(model):
    block = model.heads[0].body
    return block, block.model


def _export_ranking(model, data, output, mode: str, config: ExportConfig, overwrite: bool) -> Path:
    import merlin.dtypes as md
    import nvtabular as nvt
    from merlin.schema import ColumnSchema, Schema

    from merlin_hstu.ranking.data import CONTEXT_PREFIX
    from merlin_hstu.serving.export import item_ids_of
    from merlin_hstu.serving.ranking import ITEM_INPUT, export_ranking_ensemble, trace_ranking_model
    from merlin_hstu.serving.stock import export_stock_ensemble

    data = _check_data(data)
    block, dlrm = _ranking_dlrm(_inference_copy(model))
    if mode == "merlin-hstu":
        return export_ranking_ensemble(dlrm, data, output, overwrite, config, source=_source(model, data))
    workflow_path = data / "workflow"
    workflow = nvt.Workflow.load(str(workflow_path))
    out = workflow.output_schema
    contextual = []
    for name in dlrm.contextual_names:
        column = block.contextual_columns.get(name)
        contextual.append(column or (CONTEXT_PREFIX + name if CONTEXT_PREFIX + name in out.column_names else name))
    lists = [block.history_columns[k] for k in (roles.ROLE_ITEM, roles.ROLE_ACTION, roles.ROLE_TIMESTAMP)]
    lists.append(block.candidate_column)
    missing = [c for c in lists + [block.query_time_column] + contextual if c not in out.column_names]
    if missing:
        raise ValueError(f"the model reads column(s) {missing} that the workflow at {workflow_path} does not write")
    items = item_ids_of(workflow, workflow_path)
    if items.encoding == "categorify":
        if workflow.input_schema[ITEM_INPUT].dtype.element_type not in (md.ElementType.Int, md.ElementType.UInt):
            raise ValueError("the raw item ids are text; a TorchScript program cannot answer text, so the stock "
                             "graph cannot return raw candidate ids: export with mode='merlin-hstu'")
        raw_ids = np.array([-1 if v is None else int(v) for v in items.mapping], dtype=np.int64)
    else:
        raw_ids = np.asarray(items.mapping, dtype=np.int64)
    binary = torch.tensor([t.kind == "binary" for t in dlrm.tasks], dtype=torch.bool)
    program = torch.jit.script(StockRankingModel(trace_ranking_model(dlrm), block.history_columns,
                                                 block.candidate_column, block.query_time_column, contextual,
                                                 binary, torch.from_numpy(raw_ids)))
    model_in = Schema([ColumnSchema(c, dtype=out[c].dtype, is_list=True, is_ragged=True) for c in lists]
                      + [ColumnSchema(c, dtype=out[c].dtype) for c in [block.query_time_column] + contextual])
    model_out = Schema([ColumnSchema(CANDIDATE_IDS, dtype=md.int64, is_list=True, is_ragged=True)]
                       + [ColumnSchema(t.name, dtype=md.float32, is_list=True, is_ragged=True) for t in dlrm.tasks])
    return export_stock_ensemble(workflow, program, model_in, model_out, output,
                                 name=config.model_name or STOCK_NAMES["ranking"], overwrite=overwrite)


# ------------------------------------------------------------------------------------------------------------
# CTR
# ------------------------------------------------------------------------------------------------------------
class T4RCTRModel(nn.Module):
    """Traceable: dense [B, m] float32 and sparse [B, c] int64 feature matrices (`ctr.PredictCTR`'s call) -> the
    T4R model's click probabilities [B]; each column goes to the model under its name."""

    def __init__(self, model, dense: List[str], sparse: List[str]):
        super().__init__()
        self.model, self.dense, self.sparse = model, list(dense), list(sparse)
        reads = set(model.input_schema.column_names)
        self.read = [(name, i, True) for i, name in enumerate(self.dense) if name in reads] + \
                    [(name, i, False) for i, name in enumerate(self.sparse) if name in reads]
        unknown = sorted(reads - set(self.dense) - set(self.sparse))
        if unknown:
            raise ValueError(f"the model reads column(s) {unknown} that the Criteo workflow does not write "
                             f"(continuous {self.dense}, categorical {self.sparse}); export it with the workflow "
                             "output it was trained on")

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        inputs = {name: (dense[:, i] if is_dense else sparse[:, i]) for name, i, is_dense in self.read}
        return self.model(inputs).reshape(-1)


class StockCTRModel(nn.Module):
    """PredictPyTorch's program for CTR: the Criteo workflow's output columns -> click probabilities [B]."""

    dense: List[str]
    sparse: List[str]

    def __init__(self, traced, dense: List[str], sparse: List[str]):
        super().__init__()
        self.model, self.dense, self.sparse = traced, list(dense), list(sparse)

    def forward(self, feats: Dict[str, Tensor]) -> Tensor:
        dense = torch.stack([feats[c].reshape(-1).float() for c in self.dense], 1)
        sparse = torch.stack([feats[c].reshape(-1).long() for c in self.sparse], 1)
        return self.model(dense, sparse)


def _export_ctr(model, data, output, mode: str, config: ExportConfig, overwrite: bool) -> Path:
    import merlin.dtypes as md
    from merlin.schema import ColumnSchema, Schema

    from merlin_hstu.serving.ctr import _features, export_ctr_ensemble
    from merlin_hstu.serving.ctr_contract import OUTPUT
    from merlin_hstu.serving.stock import export_stock_ensemble

    data = _check_data(data)
    workflow, dense, sparse, _ = _features(data)
    adapter = T4RCTRModel(_inference_copy(model), dense, sparse)
    g = torch.Generator().manual_seed(0)
    check = (torch.randn(5, len(dense), generator=g), torch.randint(0, 2, (5, len(sparse)), generator=g))
    traced = _trace(adapter, (torch.zeros(2, len(dense)), torch.zeros(2, len(sparse), dtype=torch.long)), check,
                    "CTR model")
    if mode == "merlin-hstu":  # (ctr._traced hands an already traced program back as it is)
        return export_ctr_ensemble(traced, data, output, overwrite, config, source=_source(model, data),
                                   probabilities=True)
    program = torch.jit.script(StockCTRModel(traced, dense, sparse))
    out = workflow.output_schema
    model_in = Schema([ColumnSchema(c, dtype=out[c].dtype) for c in dense + sparse])
    model_out = Schema([ColumnSchema(OUTPUT, dtype=md.float32)])
    return export_stock_ensemble(workflow, program, model_in, model_out, output,
                                 name=config.model_name or STOCK_NAMES["ctr"], overwrite=overwrite)


# ------------------------------------------------------------------------------------------------------------
# Requests to a stock repository
# ------------------------------------------------------------------------------------------------------------
_NUMPY = {"TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_FP64": np.float64, "TYPE_FP32": np.float32,
          "TYPE_BOOL": np.bool_}


def stock_request(model_config: dict, frame) -> Dict[str, np.ndarray]:
    """The inputs of a stock executor model from a frame with one row per event (retrieval, ranking) or example
    (CTR): one 1-D array per input of `model_config` (the model's Triton config as `get_model_config` answers
    it), text as UTF-8 bytes ("" for a missing value), numbers in the config's dtype."""
    arrays = {}
    names = [spec["name"] for spec in model_config["input"]]
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise ValueError(f"the frame lacks column(s) {missing}; model {model_config.get('name')!r} takes {names} "
                         "(the workflow's raw input columns)")
    for spec in model_config["input"]:
        name, dtype = spec["name"], spec["data_type"]
        values = frame[name].to_numpy()
        if dtype == "TYPE_STRING":
            arrays[name] = np.array([b"" if v is None or (isinstance(v, float) and np.isnan(v)) else
                                     (v if isinstance(v, bytes) else str(v).encode("utf-8")) for v in values],
                                    dtype=object)
        elif dtype in _NUMPY:
            if np.dtype(_NUMPY[dtype]).kind in "iu" and frame[name].isna().any():
                raise ValueError(f"column {name!r} has missing values, but model {model_config.get('name')!r} "
                                 f"takes it as {dtype}")
            arrays[name] = values.astype(_NUMPY[dtype])
        else:
            raise ValueError(f"input {name!r} has Triton dtype {dtype}, which stock_request does not build")
    return arrays


# ------------------------------------------------------------------------------------------------------------
# The entry point
# ------------------------------------------------------------------------------------------------------------
def _source(model, data) -> dict:
    schema = getattr(model, "input_schema", None)  # a ranking head reads columns by name and has none
    return {"trained_with": "transformers4rec tr.Trainer", "model_class": type(model).__name__,
            "data": str(Path(data).resolve()), "model_inputs": list(schema.column_names) if schema else None}


def export_t4r_model(model, data, output, task: Optional[str] = None, mode: str = "merlin-hstu",
                     config: Optional[ExportConfig] = None, overwrite: bool = False) -> Path:
    """Export `model` (a tr.Model trained with tr.Trainer) with the fitted workflow of `data` (the workflow output
    it was trained on) to the Triton model repository `output`; see the module docstring.

    `task`: checked against the model's (default: read from it).  `mode`: "merlin-hstu" (our repository format:
    `merlin-hstu serve` / `ServingClient`) or "stock" (the standard merlin-systems graph).  `config`: the export
    settings (model name, instances; retrieval: top_k, exclude_history).  The repository is written to a staging
    directory and renamed into place; an existing one is replaced only with `overwrite`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    found = t4r_task(model)
    if task is not None and task != found:
        raise ValueError(f"the model is a {found} model (its head), not {task}; drop task= or pass a {task} model")
    config = config or ExportConfig()
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; remove it or pass overwrite=True")
    export = {"retrieval": _export_retrieval, "ranking": _export_ranking, "ctr": _export_ctr}[found]
    return export(model, data, output, mode, config, overwrite)


__all__ = ["export_t4r_model", "t4r_task", "stock_request", "build_t4r_scorer", "retrieval_serving_parts",
           "T4RRetrievalScores", "StockRankingModel", "T4RCTRModel", "StockCTRModel", "STOCK_NAMES", "MODES", "TASKS"]
