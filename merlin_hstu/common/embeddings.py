"""Embedding tables of every model: plain `nn.Embedding` ("torch", the default) or torchrec ("torchrec").

A model builds its tables as `nn.Embedding` modules either way, so both backends start from the same weights
(the same random numbers, drawn in the same order). With `embeddings: torchrec` the model then hands them to
`to_torchrec`, which moves them into torchrec `EmbeddingCollection`s (sequence features: every id gets its
own vector) or `EmbeddingBagCollection`s (pooled features: one id per row and feature, sum pooling, the CTR
models; one collection per table width, torchrec's rule) under the model attribute `sparse`, and leaves a `TableView` where each `nn.Embedding` was. A view is
called like the module it replaces (`view(ids) -> [*ids.shape, D]`, `view.weight`, `view.embedding_dim`), but
the lookup goes through the collection, fed by a `KeyedJaggedTensor`:

    keys    the collection's features, in its order (a lookup of some features sends the others empty)
    values  the ids of each feature, one after another          lengths  [n_f] per feature (one "row" each)

One id currency: the ids are the workflow's encoded ids in both backends, and so are the weights. The state dict
of a torchrec model names every table as the `nn.Embedding` did (`item_embedding.weight`, `embeddings.0.weight`,
`contextual_embeddings.age.weight`), so run directories and checkpoints load in either backend, and weights
trained with torchrec serve through the plain modules.

Why outputs are equal to 1e-6 (in fact bit for bit on the CPU): an unsharded collection looks rows up with the
same `nn.Embedding` / sum-pooled `nn.EmbeddingBag` of one id per bag, i.e. the same rows. `padding_idx` keeps its
meaning: a view returns the padding row's values but passes it no gradient, as `nn.Embedding(padding_idx=...)`.

Sharded (`merlin_hstu.distributed.sharding`: `DistributedModelParallel` swaps the collection for its sharded
version), a lookup is a collective: every rank must make the same lookups in the same order (the training loop
and evaluation do), and the result arrives as an awaitable (`.wait()`), which `lookup` resolves. `weight` of a
sharded table is then a lookup of every row (for evaluation's top-K; training never needs it).

Jagged helpers (`padded_to_jagged`, `jagged_to_padded`, `complete_cumsum`) are fbgemm_gpu's jagged operators
(`dense_to_jagged`, `jagged_to_padded_dense`, `asynchronous_complete_cumsum`), which have gradients on CPU and GPU.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

EMBEDDING_BACKENDS = ("torch", "torchrec")
SPARSE_ATTRIBUTE = "sparse"  # the model attribute holding the torchrec collection


def check_backend(value, where: str) -> str:
    if value not in EMBEDDING_BACKENDS:
        raise ValueError(f"{where} must be one of {list(EMBEDDING_BACKENDS)}, got {value!r} (torch: nn.Embedding "
                         "tables; torchrec: an EmbeddingCollection / EmbeddingBagCollection, shardable across "
                         "processes)")
    return value


# ------------------------------------------------------------------------------------------------------------
# fbgemm jagged operators
# ------------------------------------------------------------------------------------------------------------
def _fbgemm():
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

    return torch.ops.fbgemm


def complete_cumsum(lengths: Tensor) -> Tensor:
    """[B] lengths -> [B + 1] offsets (0, l_0, l_0 + l_1, ...)."""
    return _fbgemm().asynchronous_complete_cumsum(lengths.long())


def padded_to_jagged(dense: Tensor, lengths: Tensor) -> Tensor:
    """[B, W, ...] -> the first lengths[b] entries of every row, one row after another ([sum lengths, ...])."""
    offsets = complete_cumsum(lengths.clamp(max=dense.shape[1]))
    squeeze = dense.dim() == 2
    values = _fbgemm().dense_to_jagged(dense.unsqueeze(-1) if squeeze else dense, [offsets])[0]
    return values.squeeze(-1) if squeeze else values


def jagged_to_padded(values: Tensor, lengths: Tensor, width: int, padding_value: float = 0.0) -> Tensor:
    """[sum lengths, D] rows -> [B, width, D], `padding_value` after each row's end (gradients flow back)."""
    offsets = complete_cumsum(lengths.clamp(max=width))
    return _fbgemm().jagged_to_padded_dense(values, [offsets], [int(width)], padding_value)


