"""HSTU encoder for retrieval (research variant of arXiv 2402.17152): an STU stack with the next-event time rule.

The layer, the stack, the relative bias and the config live in `merlin_hstu.encoders.stu` (shared with
DLRM-HSTU and M-FALCON) and are re-exported here.  What is retrieval's own:

* the query-time rule "next_event": row i's prediction is made at the next event's timestamp, so its time bias
  uses t_{i+1}; the last event's prediction is made at the query (target) time, held in the slot after it.  A
  sequence of exactly N tokens has no such slot inside the bias table, and its last row reuses its own
  timestamp, as the reference does.  Relative positions are the slot offsets j - i.
* the two entry points: `forward_jagged` (values + offsets, the native layout: pointwise work touches real
  tokens only) and `forward` (right-padded [B, W, D], the same values as `forward_jagged` on the equivalent
  jagged input; what T4R and the serving export call, and torch.jit.trace-able).

Which attention implementation runs (the padded PyTorch path with one [B, W, W] mask per forward, or the jagged
Triton kernels) is decided by the attention op's dispatch from `HSTUEncoderConfig.kernel`, once per forward.
"""
from __future__ import annotations

from typing import Optional

import torch

from merlin_hstu.encoders.stu import (
    TIME_BUCKET_DIVISOR,
    HSTUEncoderConfig,
    RelativeBucketedTimeAndPositionBias,
    STULayer,
    STUStack,
    TokenMeta,
    time_bucket_ids,
)

__all__ = [
    "TIME_BUCKET_DIVISOR",
    "HSTUEncoder",
    "HSTUEncoderConfig",
    "RelativeBucketedTimeAndPositionBias",
    "STULayer",
    "time_bucket_ids",
]


class HSTUEncoder(STUStack):
    """The retrieval STU stack.  Input embedding and output normalisation live outside (merlin_hstu.retrieval).

    `forward` here is the right-padded retrieval API; the jagged pass of the stack it runs is `STUStack.forward`."""

    # --- jagged (native) -------------------------------------------------------------------------
    def forward_jagged(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        timestamps: Optional[torch.Tensor] = None,
        query_timestamps: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """values [T, D], offsets [B+1]; timestamps [T] event times (same offsets); query_timestamps [B]:
        the time at which the prediction after each sequence's last event is made (the target's timestamp;
        defaults to the last event's time).  Returns [T, D]."""
        lengths = offsets[1:] - offsets[:-1]
        max_len = int(lengths.max()) if lengths.numel() else 0
        if max_len > self.config.max_seq_len:
            raise ValueError(f"a sequence of {max_len} tokens exceeds max_seq_len={self.config.max_seq_len}; "
                             "raise HSTUEncoderConfig.max_seq_len or truncate the sequences")
        # One slot past the longest sequence holds its query time (none for a sequence of exactly N tokens).
        width = min(max_len + 1, self.config.max_seq_len)
        token_mask = torch.arange(max_len + 1, device=values.device).unsqueeze(0) < lengths.unsqueeze(1)
        padded_times = None
        if timestamps is not None:
            padded_times = timestamps.new_zeros(lengths.shape[0], max_len + 1).index_put((token_mask,), timestamps)
            if query_timestamps is None:
                last = (lengths - 1).clamp(min=0)
                query_timestamps = padded_times.gather(1, last.unsqueeze(1)).squeeze(1)
            query = query_timestamps.to(padded_times.dtype).unsqueeze(1)
            padded_times = padded_times.scatter(1, lengths.unsqueeze(1), query)
            padded_times = padded_times[:, :width]
        return self._encode(values, token_mask[:, :width], lengths, padded_times)

    # --- right-padded ----------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        lengths: Optional[torch.Tensor] = None,
        timestamps: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x [B, W, D] right-padded; lengths [B] (default: all W); timestamps [B, W]: event times at
        positions < len_b and, at position len_b (when len_b < W), the query time of the last position.
        Returns [B, W, D] with zeros past each sequence's length."""
        batch, width, dim = x.shape
        if lengths is None:
            lengths = torch.full((batch,), width, dtype=torch.long, device=x.device)
        token_mask = torch.arange(width, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
        out = self._encode(x[token_mask], token_mask, lengths, timestamps)
        return x.new_zeros(batch, width, dim).index_put((token_mask,), out)

    def _encode(self, values, token_mask, lengths, padded_times):
        """The stack over the [B, W] padded view, with retrieval's bias rule (positions = slots)."""
        positions = torch.arange(token_mask.shape[1], device=values.device).unsqueeze(0)
        bias = self.bias_index(TokenMeta(positions, padded_times), rule="next_event")
        return super().forward(values, token_mask, lengths, bias)
