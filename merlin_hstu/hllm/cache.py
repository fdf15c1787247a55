"""On-disk cache of item embeddings, keyed by the item encoder's fingerprint and each text's hash.

    cache = EmbeddingCache("~/.cache/merlin_hstu/hllm")
    vectors = cache.encode(encoder, texts)          # hits are read, misses encoded and written

Layout (every file written to a temporary name and renamed into place, so a reader never sees half a file and two
writers never corrupt each other - the worst case is a text encoded twice):

    ROOT/<model key>/model.json          what the key stands for: model, pooling, prompt, width (for people)
    ROOT/<model key>/shard-<hash>.npz    keys [n] (sha256 of each text, hex) and vectors [n, H] float32

The model key is `ItemTextEncoder.fingerprint()`: a hash of the model identity, the prompt, the pooling, the token
budget and every weight.  A changed text has another text hash; a changed model (other weights after fine-tuning,
another prompt or pooling) has another model key - either way the old vectors are simply never found again.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from merlin_hstu.common.atomic_dir import write_file

CACHE_ENV = "MERLIN_HSTU_CACHE"


def default_cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() / "hllm" if root else Path.home() / ".cache" / "merlin_hstu" / "hllm"


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()




class EmbeddingCache:
    """Item embeddings on disk (module docstring).  `hits` / `misses` count texts over this object's lifetime."""

    def __init__(self, root: Optional[str | Path] = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0
        self._loaded: Dict[str, Dict[str, np.ndarray]] = {}

    def model_dir(self, model_key: str) -> Path:
        if not model_key or not all(c in "0123456789abcdef" for c in model_key):
            raise ValueError(f"model key must be a hex digest (ItemTextEncoder.fingerprint()), got {model_key!r}")
        return self.root / model_key[:32]

    def _entries(self, model_key: str) -> Dict[str, np.ndarray]:
        """text hash -> vector for every shard of `model_key` (read once per cache object, then kept current)."""
        if model_key in self._loaded:
            return self._loaded[model_key]
        entries: Dict[str, np.ndarray] = {}
        folder = self.model_dir(model_key)
        for shard in sorted(folder.glob("shard-*.npz")) if folder.is_dir() else []:
            try:
                with np.load(shard, allow_pickle=False) as data:
                    keys, vectors = data["keys"], data["vectors"]
            except (OSError, ValueError, KeyError) as error:
                raise ValueError(f"{shard} is not a readable embedding shard ({error}); delete it (the vectors are "
                                 "encoded again)") from None
            entries.update(zip(keys.tolist(), vectors))
        self._loaded[model_key] = entries
        return entries

    def lookup(self, model_key: str, texts: Sequence[str]):
        """(vectors [N, H] or None when nothing hit, found [N] bool)."""
        entries = self._entries(model_key)
        keys = [text_key(t) for t in texts]
        found = np.array([k in entries for k in keys], dtype=bool)
        if not found.any():
            return None, found
        width = len(next(iter(entries.values())))
        out = np.zeros((len(texts), width), dtype=np.float32)
        for i, k in enumerate(keys):
            if found[i]:
                out[i] = entries[k]
        return out, found

    def store(self, model_key: str, texts: Sequence[str], vectors: np.ndarray, describe: Optional[dict] = None) -> None:
        """Write one shard with `texts`' vectors (atomically)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise ValueError(f"store: {len(texts)} texts but vectors of shape {vectors.shape}")
        if len(texts) == 0:
            return
        folder = self.model_dir(model_key)
        folder.mkdir(parents=True, exist_ok=True)
        keys = np.array([text_key(t) for t in texts])
        if describe is not None and not (folder / "model.json").is_file():
            write_file(folder / "model.json", json.dumps({"fingerprint": model_key, **describe}, indent=2))
        name = hashlib.sha256("".join(keys.tolist()).encode()).hexdigest()[:20]
        write_file(folder / f"shard-{name}.npz", lambda tmp: np.savez(tmp, keys=keys, vectors=vectors))
        self._entries(model_key).update(zip(keys.tolist(), vectors))

    def encode(self, encoder, texts: Sequence[str], model_key: Optional[str] = None) -> torch.Tensor:
        """Embeddings [N, H] of `texts` by `encoder`: cached ones read, the others encoded and stored."""
        model_key = model_key or encoder.fingerprint()
        cached, found = self.lookup(model_key, texts)
        missing = [i for i in range(len(texts)) if not found[i]]
        self.hits += int(found.sum())
        self.misses += len(missing)
        out = np.zeros((len(texts), encoder.hidden_size), dtype=np.float32)
        if cached is not None:
            if cached.shape[1] != encoder.hidden_size:
                raise ValueError(f"cache {self.model_dir(model_key)} holds {cached.shape[1]}-wide vectors for a "
                                 f"{encoder.hidden_size}-wide encoder; delete that directory")
            out[found] = cached[found]
        if missing:
            unique = list(dict.fromkeys(texts[i] for i in missing))
            fresh = encoder.encode(unique).numpy().astype(np.float32)
            self.store(model_key, unique, fresh, encoder.describe())
            row = {t: fresh[j] for j, t in enumerate(unique)}
            for i in missing:
                out[i] = row[texts[i]]
        return torch.from_numpy(out)
