"""Transformers4Rec adapters: HSTU / SASRec encoders and masking (`encoders`), the generative retrieval task
(`retrieval`), the DLRM-HSTU ranking head (`ranking`), WuKong CTR blocks (`ctr`), and the train / eval files that
`tr.Trainer` reads from our workflows' outputs (`data`; docs/t4r.md, "Training with tr.Trainer on our workflows").

Importing this package imports Transformers4Rec and registers "hstu", "hstu-time", "hstu-clm" and "sasrec"
with T4R and the Hugging Face Auto classes (idempotent).  `import merlin_hstu` alone does not import T4R; it
makes the same registration happen once T4R or transformers is imported (see `merlin_hstu.__init__`).
The names below were `merlin_hstu.t4r.*` before the package split and stay importable from here (saved T4R
models name them).
"""
from merlin_hstu.t4r.encoders import *  # noqa: F401,F403
from merlin_hstu.t4r.encoders import __all__  # noqa: F401
