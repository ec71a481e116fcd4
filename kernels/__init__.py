"""MoE kernels: router top-k, token alignment by expert, fused expert FFN — Triton with torch references.

Public entry points (each takes ``impl=None|"triton"|"torch"``; None picks Triton on CUDA, the reference on CPU):
    topk_softmax, grouped_topk, moe_align, fused_moe
The references live in ``kernels.reference``; launch configurations in ``kernels.configs``.
This package imports torch (and, lazily, triton) only — never moesim.
"""

from kernels.api import KernelError, fused_moe, grouped_topk, moe_align, resolve_impl, topk_softmax
from kernels.reference import max_padded_slots

__all__ = [
    "KernelError",
    "fused_moe",
    "grouped_topk",
    "max_padded_slots",
    "moe_align",
    "resolve_impl",
    "topk_softmax",
]
