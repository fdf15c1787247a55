"""WuKong interaction towers (Zhang et al. 2024, "Wukong: Towards a Scaling Law for Large-Scale
Recommendation"), pure PyTorch.

WuKong treats the input as n feature embeddings of one dimension d, X in R^{B x n x d}, and stacks layers that
each keep that shape (with their own output feature count):

    FMB(X) = reshape( MLP( LN( flatten( X (X^T Y) ) ) ), [n_F, d] )     Y in R^{n x k}   (factorization machine)
    LCB(X) = W_L X                                                     W_L in R^{n_L x n} (linear compress)
    layer(X) = LN_d( concat(FMB(X), LCB(X)) + R X )                    -> R^{(n_F + n_L) x d}

* X X^T is the n x n matrix of pairwise dot products <x_i, x_j> (the FM interactions).  The optimized FM never
  forms it: X^T Y (d x k) first, then X (X^T Y) (n x k), so the cost is O(n d k) instead of O(n^2 d).
  Entry (i, j) is sum_m <x_i, x_m> Y[m, j]: feature i's interactions with every feature, compressed to k
  learned mixtures.  LN is over the flattened n*k values.
* The MLP maps n*k -> `fmb_mlp` hidden widths (ReLU) -> n_F * d; its output is read as n_F new embeddings.
* LCB is a plain linear recombination of the n embeddings (no bias): it carries lower-order terms forward.
* R is the identity when the layer keeps the feature count (n == n_F + n_L) and a learned n_out x n linear map
  otherwise (the first layer, usually).  LN_d normalises every output embedding over its d values.
* Stacking L layers raises the interaction order: layer l can express products of up to 2^l input embeddings.

`WukongTower(num_features, dim, config)` is the stack ([B, n, d] -> [B, n_F + n_L, d]); it is what the
T4R block (`merlin_hstu.t4r.ctr`) and the ranking model use.  The complete CTR model over tabular
data (`WukongModel`) lives in `merlin_hstu.ctr.wukong`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence, Tuple

import torch
from torch import nn

from merlin_hstu.common.checks import layer_widths, positive_int


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float = 0.0, final_activation: bool = False
        ) -> nn.Sequential:
    """Linear -> ReLU (-> Dropout) for each hidden width, then Linear to `out_dim` (ReLU too if asked)."""
    layers, width = [], in_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, out_dim))
    if final_activation:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class WukongConfig:
    """Sizes of one WuKong tower; every layer uses the same sizes.

    lcb_feature_num = n_L, fmb_feature_num = n_F (a layer outputs n_F + n_L embeddings),
    compressed_feature_num = k (columns of Y in X (X^T Y)), fmb_mlp = hidden widths of the FMB MLP (its output
    layer, n_F * d wide, is always added).
    """

    num_layers: int = 2
    lcb_feature_num: int = 8
    fmb_feature_num: int = 8
    compressed_feature_num: int = 8
    fmb_mlp: Tuple[int, ...] = (64,)
    fmb_layer_norm: bool = True  # LN over the flattened n*k FM values before the MLP (as in the paper)
    dropout: float = 0.0  # on the FMB / LCB outputs, before the residual add
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("num_layers", "lcb_feature_num", "fmb_feature_num", "compressed_feature_num"):
            positive_int("WukongConfig", name, getattr(self, name))
        self.fmb_mlp = layer_widths("WukongConfig", "fmb_mlp", self.fmb_mlp)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"WukongConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def output_feature_num(self) -> int:
        return self.fmb_feature_num + self.lcb_feature_num

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fmb_mlp"] = list(self.fmb_mlp)
        return d


def check_feature_tensor(x: torch.Tensor, num_features: int, dim: int, where: str) -> None:
    """Raise a ValueError that says which size is wrong and how to fix it (skipped while tracing)."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"{where} expects feature embeddings of shape [batch, num_features={num_features}, dim={dim}], got "
            f"{shape}. Fix: stack the per-feature embeddings, e.g. torch.stack([e1, e2, ...], dim=1).")
    if x.shape[1] != num_features:
        raise ValueError(
            f"{where} was built for num_features={num_features} feature embeddings but got {x.shape[1]} "
            f"(input shape {tuple(x.shape)}). Fix: build it with num_features={x.shape[1]}, or pass the "
            "features it was built for.")
    if x.shape[2] != dim:
        raise ValueError(
            f"{where} was built for embedding dim={dim} but got {x.shape[2]} (input shape {tuple(x.shape)}). "
            "WuKong needs every feature embedding to have the same dim d: project them to d first.")


