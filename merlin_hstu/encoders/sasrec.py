"""SASRec baseline encoder (Kang & McAuley 2018) as the HSTU reference's research path runs it.

The reference compares HSTU against this SASRec (reference-hstu.md §1.5, §3), so matching its exact block
matters for a fair baseline.  One block on right-padded x [B, W, D]:

    q = LayerNorm(x)                          no affine parameters, eps 1e-8
    a = MHA(query=q, key=x, value=x)          nn.MultiheadAttention: in/out projections with bias,
                                              softmax(q k^T / sqrt(D/H)) with a causal mask (j <= i),
                                              dropout on the attention probabilities
    z = LayerNorm(q + a)                      the residual adds the *normalised* query, not x
    x = (z + FFN(z)) * valid                  FFN = Conv1d(D->F,1) -> ReLU -> Dropout -> Conv1d(F->D,1) -> Dropout
                                              (GELU instead of ReLU with activation="gelu": the reference's
                                              GPT-like SASRec variant)
                                              valid = position < length (padded rows are zeroed)

There is no final LayerNorm: the retrieval model L2-normalises the output.  The LayerNorms have no affine
parameters; the reference's measured parameter count (238,800 on ML-1M with D=50, 2 blocks) has room for none.

Padding needs no key mask: with right padding and a causal mask, a real row i < len only sees keys j <= i,
which are all real.  Padded rows see padded keys and are zeroed at the end of every block.

Init (the reference's `reset_state`): xavier_normal_ on every parameter with >= 2 dims (MHA in/out projection
weights, both conv kernels); the MHA biases stay 0 and the conv biases keep PyTorch's default
U(+-1/sqrt(fan_in)).  The input preprocessor's positional table is *not* re-initialised for SASRec (HSTU's
is): it keeps a truncated normal with std sqrt(1/D), see `positional_table_init`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

POSITION_INIT_TRUNCATED_NORMAL = "truncated_normal"
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclass
class SASRecEncoderConfig:
    """Typed configuration of a SASRec encoder stack (reference ML-1M values as defaults).

    `dropout` is the reference's `ffn_dropout_rate`: it is used for the attention probabilities and both FFN
    dropouts.  `max_seq_len` is N, the widest padded input accepted (the size of the positional table in
    front of the encoder); the reference pads to N = 211 (200 history + 11 output slots).
    """

    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    ffn_hidden_dim: int = 50
    dropout: float = 0.2
    max_seq_len: int = 211
    layer_norm_eps: float = 1e-8
    activation: str = "relu"  # FFN nonlinearity: "relu" (SASRec) or "gelu" (the reference's GPT-like variant)

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "num_blocks", "num_heads", "ffn_hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SASRecEncoderConfig.{name} must be a positive int, got {value!r}")
        if self.embedding_dim % self.num_heads:
            raise ValueError(
                f"SASRecEncoderConfig.embedding_dim={self.embedding_dim} is not divisible by "
                f"num_heads={self.num_heads}; multi-head attention splits embedding_dim across the heads, "
                "so pick num_heads that divides it"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SASRecEncoderConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"SASRecEncoderConfig.activation must be one of {sorted(ACTIVATIONS)}, got "
                             f"{self.activation!r} (model.activation)")
        if not self.layer_norm_eps > 0.0:
            raise ValueError(f"SASRecEncoderConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["activation"] == "relu":  # saved configs of ReLU models keep the keys they always had
            del d["activation"]
        return d


def positional_table_init(weight: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Initialise an absolute positional table [N, D] as the reference's input preprocessor does for SASRec:
    truncated normal, mean 0, std sqrt(1/D), values cut at +-2 std.  In place; returns `weight`.

    (The reference resamples values outside +-2 std; `trunc_normal_` draws from the same truncated law.)
    """
    dim = weight.shape[-1] if dim is None else dim
    if dim <= 0:
        raise ValueError(f"positional_table_init: dim must be positive, got {dim}")
    std = math.sqrt(1.0 / dim)
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


class PointwiseFeedForward(nn.Module):
    """z + Dropout(Conv1d(Dropout(ReLU(Conv1d(z))))) with kernel size 1, i.e. a per-position 2-layer MLP
    plus the inner residual.  Conv1d (not Linear) keeps the reference's parameter layout [out, in, 1]."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float, activation: str = "relu"):
        super().__init__()
        self.activation = ACTIVATIONS[activation]
        self.conv1 = nn.Conv1d(dim, hidden_dim, kernel_size=1)
        self.conv2 = nn.Conv1d(hidden_dim, dim, kernel_size=1)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, W, D] -> [B, W, D]."""
        h = self.dropout1(self.activation(self.conv1(z.transpose(1, 2))))
        h = self.dropout2(self.conv2(h)).transpose(1, 2)
        return z + h


