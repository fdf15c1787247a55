"""merlin_hstu: HSTU generative recommenders as parts of NVIDIA Merlin.

Registration with Transformers4Rec and the Hugging Face Auto classes (`merlin_hstu.t4r.encoders.register`, idempotent)
happens as soon as it can be used, without making `import merlin_hstu` pay for importing T4R (about 6 s):

* if `transformers4rec` or `transformers` is already imported, `import merlin_hstu` registers at once;
* otherwise a post-import hook registers the moment `transformers4rec.torch` or `transformers` finishes
  importing, so `tr.TransformerBlock.from_registry("hstu", ...)`, `masking="hstu-clm"` and
  `AutoConfig.for_model("hstu")` work whichever package the user imported first.

`merlin_hstu.HSTUConfig`, `HSTUModel`, ... are loaded lazily from `merlin_hstu.t4r.encoders` on first access.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import threading

__version__ = "0.1.0"

_T4R_EXPORTS = {
    "GenerativeRetrievalTask",
    "HSTUCausalLanguageModeling",
    "HSTUConfig",
    "HSTUModel",
    "HSTUSequenceFeatures",
    "SASRecConfig",
    "SASRecModel",
    "T4RecHSTUConfig",
    "T4RecHSTUTimeConfig",
    "T4RecSASRecConfig",
}
_TRIGGERS = ("transformers4rec.torch", "transformers")
_lock = threading.RLock()
_registered = False


def register() -> None:
    """Register HSTU with Transformers4Rec and the Hugging Face Auto classes (idempotent)."""
    global _registered
    with _lock:
        from merlin_hstu.t4r import encoders as t4r

        t4r.register()
        _registered = True


def _mid_import(name: str) -> bool:
    """True while module `name` is still executing its own imports (registering then would be circular)."""
    module = sys.modules.get(name)
    return module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of the trigger modules so that `register()` runs once they have finished executing."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _TRIGGERS or _registered:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        real_exec = loader.exec_module

        def exec_module(module):
            real_exec(module)
            if _registered:
                return
            if fullname == "transformers" and "transformers4rec" in sys.modules:
                return  # T4R is importing transformers; its own trigger registers once T4R is complete
            if _mid_import("merlin_hstu.t4r.encoders"):
                return  # merlin_hstu.t4r.encoders is importing its dependencies; it registers itself when complete
            _uninstall_hook()
            register()

        loader.exec_module = exec_module
        return spec


_hook = _RegisterAfterImport()


def _uninstall_hook() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def _install() -> None:
    if importlib.util.find_spec("transformers4rec") is None:
        return  # the encoder, kernels and training need only torch
    if any(name in sys.modules for name in ("transformers4rec", "transformers")) and not _mid_import(
        "transformers4rec.torch"
    ):
        register()
    elif _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


def __getattr__(name: str):
    if name in _T4R_EXPORTS:
        return getattr(importlib.import_module("merlin_hstu.t4r.encoders"), name)
    raise AttributeError(f"module 'merlin_hstu' has no attribute {name!r}")


_install()