class FactorizationMachineBlock(nn.Module):
    """FMB: [B, n, d] -> [B, n_F, d] = reshape(MLP(LN(flatten(X (X^T Y)))))  with Y in R^{n x k}."""

    def __init__(self, num_features: int, dim: int, output_features: int, compressed_features: int,
                 mlp_hidden: Sequence[int] = (64,), layer_norm: bool = True, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.dim = num_features, dim
        self.output_features, self.compressed_features = output_features, compressed_features
        self.compress = nn.Parameter(torch.empty(num_features, compressed_features))  # Y
        nn.init.xavier_uniform_(self.compress)
        flat = num_features * compressed_features
        self.norm = nn.LayerNorm(flat, eps=eps) if layer_norm else nn.Identity()
        self.mlp = mlp(flat, mlp_hidden, output_features * dim)

    def interactions(self, x: torch.Tensor) -> torch.Tensor:
        """X X^T Y computed as X (X^T Y): [B, n, d] -> [B, n, k]."""
        xty = torch.einsum("bnd,nk->bdk", x, self.compress)  # X^T Y: [B, d, k]
        return torch.bmm(x, xty)  # X (X^T Y): [B, n, k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_tensor(x, self.num_features, self.dim, "FactorizationMachineBlock")
        fm = self.interactions(x).flatten(1)
        return self.mlp(self.norm(fm)).view(x.shape[0], self.output_features, self.dim)


class LinearCompressBlock(nn.Module):
    """LCB: [B, n, d] -> [B, n_L, d] = W_L X, a linear recombination of the n embeddings (no bias)."""

    def __init__(self, num_features: int, dim: int, output_features: int):
        super().__init__()
        self.num_features, self.dim, self.output_features = num_features, dim, output_features
        self.weight = nn.Parameter(torch.empty(output_features, num_features))  # W_L
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_tensor(x, self.num_features, self.dim, "LinearCompressBlock")
        return torch.einsum("ln,bnd->bld", self.weight, x)


class WukongLayer(nn.Module):
    """One layer: LN_d(concat(FMB(X), LCB(X)) + R X), [B, n, d] -> [B, n_F + n_L, d].

    R = identity when n == n_F + n_L, else a learned linear map over the feature axis (no bias).
    """

    def __init__(self, num_features: int, dim: int, config: WukongConfig):
        super().__init__()
        self.num_features, self.dim = num_features, dim
        self.output_features = config.output_feature_num
        self.fmb = FactorizationMachineBlock(num_features, dim, config.fmb_feature_num,
                                             config.compressed_feature_num, config.fmb_mlp,
                                             config.fmb_layer_norm, config.layer_norm_eps)
        self.lcb = LinearCompressBlock(num_features, dim, config.lcb_feature_num)
        self.residual = (None if num_features == self.output_features
                         else LinearCompressBlock(num_features, dim, self.output_features))
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_tensor(x, self.num_features, self.dim, "WukongLayer")
        mixed = self.dropout(torch.cat([self.fmb(x), self.lcb(x)], dim=1))
        skip = x if self.residual is None else self.residual(x)
        return self.norm(mixed + skip)


class WukongTower(nn.Module):
    """L stacked WuKong layers: [B, num_features, dim] -> [B, n_F + n_L, dim]."""

    def __init__(self, num_features: int, dim: int, config: WukongConfig | None = None):
        super().__init__()
        self.config = config or WukongConfig()
        self.num_features = positive_int("WukongTower", "num_features", num_features)
        self.dim = positive_int("WukongTower", "dim", dim)
        layers, n = [], num_features
        for _ in range(self.config.num_layers):
            layers.append(WukongLayer(n, dim, self.config))
            n = self.config.output_feature_num
        self.layers = nn.ModuleList(layers)

    @property
    def output_features(self) -> int:
        return self.config.output_feature_num

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_tensor(x, self.num_features, self.dim, "WukongTower")
        for layer in self.layers:
            x = layer(x)
        return x