class SASRecBlock(nn.Module):
    """One SASRec block: pre-LN causal self-attention with the query's LN in the residual, then LN + FFN."""

    def __init__(self, config: SASRecEncoderConfig):
        super().__init__()
        self.eps = config.layer_norm_eps
        self.dim = (config.embedding_dim,)  # ints, not x.shape: a traced shape is not ONNX-exportable here
        self.attention = nn.MultiheadAttention(
            config.embedding_dim, config.num_heads, dropout=config.dropout, bias=True, batch_first=True
        )
        self.feed_forward = PointwiseFeedForward(config.embedding_dim, config.ffn_hidden_dim, config.dropout,
                                                 config.activation)

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x [B, W, D]; causal_mask [W, W] bool, True where attention is forbidden (j > i);
        valid [B, W, 1] in x's dtype.  Returns [B, W, D] with padded rows zero."""
        dim = self.dim
        q = F.layer_norm(x, dim, eps=self.eps)
        a, _ = self.attention(q, x, x, attn_mask=causal_mask, need_weights=False)
        z = F.layer_norm(q + a, dim, eps=self.eps)
        return self.feed_forward(z) * valid


class SASRecEncoder(nn.Module):
    """A stack of SASRec blocks on right-padded [B, W, D] input.  Input embedding (E[ids]·sqrt(D) + P,
    dropout, padding mask) and output normalisation live outside, as for `HSTUEncoder`."""

    # How the model in front of this encoder must initialise its absolute positional table:
    # `positional_table_init` (HSTU's models use xavier_normal_ instead).
    position_init: str = POSITION_INIT_TRUNCATED_NORMAL

    def __init__(self, config: SASRecEncoderConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(SASRecBlock(config) for _ in range(config.num_blocks))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for block in self.blocks:
            block.feed_forward.conv1.reset_parameters()  # PyTorch default bias U(+-1/sqrt(fan_in))
            block.feed_forward.conv2.reset_parameters()
            nn.init.zeros_(block.attention.in_proj_bias)
            nn.init.zeros_(block.attention.out_proj.bias)
        for param in self.parameters():
            if param.dim() >= 2:
                nn.init.xavier_normal_(param)

    @staticmethod
    def init_positional_table(weight: torch.Tensor) -> torch.Tensor:
        """Initialise the positional table in front of this encoder (see `positional_table_init`)."""
        return positional_table_init(weight)

    def forward(
        self,
        x: torch.Tensor,
        lengths: Optional[torch.Tensor] = None,
        timestamps: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x [B, W, D] right-padded; lengths [B] real positions per row (default: all W).  `timestamps` is
        accepted for interface parity with `HSTUEncoder` and ignored: SASRec has no time signal beyond the
        positional table.  Returns [B, W, D], zero at positions >= length."""
        if not torch.jit.is_tracing():
            self._check_inputs(x, lengths)
        batch, width, _ = x.shape
        positions = torch.arange(width, device=x.device)
        causal_mask = positions.unsqueeze(0) > positions.unsqueeze(1)  # [i, j]: True where j > i
        if lengths is None:
            valid = torch.ones(batch, width, 1, dtype=x.dtype, device=x.device)
        else:
            valid = (positions.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1).to(x.dtype)
        for block in self.blocks:
            x = block(x, causal_mask, valid)
        return x

    def _check_inputs(self, x: torch.Tensor, lengths: Optional[torch.Tensor]) -> None:
        c = self.config
        if x.dim() != 3 or x.shape[-1] != c.embedding_dim:
            raise ValueError(
                f"SASRecEncoder expects x [batch, seq, embedding_dim={c.embedding_dim}], got {tuple(x.shape)}"
            )
        if x.shape[1] > c.max_seq_len:
            raise ValueError(
                f"sequence width {x.shape[1]} exceeds max_seq_len={c.max_seq_len}; raise "
                "SASRecEncoderConfig.max_seq_len or truncate the sequences"
            )
        if lengths is not None and tuple(lengths.shape) != (x.shape[0],):
            raise ValueError(f"lengths must be [batch] = [{x.shape[0]}], got {tuple(lengths.shape)}")


__all__ = [
    "POSITION_INIT_TRUNCATED_NORMAL",
    "PointwiseFeedForward",
    "SASRecBlock",
    "SASRecEncoder",
    "SASRecEncoderConfig",
    "positional_table_init",
]
