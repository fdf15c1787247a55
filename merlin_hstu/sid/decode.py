"""Constrained beam search over semantic IDs: the top-K items a decoder (merlin_hstu.sid.model) generates next.

The trie of valid tuples (`SemanticIdTrie`) is kept as one dense table per level, what both eager code and a
traced program index without Python loops:

    children[l][node, c] = the node reached from prefix `node` (a prefix of l codes) by code c at level l,
                           -1 if no item has that prefix; at the last level it is the ITEM ID of the completed tuple

Level 0 has one node (the empty prefix).  Beam search (beam width W) then runs level by level:

    step 0     logp_0(c)   = log softmax over the valid children of the root of the level-0 logits after the
                              history; keep the W best codes
    step l     score(b, c) = score(b) + log softmax_{valid children of b's prefix}(level-l logits after b's prefix)
                              over all beams b and codes c; keep the W best (b, c)
    result     the W completed tuples = items, best first (score descending, ties by item id)

so an item's score is the sum over its levels of the log-probability of its code renormalised over the codes the
trie allows there (invalid codes never enter a beam, and every emitted id is a catalogue item).  With W at least the
number of trie nodes at every level nothing is pruned and the beams are every item, scored exactly as
`exhaustive_scores` scores them by teacher forcing.

Two engines give the hidden states after each step (one algorithm, `beam_search`):

* `CachedEngine` (the default): every user's history is read once into the STU stack's KV cache
  (`STUStack.new_cache` + `cached_forward(append=True)`, one call per user); each step then runs only the beams'
  new tokens through the layers, batched over all users and beams.  A new token's attention is a sum over keys (no
  softmax), so it is split into its part over the cached history and its part over the beam's own earlier tokens,
  two calls of the attention op (`hstu_attention_rows`) whose outputs add up to the full row.  Histories of
  different lengths are left-aligned against zero keys and values, which add exactly nothing.
* `FullEngine`: recomputes [history ; beam prefix] with the full forward at every step (the oracle the tests
  compare the cache with).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from merlin_hstu.kernels.attention_ops import hstu_attention_rows
from merlin_hstu.sid.model import SIDDecoder
from merlin_hstu.sid.tokenizer import SemanticIds


@dataclass
class SemanticIdTrie:
    """Dense per-level transition tables of the valid tuples (module docstring)."""

    children: List[Tensor]  # level l: [num_nodes_l, K_l] long

    @classmethod
    def from_semantic_ids(cls, sids: SemanticIds) -> "SemanticIdTrie":
        codes, items = sids.codes, sids.item_ids
        levels = codes.shape[1]
        node = np.zeros(len(codes), dtype=np.int64)  # each item's prefix node at the current level
        num_nodes = 1
        children = []
        for level in range(levels):
            table = np.full((num_nodes, sids.codebook_sizes[level]), -1, dtype=np.int64)
            if level == levels - 1:
                table[node, codes[:, level]] = items
            else:
                _, child = np.unique(codes[:, :level + 1], axis=0, return_inverse=True)
                child = child.reshape(-1)
                table[node, codes[:, level]] = child
                node, num_nodes = child, int(child.max()) + 1
            children.append(torch.from_numpy(table))
        return cls(children)

    @property
    def num_levels(self) -> int:
        return len(self.children)

    def level_sizes(self) -> List[int]:
        """Nodes per level (the beam width at which nothing is pruned is their maximum)."""
        return [int(t.shape[0]) for t in self.children]

    def to(self, device) -> "SemanticIdTrie":
        return SemanticIdTrie([t.to(device) for t in self.children])


# ------------------------------------------------------------------------------------------------------------
# engines: hidden states after the history, then after each beam's prefix
# ------------------------------------------------------------------------------------------------------------
class FullEngine:
    """Recompute [history ; prefix] at every step (the oracle)."""

    def __init__(self, model: SIDDecoder, histories: Sequence[Tensor], query_times: Optional[Tensor] = None,
                 history_times: Optional[Sequence[Tensor]] = None):
        self.model, self.histories = model, [h.long() for h in histories]
        self.query_times, self.history_times = query_times, history_times
        self.prefixes: Optional[Tensor] = None  # [U, beams, t]

    def _run(self, prefixes: Tensor) -> Tensor:
        users, beams, steps = prefixes.shape
        device = prefixes.device
        lengths = torch.tensor([len(h) + steps for h in self.histories], device=device)
        width = int(lengths.max()) + 1
        tokens = torch.zeros(users, beams, width, dtype=torch.long, device=device)
        times = torch.zeros(users, beams, width, dtype=torch.long, device=device) \
            if self.model.config.encoder.time_bias else None
        for u, history in enumerate(self.histories):
            s = len(history)
            tokens[u, :, :s] = history.to(device)
            tokens[u, :, s:s + steps] = prefixes[u]
            if times is not None:
                times[u, :, :s] = self.history_times[u].to(device)
                times[u, :, s:] = self.query_times[u]
        flat_lengths = lengths.repeat_interleave(beams)
        h = self.model.hidden(tokens.view(users * beams, width), flat_lengths,
                              None if times is None else times.view(users * beams, width))
        last = h[torch.arange(users * beams, device=device), flat_lengths - 1]
        return last.view(users, beams, -1)

    def start(self) -> Tensor:
        device = self.model.output.weight.device
        self.prefixes = torch.zeros(len(self.histories), 1, 0, dtype=torch.long, device=device)
        return self._run(self.prefixes)[:, 0]

    def step(self, parents: Tensor, tokens: Tensor) -> Tensor:
        """parents [U, W] (the beam each new beam extends), tokens [U, W] (its new token) -> hidden [U, W, D]."""
        gathered = self.prefixes.gather(1, parents.unsqueeze(-1).expand(-1, -1, self.prefixes.shape[-1]))
        self.prefixes = torch.cat([gathered, tokens.unsqueeze(-1)], dim=-1)
        return self._run(self.prefixes)


class CachedEngine:
    """History in the STU stack's KV cache, beams decoded incrementally (module docstring)."""

    def __init__(self, model: SIDDecoder, histories: Sequence[Tensor], query_times: Optional[Tensor] = None,
                 history_times: Optional[Sequence[Tensor]] = None):
        self.model, self.histories = model, [h.long() for h in histories]
        self.query_times, self.history_times = query_times, history_times
        self.time_bias = model.config.encoder.time_bias
        if self.time_bias and (query_times is None or history_times is None):
            raise ValueError("this decoder has time_bias=True: pass the history times and the query times")

    def start(self) -> Tensor:
        model, stack = self.model, self.model.stack
        device = model.output.weight.device
        self.lengths = torch.tensor([len(h) for h in self.histories], device=device)
        width = int(self.lengths.max())
        self.width, self.steps, self.beams = width, 0, 1
        users = len(self.histories)
        c = stack.config
        # per layer: history keys / values left-aligned against zeros [U, width, H, d]
        self.hist_keys = [torch.zeros(users, width, c.num_heads, c.attention_dim, device=device)
                          for _ in stack.layers]
        self.hist_values = [torch.zeros(users, width, c.num_heads, c.linear_dim, device=device)
                            for _ in stack.layers]
        last = []
        for u, history in enumerate(self.histories):
            s = len(history)
            slots = torch.arange(s + 1, device=device).unsqueeze(0)
            times = None
            if self.time_bias:
                times = torch.cat([self.history_times[u].to(device),
                                   self.query_times[u].view(1).to(device)]).unsqueeze(0)
            bias = stack.bias_index(model.key_meta(slots, times), rule="next_event",
                                    rows=torch.arange(s, device=device))
            cache = stack.new_cache(device=device)
            h = stack.cached_forward(model.embed(history.to(device), slots[0, :s]), cache, bias, append=True)
            last.append(h[-1])
            for layer, layer_cache in enumerate(cache):
                self.hist_keys[layer][u, width - s:] = layer_cache.keys[:, :s].transpose(0, 1)
                self.hist_values[layer][u, width - s:] = layer_cache.values[:, :s].transpose(0, 1)
        # slot metadata of the left-aligned layout: key j < width is true slot j - (width - s_u)
        pad = (width - self.lengths).unsqueeze(1)
        self.slot_base = torch.arange(width, device=device).unsqueeze(0) - pad  # [U, width]
        self.beam_keys = [None] * len(stack.layers)
        self.beam_values = [None] * len(stack.layers)
        return model.output_norm(torch.stack(last))

    def step(self, parents: Tensor, tokens: Tensor) -> Tensor:
        model, stack = self.model, self.model.stack
        c = stack.config
        users, beams = tokens.shape
        device = tokens.device
        steps = self.steps + 1  # beam tokens after this step
        # slots of [history ; beam tokens ; the query-time slot] in the left-aligned layout
        after = self.lengths.unsqueeze(1) + torch.arange(steps + 1, device=device).unsqueeze(0)
        slots = torch.cat([self.slot_base, after], dim=1)  # [U, width + steps + 1]
        times = None
        if self.time_bias:
            times = torch.zeros_like(slots)
            for u, s in enumerate(self.lengths.tolist()):
                times[u, self.width - s:self.width] = self.history_times[u].to(device)
                times[u, self.width:] = self.query_times[u]
        bias = stack.bias_index(model.key_meta(slots.clamp(min=0), times), rule="next_event",
                                rows=torch.tensor([self.width + steps - 1], device=device))
        x = model.embed(tokens.reshape(-1), after[:, steps - 1].repeat_interleave(beams))  # [U*W, D]
        # parents index the user's previous beams: rows u * previous + parent of the flat beam tensors
        flat_parents = (parents + torch.arange(users, device=device).unsqueeze(1) * self.beams).reshape(-1)
        normalizer = float(c.max_seq_len)
        for index, layer in enumerate(stack.layers):
            h, dqk, dv = layer.num_heads, layer.attention_dim, layer.linear_dim
            u, v, q, k = layer.project(x)
            keys, values = k.view(-1, 1, h, dqk), v.view(-1, 1, h, dv)
            if self.beam_keys[index] is not None:
                keys = torch.cat([self.beam_keys[index][flat_parents], keys], dim=1)
                values = torch.cat([self.beam_values[index][flat_parents], values], dim=1)
            self.beam_keys[index], self.beam_values[index] = keys, values
            rab = layer.relative_bias(bias)  # [U, 1, width + steps + 1] or None
            rab_hist = rab_beam = None
            if rab is not None:
                rab_hist = rab[:, :, :self.width].expand(users, beams, self.width)
                rab_beam = rab[:, :, self.width:self.width + steps].repeat_interleave(beams, dim=0)
            # the new row over the cached history: every user's beams are that user's query rows
            part_history = hstu_attention_rows(
                q.view(users, beams, h, dqk), self.hist_keys[index], self.hist_values[index],
                torch.full((beams,), self.width - 1, device=device), torch.full((users,), self.width, device=device),
                normalizer, rab_hist, causal=c.causal, kernel=c.kernel)
            # ... and over the beam's own tokens (causal: the new token is the last)
            part_beam = hstu_attention_rows(
                q.view(users * beams, 1, h, dqk), keys, values, torch.tensor([steps - 1], device=device),
                torch.full((users * beams,), steps, device=device), normalizer, rab_beam, causal=c.causal,
                kernel=c.kernel)
            attention = part_history.reshape(users * beams, h * dv) + part_beam.reshape(users * beams, h * dv)
            x = layer.finish(x, u, attention)
        self.steps, self.beams = steps, beams
        return model.output_norm(x).view(users, beams, -1)


