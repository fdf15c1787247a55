"""merlin_hstu: HSTU generative recommenders as parts of NVIDIA Merlin.

Transformers4Rec / Hugging Face registration
--------------------------------------------
After `import merlin_hstu`, `tr.TransformerBlock.from_registry("hstu", ...)`, `masking="hstu-clm"` and
`AutoConfig.for_model("hstu")` work whichever of merlin_hstu, `transformers4rec.torch` and `transformers` is
imported first.  `import merlin_hstu` itself imports neither (T4R costs several seconds; the encoder,
kernels and training need only torch).  The registration code is `merlin_hstu.t4r.encoders.register()`
(idempotent); importing `merlin_hstu.t4r` runs it, and so does `merlin_hstu.register()`.  It runs:

* at `import merlin_hstu`, if `transformers` (which T4R imports) is already imported;
* otherwise when `transformers4rec.torch` or `transformers` finishes importing, through a post-import hook.

The hook is one object in `sys.meta_path`.  That list is per-interpreter state that `importlib.reload`,
IPython's autoreload (which clears the module's namespace before re-running it) and a fresh re-import all
leave alone, so the hook is found there by its marker attribute, not by a module global:

* installing it replaces an earlier copy in place, so there is at most one (two hooks that each asked the
  other for the real spec recursed without end);
* it asks the other finders for the real spec, skipping any finder with the marker; its wrapper of a
  loader's `exec_module` carries the marker too, so a loader is never wrapped twice, and the wrapper
  removes itself after one run;
* `find_spec` reads no module globals, since autoreload's re-run of this module imports through it while
  the namespace is still empty;
* it stays installed but inert once the triggers are imported (it only answers for those two names).

Why this design, the simplest that meets all of the above: an explicit `import merlin_hstu.t4r` (it works,
and is the hook-free one-liner) would not make `import merlin_hstu` enough when T4R is imported later;
neither T4R nor transformers reads plugin entry points for its registries; and a post-import hook kept in
a module global is exactly what a reload duplicates.

`merlin_hstu.HSTUConfig`, `HSTUModel`, ... are loaded lazily from `merlin_hstu.t4r.encoders` on first access.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

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
_ENCODERS = "merlin_hstu.t4r.encoders"
# Marks the hook (a class attribute) and the loader wrapper; a plain string so every copy of this module agrees.
_MARK = "merlin_hstu_registers_after_import"


def register() -> None:
    """Register HSTU (and the SASRec baseline) with Transformers4Rec and the Hugging Face Auto classes.

    Idempotent.  Imports Transformers4Rec.
    """
    importlib.import_module(_ENCODERS).register()


def _register_after(trigger: str) -> None:
    """Runs right after `trigger` finished executing; registers unless that would be premature."""
    if _ENCODERS in sys.modules:
        return  # the encoders module registers at the end of its own import (or already has)
    if trigger == "transformers" and "transformers4rec" in sys.modules:
        # T4R is mid-import (registering now would be circular) or imported without its torch API: the
        # transformers4rec.torch trigger registers.
        return
    try:
        register()
    except Exception as exc:  # noqa: BLE001 - the user's import of `trigger` succeeded; do not fail it
        import warnings

        warnings.warn(
            f"merlin_hstu could not register HSTU with Transformers4Rec after importing {trigger}: {exc!r}; "
            "call merlin_hstu.register() to see the full error",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisterAfterImport:
    """Meta-path finder that wraps the trigger modules' loaders so that `on_loaded(name)` runs once they have
    executed.  It never loads anything itself: it returns the spec the other finders produce.

    `find_spec` uses only its own attributes and locals, no module globals: IPython's autoreload empties this
    module's namespace before re-running it, and the imports of that re-run ask this finder too.
    """

    merlin_hstu_registers_after_import = True  # the marker (== _MARK) by which a re-run of this module finds it

    def __init__(self, triggers, on_loaded, mark: str) -> None:
        self.triggers = frozenset(triggers)
        self.on_loaded = on_loaded
        self.mark = mark
        self.resolving: set = set()  # guards against finders that, like this one, ask the whole meta path

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.triggers or fullname in self.resolving:
            return None
        import sys  # a local import of a built-in module: see the class docstring

        self.resolving.add(fullname)
        try:
            spec = None
            for finder in list(sys.meta_path):
                if getattr(finder, self.mark, False) or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self.resolving.discard(fullname)
        if spec is None:
            return None
        loader, on_loaded = spec.loader, self.on_loaded
        exec_module = getattr(loader, "exec_module", None)
        # Only a per-module loader instance is wrapped (never a class such as BuiltinImporter), and only once.
        if exec_module is None or isinstance(loader, type) or getattr(exec_module, self.mark, False):
            return spec

        def exec_then_register(module):
            try:
                exec_module(module)
            finally:
                del loader.exec_module  # back to the class's method: the wrapper runs once
            on_loaded(fullname)

        setattr(exec_then_register, self.mark, True)
        try:
            loader.exec_module = exec_then_register
        except AttributeError:  # a loader without an instance __dict__: cannot wrap, import it unchanged
            pass
        return spec


def _install() -> None:
    if importlib.util.find_spec("transformers4rec") is None:
        return  # the encoder, kernels and training need only torch
    if "transformers" in sys.modules:  # also true once transformers4rec.torch is imported
        register()
        return
    hook = _RegisterAfterImport(_TRIGGERS, _register_after, _MARK)
    for i, finder in enumerate(sys.meta_path):
        if getattr(finder, _MARK, False):
            sys.meta_path[i] = hook  # a reload or re-import: swap in this copy, never add a second
            return
    sys.meta_path.insert(0, hook)


def __getattr__(name: str):
    if name in _T4R_EXPORTS:
        return getattr(importlib.import_module(_ENCODERS), name)
    # IPython's autoreload clears this namespace before re-running it, which drops the attributes that name
    # already-imported subpackages (`merlin_hstu.t4r`); they are still in sys.modules.
    submodule = sys.modules.get(f"{__name__}.{name}")
    if submodule is not None:
        return submodule
    raise AttributeError(f"module 'merlin_hstu' has no attribute {name!r}")


_install()
