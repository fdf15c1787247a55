"""Serving a semantic-ID run through the project's export path: raw request lists in, raw top-K item ids out.

    repo = export_sid_repository("runs/sid/seed-42", "runs/datasets/amazon-s3rec-beauty-h50", "runs/sid_repo")

The repository is the retrieval one (merlin_hstu.serving.export: the dataset's NVTabular session workflow in serving
mode -> one TorchScript program -> raw-id decoding, written and checked by
`merlin_hstu.serving.repository.write_repository`, served by `merlin-hstu serve`, queried with `ServingClient`).
What differs is the program inside, `SIDBeamScorer`, with the retrieval scorer's call (`PredictHSTUTopK` runs it):

    window      the most recent H items of each row (H = the run's data.max_history)
    tokens      [BOS ; tokens(i_1) ; ... ; tokens(i_len)]      the tokenizer's table, a constant of the program
    beams       constrained beam search over the trie of valid tuples (the tables of merlin_hstu.sid.decode, constants),
                the decoder (traced at the fixed width 1 + (H + 1) T) re-run on [history ; beam prefix] at each level
    top-K       the beam list, best first (ties by item id); history items dropped for rows with exclude_history

It is the offline algorithm (`merlin_hstu.sid.decode.beam_search`) step for step; offline decoding reads the history
through the KV cache, the program recomputes it (the `full` engine), so scores agree to float rounding (tested equal
to 1e-5) and the lists are the same.  The served beam width is max(decode.beam_width, top_k + H): even a user whose
whole window is in the beam list keeps K items after the history filter, so `max_k` = beam width - H.  Decoders with
time bias are not served yet (the Amazon S3-Rec files have no timestamps).
"""
import copy
import warnings
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from merlin_hstu.sid.decode import SemanticIdTrie
from merlin_hstu.sid.model import SIDDecoder
from merlin_hstu.sid.tokenizer import BOS_TOKEN, SemanticIds

DEFAULT_MODEL_NAME = "sid_topk"


class _DecoderTower(nn.Module):
    """Traceable view of the decoder: right-padded tokens [N, W], lengths [N] -> hidden state at the last token."""

    def __init__(self, model: SIDDecoder):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        h = self.model.hidden(tokens, lengths)
        return h[torch.arange(tokens.shape[0]), lengths - 1]


