"""Attention kernels: the PyTorch reference (CPU path and oracle), Triton kernels (GPU) and the switch.

Importing this package never imports triton; the Triton module loads on the first Triton call.
"""
from merlin_hstu.kernels.dispatch import (
    KERNELS,
    get_default_kernel,
    resolve_kernel,
    set_default_kernel,
    use_kernel,
)
from merlin_hstu.kernels.hstu_attention import (
    hstu_attention,
    hstu_attention_pytorch,
    hstu_attention_reference,
    hstu_attention_rows,
    valid_attention_mask,
)

__all__ = [
    "KERNELS",
    "get_default_kernel",
    "hstu_attention",
    "hstu_attention_pytorch",
    "hstu_attention_reference",
    "hstu_attention_rows",
    "resolve_kernel",
    "set_default_kernel",
    "use_kernel",
    "valid_attention_mask",
]
