"""merlin_hstu: HSTU generative recommenders as parts of NVIDIA Merlin.

When Transformers4Rec is installed, importing the package registers HSTU with the Hugging Face Auto classes
and T4R's registries (`merlin_hstu.t4r.register`, idempotent), so that right after `import merlin_hstu`

    tr.TransformerBlock.from_registry("hstu", d_model=..., n_head=..., n_layer=..., total_seq_length=...)

works like any built-in encoder.  T4R is imported eagerly here because it has no plugin discovery: a lazy
hook could not guarantee that the string lookups work for a user who imported T4R before or after us.
Without T4R installed the package still imports (the encoder and kernels need only torch).
"""
from __future__ import annotations

import importlib.util

__version__ = "0.1.0"

if importlib.util.find_spec("transformers4rec") is not None:
    # Not wrapped in try/except ImportError: with T4R present, a broken integration must fail loudly.
    from merlin_hstu.t4r import (  # noqa: F401
        HSTUCausalLanguageModeling,
        HSTUConfig,
        HSTUModel,
        HSTUSequenceFeatures,
        T4RecHSTUConfig,
        T4RecHSTUTimeConfig,
        register,
    )

    register()