ENGINES = {"cached": CachedEngine, "full": FullEngine}


# ------------------------------------------------------------------------------------------------------------
# beam search
# ------------------------------------------------------------------------------------------------------------
def _valid_logprobs(model: SIDDecoder, hidden: Tensor, level: int, children: Tensor) -> Tensor:
    """log softmax of level `level`'s logits over the valid children only (-inf elsewhere); hidden [..., D],
    children [..., K] (-1 invalid)."""
    valid = children >= 0
    logits = model.level_logits(hidden, level).float().masked_fill(~valid, float("-inf"))
    dead = ~valid.any(dim=-1, keepdim=True)  # a beam with no continuation (only beams already at -inf)
    logp = F.log_softmax(logits.masked_fill(dead, 0.0), dim=-1)
    return logp.masked_fill(~valid, float("-inf"))


@torch.no_grad()
def beam_search(model: SIDDecoder, trie: SemanticIdTrie, histories: Sequence[Tensor], beam_width: int,
                engine: str = "cached", query_times: Optional[Tensor] = None,
                history_times: Optional[Sequence[Tensor]] = None, return_steps: bool = False):
    """Top-`beam_width` items after each history (module docstring).

    histories: per user the decoder tokens of the history (BOS first; `merlin_hstu.sid.model.item_token_sequences`).
    Returns (items [U, W'] long, -1 where fewer than W' tuples exist; scores [U, W'] float, -inf there), best
    first with ties by item id; W' = min(beam_width, items in the trie).  return_steps also returns the hidden
    states of every step (for tests)."""
    if beam_width < 1:
        raise ValueError(f"beam width must be >= 1, got {beam_width}")
    if engine not in ENGINES:
        raise ValueError(f"decoding engine must be one of {sorted(ENGINES)}, got {engine!r}")
    if trie.num_levels != model.config.num_levels:
        raise ValueError(f"the trie has {trie.num_levels} levels but the decoder reads {model.config.num_levels} "
                         "tokens per item: they come from different tokenizers")
    model.eval()
    device = model.output.weight.device
    trie = trie.to(device)
    run = ENGINES[engine](model, histories, query_times, history_times)
    hidden = run.start().unsqueeze(1)  # [U, 1, D]
    users = hidden.shape[0]
    nodes = torch.zeros(users, 1, dtype=torch.long, device=device)
    scores = torch.zeros(users, 1, device=device)
    offsets = model.config.token_offsets
    steps = [hidden]
    for level in range(trie.num_levels):
        table = trie.children[level]
        children = table[nodes.clamp(min=0)]  # [U, B, K]
        children = children.masked_fill((nodes < 0).unsqueeze(-1), -1)
        candidates = scores.unsqueeze(-1) + _valid_logprobs(model, hidden, level, children)
        size = table.shape[1]
        keep = min(beam_width, candidates.shape[1] * size)
        scores, flat = candidates.reshape(users, -1).topk(keep, dim=1)
        parents, codes = flat // size, flat % size
        nodes = children.reshape(users, -1).gather(1, flat)
        nodes = nodes.masked_fill(torch.isinf(scores), -1)
        if level + 1 < trie.num_levels:
            hidden = run.step(parents, (codes + offsets[level]).masked_fill(nodes < 0, 0))
            steps.append(hidden)
    # best first, ties by item id: a stable sort by id, then by score
    by_id = torch.sort(torch.where(nodes < 0, torch.iinfo(torch.long).max, nodes), dim=1, stable=True)
    scores = scores.gather(1, by_id.indices)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True)
    items = nodes.gather(1, by_id.indices).gather(1, by_score.indices)
    out = (items, by_score.values)
    return (*out, steps) if return_steps else out