def quiet_fx_notice() -> None:
    """torch logs (once per process) that `is_fx_tracing` changed meaning when torchrec asks it during a lookup;
    it concerns torch.fx users, not a lookup: keep it out of training output."""
    import logging

    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------------------------------
# the torchrec collection
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableSpec:
    key: str  # the table's state-dict name without ".weight" (its nn.Embedding's path in the model)
    num_embeddings: int
    embedding_dim: int
    feature: str  # the id feature that reads it
    padding_idx: Optional[int] = None

    @property
    def table_name(self) -> str:
        """The name inside the collection: the path with '.' -> '__' (ModuleDict keys cannot hold dots)."""
        return self.key.replace(".", "__")


class TorchrecTables(nn.Module):
    """Named tables in one torchrec EmbeddingCollection (`pooled=False`) or EmbeddingBagCollection (`pooled=True`,
    sum pooling). Build it with `to_torchrec`."""

    def __init__(self, specs: Sequence[TableSpec], pooled: bool = False, device: Optional[torch.device] = None):
        super().__init__()
        quiet_fx_notice()
        if not specs:
            raise ValueError("TorchrecTables needs at least one table")
        self.specs: Tuple[TableSpec, ...] = tuple(specs)
        self.pooled = pooled
        for spec in self.specs:
            # a table named like a ModuleDict method ("items", "keys", "values", ...) breaks the collection
            if hasattr(nn.ModuleDict, spec.table_name):
                raise ValueError(f"embedding table name {spec.table_name!r} clashes with a ModuleDict attribute; "
                                 "rename the table")
        features = [s.feature for s in self.specs]
        if len(set(features)) != len(features):
            raise ValueError(f"every torchrec table needs its own feature name, got {features}")
        self.features: Tuple[str, ...] = tuple(features)
        self._by_key = {s.key: s for s in self.specs}
        # a torchrec collection holds tables of one width: one collection per width, in order of first appearance
        self.widths: Tuple[int, ...] = tuple(dict.fromkeys(s.embedding_dim for s in self.specs))
        self.collections = self._new_collections(device or torch.device("cpu"))

    def _new_collections(self, device: torch.device) -> nn.ModuleDict:
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
        from torchrec.modules.embedding_configs import PoolingType

        collections = {}
        for width in self.widths:
            group = [s for s in self.specs if s.embedding_dim == width]
            if self.pooled:
                collections[f"dim{width}"] = EmbeddingBagCollection(tables=[
                    EmbeddingBagConfig(name=s.table_name, embedding_dim=width, num_embeddings=s.num_embeddings,
                                       feature_names=[s.feature], pooling=PoolingType.SUM) for s in group],
                    device=torch.device("meta"))
            else:
                collections[f"dim{width}"] = EmbeddingCollection(tables=[
                    EmbeddingConfig(name=s.table_name, embedding_dim=width, num_embeddings=s.num_embeddings,
                                    feature_names=[s.feature]) for s in group], device=torch.device("meta"))
        return nn.ModuleDict(collections).to_empty(device=device)

    def unshard(self, device: Optional[torch.device] = None) -> None:
        """Put plain (unsharded) collections back, uninitialised: load the gathered weights next (the training loop
        does this at the end of a sharded run, so the caller's model is a plain one again)."""
        self.collections = self._new_collections(device or torch.device("cpu"))

    # --- names -------------------------------------------------------------------------------------------
    def native_key(self, spec: TableSpec) -> str:
        """The weight's key in this module's own state dict."""
        group = "embedding_bags" if self.pooled else "embeddings"
        return f"collections.dim{spec.embedding_dim}.{group}.{spec.table_name}.weight"

    def spec(self, key: str) -> TableSpec:
        return self._by_key[key]

    def _collection(self, spec: TableSpec) -> nn.Module:
        return self.collections[f"dim{spec.embedding_dim}"]

    @property
    def sharded(self) -> bool:
        from torchrec.distributed.types import ShardedModule

        return any(isinstance(c, ShardedModule) for c in self.collections.values())

    def local_weight(self, spec: TableSpec) -> Tensor:
        """The unsharded table's parameter."""
        collection = self._collection(spec)
        group = collection.embedding_bags if self.pooled else collection.embeddings
        return group[spec.table_name].weight

    def device(self) -> torch.device:
        for tensor in self.collections.parameters():
            return tensor.device if tensor.device.type != "meta" else torch.device("cpu")
        return torch.device("cpu")

    # --- lookups -----------------------------------------------------------------------------------------
    def _kjt(self, features: Sequence[str], ids: Dict[str, Tensor], device: torch.device):
        """One KeyedJaggedTensor over `features`: each one's ids as one row (lengths [n_f]); those not in `ids`
        empty."""
        from torchrec import KeyedJaggedTensor

        empty = torch.zeros(0, dtype=torch.long, device=device)
        values = [ids.get(feature, empty).reshape(-1).long().to(device) for feature in features]
        lengths = torch.tensor([v.numel() for v in values], dtype=torch.long, device=device)
        return KeyedJaggedTensor(keys=list(features), values=torch.cat(values), lengths=lengths)

    @staticmethod
    def _call(collection: nn.Module, kjt):
        quiet_fx_notice()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
            out = collection(kjt)
        return out.wait() if hasattr(out, "wait") else out

    def lookup(self, ids: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """{feature: ids of any shape} -> {feature: [*ids.shape, D]}: one KeyedJaggedTensor per collection (every
        collection is called, also with no ids: sharded, a lookup is a collective every rank takes part in)."""
        if self.pooled:
            raise TypeError("lookup is for sequence tables (EmbeddingCollection); pooled tables use pooled_lookup")
        unknown = sorted(set(ids) - set(self.features))
        if unknown:
            raise ValueError(f"unknown embedding feature(s) {unknown}; the tables read {list(self.features)}")
        device = self.device()
        result = {}
        for width in self.widths:
            features = [s.feature for s in self.specs if s.embedding_dim == width]
            out = self._call(self.collections[f"dim{width}"], self._kjt(features, ids, device))
            for feature in features:
                if feature not in ids:
                    continue
                value = ids[feature]
                spec = self.specs[self.features.index(feature)]
                vectors = out[feature].values().reshape(*value.shape, width)
                if spec.padding_idx is not None:  # nn.Embedding(padding_idx=...): the row's values, no gradient
                    pad = (value == spec.padding_idx).to(vectors.device).unsqueeze(-1)
                    vectors = torch.where(pad, vectors.detach(), vectors)
                result[feature] = vectors
        return result

    def pooled_lookup(self, sparse: Tensor) -> Tensor:
        """[B, F] ids, column f for feature f -> [B, F, D] (one id per bag: the rows themselves)."""
        if not self.pooled:
            raise TypeError("pooled_lookup is for EmbeddingBagCollection tables")
        if sparse.dim() != 2 or sparse.shape[1] != len(self.features):
            raise ValueError(f"pooled ids must be [batch, {len(self.features)}], got {tuple(sparse.shape)}")
        if len(self.widths) != 1:
            raise ValueError(f"pooled_lookup stacks features of one width; got widths {list(self.widths)}")
        from torchrec import KeyedJaggedTensor

        batch, width = sparse.shape[0], self.widths[0]
        device = self.device()
        kjt = KeyedJaggedTensor(keys=list(self.features), values=sparse.t().reshape(-1).long().to(device),
                                lengths=torch.ones(batch * len(self.features), dtype=torch.long, device=device))
        return self._call(self.collections[f"dim{width}"], kjt).values().reshape(batch, len(self.features), width)

    def weight(self, key: str) -> Tensor:
        """The whole table [num_embeddings, D]: the parameter itself, or (sharded) every row looked up."""
        spec = self._by_key[key]
        if not self.sharded:
            return self.local_weight(spec)
        rows = torch.arange(spec.num_embeddings, device=self.device())
        if self.pooled:
            raise NotImplementedError("the whole table of a sharded pooled collection is not looked up")
        return self.lookup({spec.feature: rows})[spec.feature]


class TableView:
    """What stands where a model's nn.Embedding was: calls and `weight` go to the torchrec collection."""

    def __init__(self, tables: TorchrecTables, key: str):
        self.tables, self.key = tables, key
        spec = tables.spec(key)
        self.num_embeddings, self.embedding_dim, self.padding_idx = (spec.num_embeddings, spec.embedding_dim,
                                                                    spec.padding_idx)
        self.feature = spec.feature

    def __call__(self, ids: Tensor) -> Tensor:
        return self.tables.lookup({self.feature: ids})[self.feature]

    @property
    def weight(self) -> Tensor:
        return self.tables.weight(self.key)

    def __repr__(self) -> str:
        return f"TableView({self.key!r} -> torchrec {self.tables.spec(self.key).table_name}, " \
               f"{self.num_embeddings}x{self.embedding_dim})"


class _StateDictAliases:
    """State-dict hooks: the collection's keys <-> the nn.Embedding names (`key.weight`) the torch backend uses."""

    def __init__(self, pairs: Dict[str, str]):
        self.pairs = dict(pairs)  # native (relative to the model) -> legacy

    def save(self, module, state_dict, prefix, local_metadata):
        for native, legacy in self.pairs.items():
            if prefix + native in state_dict:
                state_dict[prefix + legacy] = state_dict.pop(prefix + native)
        return state_dict

    def load(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for native, legacy in self.pairs.items():
            if prefix + legacy in state_dict and prefix + native not in state_dict:
                state_dict[prefix + native] = state_dict.pop(prefix + legacy)


def _replace(model: nn.Module, path: str, value) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if name in parent._modules:
        del parent._modules[name]
    object.__setattr__(parent, name, value) if not isinstance(value, nn.Module) else setattr(parent, name, value)


def to_torchrec(model: nn.Module, tables: Dict[str, str], pooled: bool = False,
                containers: Sequence[str] = ()) -> TorchrecTables:
    """Move `model`'s nn.Embedding tables {path: feature name} into one torchrec collection at `model.sparse`.

    Each table's module is replaced by a `TableView` (the weights are copied, so both backends hold the same
    numbers). `containers`: ModuleDict / ModuleList attributes whose every entry is in `tables`; each becomes a
    plain dict / list of views. State-dict hooks keep the nn.Embedding key names."""
    specs: List[TableSpec] = []
    weights: Dict[str, Tensor] = {}
    for path, feature in tables.items():
        module = model.get_submodule(path)
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"{path} is a {type(module).__name__}, not an nn.Embedding")
        specs.append(TableSpec(path, module.num_embeddings, module.embedding_dim, feature, module.padding_idx))
        weights[path] = module.weight.detach()
    device = next(iter(weights.values())).device
    sparse = TorchrecTables(specs, pooled=pooled, device=device)
    with torch.no_grad():
        for spec in specs:
            sparse.local_weight(spec).copy_(weights[spec.key])
    setattr(model, SPARSE_ATTRIBUTE, sparse)
    for container in containers:
        old = model.get_submodule(container)
        if isinstance(old, nn.ModuleDict):
            new = {name: TableView(sparse, f"{container}.{name}") for name in old.keys()}
        elif isinstance(old, nn.ModuleList):
            new = [TableView(sparse, f"{container}.{i}") for i in range(len(old))]
        else:
            raise TypeError(f"{container} is a {type(old).__name__}, not a ModuleDict / ModuleList")
        _replace(model, container, new)
    inside = tuple(f"{c}." for c in containers)
    for spec in specs:
        if not spec.key.startswith(inside):
            _replace(model, spec.key, TableView(sparse, spec.key))
    aliases = _StateDictAliases({f"{SPARSE_ATTRIBUTE}.{sparse.native_key(s)}": f"{s.key}.weight" for s in specs})
    model._register_state_dict_hook(aliases.save)
    model._register_load_state_dict_pre_hook(aliases.load, with_module=True)
    return sparse


def torchrec_tables(model: nn.Module) -> Optional[TorchrecTables]:
    """The model's torchrec collection, or None for the torch backend."""
    tables = getattr(model, SPARSE_ATTRIBUTE, None)
    return tables if isinstance(tables, TorchrecTables) else None


def table_parameter_ids(model: nn.Module) -> set:
    """ids of the parameters that are embedding tables (nn.Embedding / EmbeddingBag, torchrec collections)."""
    out = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag, TorchrecTables)):
            out.update(id(p) for p in module.parameters())
    return out
