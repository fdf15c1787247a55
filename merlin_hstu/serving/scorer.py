"""The served model as one self-contained TorchScript program: jagged history in, top-K out.

Why TorchScript: the exported artifact must load in a Triton python-backend stub without our classes or any
pickle of them (merlin-integration.md §2.10).  The program is built in two parts:

* the *user tower* `HSTURetrievalModel.last_user_vector` is **traced** at a fixed width W = H + 1
  (H = the run's `data.max_history`).  A fixed width keeps the trace free of data-dependent shapes; it does not
  change a number, because the HSTU attention normaliser N is a constant and positions >= len are masked
  (merlin_hstu/retrieval/data.py trims widths per batch for the same reason);
* a **scripted** wrapper around it turns the workflow's jagged lists into the padded window and ranks:

      len_b     = min(n_b, H)                          keep the most recent H events of each row
      ids[b, :] = items[b][n_b - len_b : n_b], 0 ...  right-padded to W
      ts[b, j]  = event time for j < len_b, ts[b, len_b] = query time (the last position's prediction time;
                  a negative query time means "the last event's time", the default of `recommend`)
      act[b, :] = actions[b][n_b - len_b : n_b], 0 ... the encoded action ids, windowed like the items (all 0
                  for a model without action inputs; `inputs.actions` concat | interleave read them)
      u_b       = tower(ids, len, ts, act)             the query vector [B, D] (L2-normalised by default)
      s[b, :]   = catalogue(u_b)                       every item's score: the model's top-K module
                                                       (merlin_hstu.retrieval.topk), traced: <u_b, e_v> with
                                                       e_v = E[v] / max(||E[v]||, 1e-6) for the dot product
                                                       (cosine as in training), or the MoL score
      s[b, v]   = -inf  unless v is rankable           catalogue ids (>= 3, or candidates.parquet)
      s[b, v]   = -inf  for v in ids[b, :len_b]        for rows with exclude_history (the evaluation protocol)
      top-K     = torch.topk(s, k)

The catalogue part is the same `scores` code that offline evaluation and `recommend` rank with, traced with the
item side precomputed (MoL: item components and item gates of all V items are constants of the program), so
served ids equal offline ids.

`k` and `exclude_history` are runtime arguments (an int and a per-row bool tensor), so one artifact serves any K up to
`max_k` = (#rankable ids - H): even a user whose whole window is excluded keeps >= K rankable items, so no
result slot is ever padding.
"""
import copy
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from merlin_hstu.retrieval.model import HSTURetrievalModel
from merlin_hstu.retrieval.topk import BruteForceTopK


class _UserTower(nn.Module):
    """Traceable view of the retrieval model: padded window -> query vector at the last real position."""

    def __init__(self, model: HSTURetrievalModel, uses_time: bool):
        super().__init__()
        self.model = model
        self.uses_time = uses_time
        self.uses_actions = model.config.inputs.uses_actions

    def forward(self, ids: Tensor, lengths: Tensor, timestamps: Tensor, actions: Tensor) -> Tensor:
        return self.model.last_user_vector(ids, lengths, timestamps if self.uses_time else None,
                                           actions if self.uses_actions else None)


class _CatalogueScores(nn.Module):
    """Traceable view of a top-K module: query vectors [B, D] -> unmasked scores of every item [B, V]."""

    def __init__(self, topk: BruteForceTopK):
        super().__init__()
        self.topk = topk

    def forward(self, query: Tensor) -> Tensor:
        return self.topk.scores(query)


