"""Attention kernels: the PyTorch reference (CPU path and oracle), Triton kernels (GPU) and the switch.

Importing this package never imports triton; the Triton module loads on the first Triton call.  Which
implementation runs is decided in one place, `dispatch.resolve_kernel`, called by the ops themselves
(`hstu_attention`, `plan_hstu_attention`, `hstu_attention_rows`); callers pass a kernel name through.
"""
import importlib

# name -> submodule; resolved on first access (PEP 562), so `import merlin_hstu.kernels.bench` (done by
# `merlin-hstu --help` to build its parser) does not import torch.
_EXPORTS = {
    **dict.fromkeys(["KERNELS", "OP_KERNELS", "get_default_kernel", "resolve_kernel", "set_default_kernel",
                     "use_kernel"], "dispatch"),
    **dict.fromkeys(["HSTUAttentionPlan", "hstu_attention", "hstu_attention_pytorch", "hstu_attention_reference",
                     "hstu_attention_rows", "hstu_attention_with_plan", "plan_hstu_attention",
                     "valid_attention_mask"], "attention_ops"),
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