class SIDBeamScorer(nn.Module):
    """Scripted serving program (module docstring); the call of `merlin_hstu.serving.scorer.TopKScorer`."""

    max_history: int
    width: int
    max_k: int
    beam_width: int
    levels: int
    trie_tables: List[Tensor]
    weights: List[Tensor]
    biases: List[Tensor]
    offsets: List[int]

    def __init__(self, tower: torch.jit.ScriptModule, model: SIDDecoder, sids: SemanticIds, num_items: int,
                 max_history: int, beam_width: int):
        super().__init__()
        self.tower = tower
        self.register_buffer("token_table", sids.token_table(num_items))
        self.trie_tables = [t.clone() for t in SemanticIdTrie.from_semantic_ids(sids).children]
        self.weights, self.biases = [], []
        for offset, size in zip(model.config.token_offsets, model.config.codebook_sizes):
            self.weights.append(model.output.weight.detach()[offset:offset + size].clone())
            self.biases.append(model.output.bias.detach()[offset:offset + size].clone())
        self.offsets = list(model.config.token_offsets)
        self.levels = model.config.num_levels
        self.max_history = max_history
        self.width = 1 + (max_history + 1) * self.levels
        self.beam_width = beam_width
        self.max_k = min(beam_width, len(sids.item_ids)) - max_history

    def window(self, item_values: Tensor, item_offsets: Tensor) -> Tuple[Tensor, Tensor]:
        """Jagged item lists -> the most recent H items right-padded [B, H] and their counts [B]."""
        offsets = item_offsets.to(torch.long)
        counts = offsets[1:] - offsets[:-1]
        batch = counts.shape[0]
        lengths = counts.clamp(max=self.max_history)
        row = torch.repeat_interleave(torch.arange(batch), counts)
        column = torch.arange(item_values.shape[0]) - offsets[:-1][row] - (counts - lengths)[row]
        keep = column >= 0
        ids = torch.zeros(batch, self.max_history, dtype=torch.long)
        ids = ids.index_put([row[keep], column[keep]], item_values.to(torch.long)[keep])
        return ids, lengths

    def tokens(self, ids: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """[B, width] decoder tokens (BOS, the items' tokens, room for a beam prefix) and their lengths."""
        batch = ids.shape[0]
        per_item = self.token_table[ids].reshape(batch, self.max_history * self.levels)
        real = torch.arange(self.max_history * self.levels).unsqueeze(0) < (lengths * self.levels).unsqueeze(1)
        tokens = torch.zeros(batch, self.width, dtype=torch.long)
        tokens[:, 0] = 1  # BOS
        tokens[:, 1:1 + self.max_history * self.levels] = per_item * real.to(torch.long)
        return tokens, 1 + lengths * self.levels

    def beams(self, tokens: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """Beam search (merlin_hstu.sid.decode.beam_search, recomputing each level) -> items, scores [B, W']."""
        batch = tokens.shape[0]
        hidden = self.tower(tokens, lengths).unsqueeze(1)
        nodes = torch.zeros(batch, 1, dtype=torch.long)
        scores = torch.zeros(batch, 1)
        sequences = tokens.unsqueeze(1)
        for level in range(self.levels):
            table = self.trie_tables[level]
            children = table[nodes.clamp(min=0)].masked_fill((nodes < 0).unsqueeze(-1), -1)
            valid = children >= 0
            logits = F.linear(hidden, self.weights[level], self.biases[level]).masked_fill(~valid, float("-inf"))
            dead = ~valid.any(dim=-1, keepdim=True)
            logp = torch.log_softmax(logits.masked_fill(dead, 0.0), dim=-1).masked_fill(~valid, float("-inf"))
            candidates = scores.unsqueeze(-1) + logp
            size = table.shape[1]
            keep = min(self.beam_width, candidates.shape[1] * size)
            scores, flat = candidates.reshape(batch, -1).topk(keep, dim=1)
            parents = torch.div(flat, size, rounding_mode="floor")
            codes = flat - parents * size
            nodes = children.reshape(batch, -1).gather(1, flat).masked_fill(torch.isinf(scores), -1)
            if level + 1 < self.levels:
                new = (codes + self.offsets[level]).masked_fill(nodes < 0, 0)
                sequences = sequences.gather(1, parents.unsqueeze(-1).expand(-1, -1, self.width))
                slot = (lengths + level).view(batch, 1, 1).expand(batch, keep, 1)
                sequences = sequences.scatter(2, slot, new.unsqueeze(-1))
                flat_lengths = (lengths + level + 1).repeat_interleave(keep)
                hidden = self.tower(sequences.reshape(batch * keep, self.width), flat_lengths).view(batch, keep, -1)
        by_id = torch.sort(torch.where(nodes < 0, torch.full_like(nodes, 2 ** 62), nodes), dim=1, stable=True)
        scores = scores.gather(1, by_id.indices)
        by_score = torch.sort(scores, dim=1, descending=True, stable=True)
        return nodes.gather(1, by_id.indices).gather(1, by_score.indices), by_score.values

    def forward(self, item_values: Tensor, item_offsets: Tensor, ts_values: Tensor, query_timestamps: Tensor,
                k: int, exclude_history: Tensor) -> Tuple[Tensor, Tensor]:
        """The retrieval scorer's call (timestamps unused: no time bias) -> (scores [B, k], encoded ids [B, k])."""
        if k < 1 or k > self.max_k:
            raise ValueError("top_k must be in [1, max_k]")
        ids, lengths = self.window(item_values, item_offsets)
        tokens, token_lengths = self.tokens(ids, lengths)
        items, scores = self.beams(tokens, token_lengths)
        real = torch.arange(self.max_history).unsqueeze(0) < lengths.unsqueeze(1)
        history = torch.where(real, ids, torch.full_like(ids, -2))
        seen = (items.unsqueeze(-1) == history.unsqueeze(1)).any(-1) & exclude_history.unsqueeze(1)
        scores = scores.masked_fill(seen | (items < 0), float("-inf"))
        order = torch.sort(scores, dim=1, descending=True, stable=True)  # dropped items last, the rest in order
        return order.values[:, :k], items.gather(1, order.indices)[:, :k]


def build_sid_scorer(model: SIDDecoder, sids: SemanticIds, num_items: int, max_history: int,
                     beam_width: int) -> torch.jit.ScriptModule:
    """Trace the decoder at the fixed width and script the beam search around it."""
    if model.config.encoder.time_bias:
        raise ValueError("this decoder uses the time bias; serving semantic-ID decoders with time bias is not built "
                         "yet (train with model.time_bias=false)")
    if min(beam_width, len(sids.item_ids)) - max_history < 1:
        raise ValueError(f"a beam width of {beam_width} over {len(sids.item_ids)} items leaves no item after a history "
                         f"window of {max_history}: raise the beam width")
    model = copy.deepcopy(model).eval().requires_grad_(False)
    for module in model.modules():  # TorchScript runs anywhere: trace the pure-PyTorch attention path
        if hasattr(getattr(module, "config", None), "kernel"):
            module.config.kernel = "pytorch"
    levels = model.config.num_levels
    width = 1 + (max_history + 1) * levels
    tokens = torch.zeros(2, width, dtype=torch.long)
    tokens[:, 0] = BOS_TOKEN
    tokens[0, 1:1 + 2 * levels] = torch.from_numpy(sids.tokens()[:2].reshape(-1))
    tokens[1, 1:1 + levels] = torch.from_numpy(sids.tokens()[0])
    lengths = torch.tensor([1 + 2 * levels, 1 + levels])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        tower = torch.jit.trace(_DecoderTower(model), (tokens, lengths), check_trace=False)
    return torch.jit.script(SIDBeamScorer(tower, model, sids, num_items, max_history, beam_width).eval())


def export_sid_repository(run_dir: Union[str, Path], dataset_dir: Optional[Union[str, Path]], output: Union[str, Path],
                          config=None, overwrite: bool = False, beam_width: Optional[int] = None,
                          id_column: Optional[str] = None, item_column: Optional[str] = None,
                          timestamp_column: Optional[str] = None) -> Path:
    """Write a Triton model repository serving the SID run `run_dir` (merlin_hstu.sid.train.save_sid_run) on raw
    events of the dataset it was trained on (`dataset_dir`: workflow/, candidates.parquet; None: the one the run
    recorded).  `config`: `merlin_hstu.serving.repository.ExportConfig` (model name default sid_topk); `beam_width`:
    the served beam width (default max(decode.beam_width, top_k + max_history)); `id_column` / `item_column` /
    `timestamp_column`: the raw log's names (default: the dataset's data_report.json; the timestamps, when the
    workflow takes them, order a request's events).  Written atomically (`write_repository`): a repository that
    exists has answered a request."""
    from merlin_hstu.common import schema as roles
    from merlin_hstu.serving.contract import RequestContract, example_request
    from merlin_hstu.serving.export import ServingParts, build_ensemble, item_ids_of
    from merlin_hstu.serving.repository import (ENTRY_SHIM, EXECUTOR_SHIM, ExportConfig, TritonModel, check_serves,
                                                export_settings, write_repository)
    from merlin_hstu.sid.train import load_sid_run, sid_run_data
    from merlin_hstu.workflows.session_workflow import load_serving_workflow

    config = config or ExportConfig(model_name=DEFAULT_MODEL_NAME)
    if beam_width is not None and (isinstance(beam_width, bool) or not isinstance(beam_width, int) or beam_width < 1):
        raise ValueError(f"beam_width must be an int >= 1, got {beam_width!r}")
    if not config.prune_unused_inputs:
        raise ValueError(f"{run_dir} is a semantic-ID run; its decoder reads item ids only, so the served workflow "
                         "always drops the other branches: drop --keep-unused-inputs (prune_unused_inputs=False)")
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; remove it or pass overwrite=True (--overwrite)")
    model, sids, cfg, _ = load_sid_run(run_dir)
    if dataset_dir is None:
        dataset_dir = sid_run_data(run_dir)
        if dataset_dir is None:
            raise FileNotFoundError(f"{run_dir} does not record the dataset it was trained on; pass it (--data DIR: "
                                    "the `merlin-hstu preprocess` output with workflow/ and candidates.parquet)")
    dataset_dir = Path(dataset_dir)
    workflow_path = dataset_dir / "workflow"
    if not workflow_path.is_dir():
        raise FileNotFoundError(f"{workflow_path} is missing: pass the `merlin-hstu preprocess` output the run was "
                                "trained on (--data DIR: it holds workflow/ and candidates.parquet)")
    if id_column is None or item_column is None:
        from merlin_hstu.serving.t4r_export import session_columns

        named = session_columns(dataset_dir)
        id_column = id_column or named.id_column
        item_column = item_column or named.item_column
        timestamp_column = timestamp_column or named.timestamp_column
    workflow = load_serving_workflow(workflow_path)
    item_list = roles.item_list_column(workflow.output_schema)
    inputs = workflow.input_schema.column_names
    missing = [c for c in (id_column, item_column) if c not in inputs]
    if missing:
        raise ValueError(f"the workflow at {workflow_path} does not take column(s) {missing} (its inputs: {inputs}); "
                         "pass id_column / item_column as the raw log names them")
    # the workflow orders a request's events by time when the log has timestamps (the decoder reads no time itself);
    # an action column is not read: the served workflow drops that branch
    time_column = timestamp_column if timestamp_column in inputs else None
    extra = [c for c in inputs if c not in (id_column, item_column, time_column)]
    if extra:
        workflow.remove_inputs(extra)

    def kind(column: str) -> str:
        import merlin.dtypes as md

        element = workflow.input_schema[column].dtype.element_type
        return "int64" if element in (md.ElementType.Int, md.ElementType.UInt) else "string"

    items = item_ids_of(workflow, workflow_path)
    mapping = items.mapping
    if items.encoding == "categorify" and kind(item_column) == "int64":
        mapping = np.array([-1 if v is None else int(v) for v in mapping], dtype=np.int64)
    history = cfg.data.max_history
    width = beam_width or max(cfg.decode.beam_width, config.top_k + history)
    scorer = build_sid_scorer(model, sids, len(mapping), history, width)
    if config.top_k > scorer.max_k:
        raise ValueError(f"top_k={config.top_k} is larger than a beam of {width} allows after the history window of "
                         f"{history} ({scorer.max_k}); pass a larger beam_width (--beam-width)")
    contract = RequestContract(
        id_column=id_column, id_dtype=kind(id_column), item_column=item_column, item_dtype=kind(item_column),
        timestamp_column=time_column, reads_actions=False, max_history=history, max_k=scorer.max_k,
        default_k=config.top_k, exclude_history=config.exclude_history, model_name=config.name_for("retrieval"),
        batched_model_name=config.batched_name, item_encoding=items.encoding, max_item_id=items.max_id,
        extra={"item_list": item_list, "uses_time": False, "model": "sid", "beam_width": width})
    candidates_file = dataset_dir / "candidates.parquet"
    parts = ServingParts(Path(run_dir), model, cfg, {}, workflow, workflow_path, scorer, mapping, contract,
                         candidates_file if candidates_file.is_file() else None, items.first_id)
    models = [TritonModel(contract.model_name, contract, ENTRY_SHIM, instances=config.entry_instances),
              TritonModel(contract.batched_model_name, contract, EXECUTOR_SHIM, ensemble=build_ensemble(parts),
                          batched=True, instances=config.instances, max_queue_delay_us=config.max_queue_delay_us)]
    example = example_request(contract, [mapping[int(sids.item_ids[0])]])

    def expect(outputs) -> Optional[str]:
        ids, scores = outputs
        if ids.shape != (1, contract.default_k) or not np.all(np.isfinite(scores)):
            return f"ids of shape {ids.shape} and scores {scores}"
        return None

    record = {"source": "merlin_hstu.sid", "run_dir": str(Path(run_dir).resolve()),
              "dataset": str(dataset_dir.resolve()), "workflow": str(workflow_path.resolve()), "beam_width": width,
              "export": export_settings(config, "retrieval"), "model": model.config.to_dict()}
    return write_repository(output, models, record, check=lambda repo: check_serves(repo, contract, example, expect),
                            overwrite=overwrite)