@torch.no_grad()
def exhaustive_scores(model: SIDDecoder, trie: SemanticIdTrie, sids: SemanticIds, history: Tensor,
                      query_time: Optional[int] = None, history_times: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Every catalogue item's score after one history by teacher forcing (the sum over levels of its code's
    log-probability renormalised over the trie's valid codes): (item ids [N], scores [N])."""
    model.eval()
    device = model.output.weight.device
    tokens_of = torch.from_numpy(sids.tokens()).to(device)  # [N, T]
    codes = torch.from_numpy(sids.codes).to(device)
    n, levels = tokens_of.shape
    s = len(history)
    width = s + levels - 1
    tokens = torch.cat([history.to(device).unsqueeze(0).expand(n, s), tokens_of[:, :-1]], dim=1)
    times = None
    if model.config.encoder.time_bias:
        times = torch.cat([history_times.to(device).unsqueeze(0).expand(n, s),
                           torch.full((n, levels - 1), int(query_time), device=device)], dim=1)
    h = model.hidden(tokens, torch.full((n,), width, device=device), times)
    nodes = torch.zeros(n, dtype=torch.long, device=device)
    total = torch.zeros(n, device=device)
    for level in range(levels):
        children = trie.to(device).children[level][nodes]  # [N, K]
        logp = _valid_logprobs(model, h[:, s - 1 + level], level, children)
        total = total + logp.gather(1, codes[:, level:level + 1]).squeeze(1)
        nodes = children.gather(1, codes[:, level:level + 1]).squeeze(1)
    return nodes, total


def beam_ranks(items: Tensor, targets: Tensor, history: Optional[Tensor] = None) -> Tensor:
    """1-based rank of each target in its beam list (best first) after the history filter of the retrieval
    protocol (history items are dropped from the list, the target itself never); beam_width + 1 when the target
    is not in the list.  items [U, W] (-1 = no item), targets [U], history [U, H] item ids (0 = padding) or None."""
    width = items.shape[1]
    real = items >= 0
    if history is not None:
        seen = (items.unsqueeze(-1) == history.unsqueeze(1)).any(-1) & (items != targets.unsqueeze(1))
        real = real & ~seen
    hit = (items == targets.unsqueeze(1)) & real
    ahead = torch.cumsum(real.long(), dim=1) - real.long()  # real items before each slot
    rank = torch.where(hit, ahead + 1, torch.full_like(ahead, width + 1)).min(dim=1).values
    return rank
