"""Attention kernels: the PyTorch reference (CPU path and oracle), Triton kernels (GPU) and the switch.

Importing this package never imports triton; the Triton module loads on the first Triton call.  Which
implementation runs is decided in one place, `dispatch.resolve_kernel`, called by the ops themselves
(`hstu_attention`, `plan_hstu_attention`, `hstu_attention_rows`); callers pass a kernel name through.
"""
from merlin_hstu.kernels.dispatch import (
    KERNELS,
    OP_KERNELS,
    get_default_kernel,
    resolve_kernel,
    set_default_kernel,
    use_kernel,
)
from merlin_hstu.kernels.hstu_attention import (
    HSTUAttentionPlan,
    hstu_attention,
    hstu_attention_pytorch,
    hstu_attention_reference,
    hstu_attention_rows,
    hstu_attention_with_plan,
    plan_hstu_attention,
    valid_attention_mask,
)

__all__ = [
    "HSTUAttentionPlan",
    "KERNELS",
    "OP_KERNELS",
    "get_default_kernel",
    "hstu_attention",
    "hstu_attention_pytorch",
    "hstu_attention_reference",
    "hstu_attention_rows",
    "hstu_attention_with_plan",
    "plan_hstu_attention",
    "resolve_kernel",
    "set_default_kernel",
    "use_kernel",
    "valid_attention_mask",
]