class TopKScorer(nn.Module):
    """Scripted serving program (see the module docstring).  Inputs are the session workflow's outputs."""

    max_history: int
    width: int
    max_k: int
    uses_actions: bool

    def __init__(self, tower: torch.jit.ScriptModule, catalogue: torch.jit.ScriptModule, rankable: Tensor,
                 max_history: int, uses_actions: bool = False):
        super().__init__()
        self.tower = tower
        self.catalogue = catalogue
        self.register_buffer("rankable", rankable)
        self.max_history = max_history
        self.width = max_history + 1
        self.max_k = int(rankable.sum()) - max_history
        self.uses_actions = uses_actions

    def window(self, item_values: Tensor, item_offsets: Tensor, ts_values: Tensor,
               query_timestamps: Tensor, action_values: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Jagged lists (the workflow's `item_id-list` / `timestamp-list` / `action-list`) -> padded ids, lengths,
        times, actions."""
        offsets = item_offsets.to(torch.long)
        counts = offsets[1:] - offsets[:-1]
        batch = counts.shape[0]
        lengths = counts.clamp(max=self.max_history)
        row = torch.repeat_interleave(torch.arange(batch), counts)
        position = torch.arange(item_values.shape[0]) - offsets[:-1][row]
        column = position - (counts - lengths)[row]
        keep = column >= 0
        row, column = row[keep], column[keep]
        ids = torch.zeros(batch, self.width, dtype=torch.long)
        ids = ids.index_put([row, column], item_values.to(torch.long)[keep])
        times = torch.zeros(batch, self.width, dtype=torch.long)
        times = times.index_put([row, column], ts_values.to(torch.long)[keep])
        last_time = times.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        query = query_timestamps.to(torch.long)
        query = torch.where(query < 0, last_time, query)  # < 0: "now" = the last event's time
        times = times.scatter(1, lengths.unsqueeze(1), query.unsqueeze(1))
        actions = torch.zeros(batch, self.width, dtype=torch.long)
        actions = actions.index_put([row, column], action_values.to(torch.long)[keep])
        return ids, lengths, times, actions

    def scores(self, ids: Tensor, lengths: Tensor, times: Tensor, actions: Tensor, exclude_history: Tensor) -> Tensor:
        user = self.tower(ids, lengths, times, actions)
        scores = self.catalogue(user)
        scores = scores.masked_fill(~self.rankable.unsqueeze(0), float("-inf"))
        # Rows that keep their history scatter into column 0 (padding), which is never rankable anyway.
        return scores.scatter(1, ids * exclude_history.to(torch.long).unsqueeze(1), float("-inf"))

    def forward(self, item_values: Tensor, item_offsets: Tensor, ts_values: Tensor, query_timestamps: Tensor,
                k: int, exclude_history: Tensor, action_values: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """item_values [N], item_offsets [B+1], ts_values [N] (aligned with the items), query_timestamps [B]
        (< 0: the last event's time), k, exclude_history [B] bool, action_values [N] (encoded action ids aligned
        with the items; required when the model reads actions) -> (scores [B, k] float32, encoded item ids [B, k]
        int64), best first."""
        if k < 1 or k > self.max_k:
            raise ValueError("top_k must be in [1, max_k]")
        if action_values is None:
            if self.uses_actions:
                raise ValueError("this model reads actions (inputs.actions): pass action_values aligned with items")
            action_values = torch.zeros_like(item_values)
        ids, lengths, times, actions = self.window(item_values, item_offsets, ts_values, query_timestamps,
                                                   action_values)
        top = torch.topk(self.scores(ids, lengths, times, actions, exclude_history), k, dim=1)
        return top.values, top.indices


def rankable_mask(num_items: int, first_item_id: int = 3, candidates: Optional[Tensor] = None) -> Tensor:
    """bool [num_items]: the ids a recommendation may contain (catalogue ids, or an explicit candidate list)."""
    mask = torch.zeros(num_items, dtype=torch.bool)
    if candidates is None:
        mask[first_item_id:] = True
        return mask
    candidates = torch.as_tensor(candidates, dtype=torch.long)
    bad = candidates[(candidates < first_item_id) | (candidates >= num_items)]
    if bad.numel():
        raise ValueError(f"candidate ids must be encoded item ids in [{first_item_id}, {num_items}); "
                         f"got e.g. {bad[:5].tolist()}")
    mask[candidates] = True
    return mask


def build_scorer(model: HSTURetrievalModel, max_history: int, rankable: Tensor) -> torch.jit.ScriptModule:
    """Trace the user tower at width H + 1 and the catalogue scores (MIPS or MoL top-K module), and script the
    ranking wrapper around them."""
    if rankable.shape != (model.config.num_items,):
        raise ValueError(f"rankable mask has shape {tuple(rankable.shape)}, expected ({model.config.num_items},)")
    if int(rankable.sum()) - max_history < 1:
        raise ValueError(f"only {int(rankable.sum())} rankable items for a history window of {max_history}: "
                         "top-K needs more candidates than history items")
    model = copy.deepcopy(model).eval().requires_grad_(False)  # no autograd state in the artifact
    for module in model.modules():  # TorchScript runs anywhere: trace the pure-PyTorch attention path
        if hasattr(getattr(module, "config", None), "kernel"):
            module.config.kernel = "pytorch"
    uses_time = bool(model.config.encoder.time_bias)
    width = max_history + 1
    # Example: two users with different lengths, so no shape is specialised to equal rows.
    ids = torch.zeros(2, width, dtype=torch.long)
    ids[0, :3], ids[1, :1] = torch.tensor([3, 4, 5]), 3
    lengths = torch.tensor([3, 1])
    times = torch.arange(2 * width, dtype=torch.long).view(2, width) * 60 + 1_600_000_000
    actions = torch.zeros(2, width, dtype=torch.long)
    actions[0, :3], actions[1, :1] = 1, 1  # row 1 (null): a row every action table has (num_actions >= 2)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about the model's Python-side width checks; the width is fixed here on purpose.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        tower = torch.jit.trace(_UserTower(model, uses_time), (ids, lengths, times, actions), check_trace=False)
        query = tower(ids, lengths, times, actions)
        catalogue = torch.jit.trace(_CatalogueScores(model.topk()), query, check_trace=False)
    scorer = TopKScorer(tower, catalogue, rankable.clone(), max_history, model.config.inputs.uses_actions)
    return torch.jit.script(scorer.eval())
