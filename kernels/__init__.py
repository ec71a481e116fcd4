"""MoE kernels: router top-k, token alignment by expert, fused expert FFN — Triton with torch references.

Public entry points (each takes ``impl=None|"triton"|"torch"``; None picks Triton on CUDA, the reference on CPU):
    topk_softmax, grouped_topk, moe_align, fused_moe
Modules: ``reference`` (torch ground truth), ``router`` / ``align`` / ``fused`` (Triton), ``launch`` (tuned
launch configurations in ``configs/*.json`` + heuristic), ``tune`` (the tuner, GPU), ``calibrate`` (timing and the
kernel-calibration JSON for moesim's cost model), ``aot`` (compile for sm_90 without a GPU, report resources).
Without a CUDA device the Triton modules run under the interpreter (TRITON_INTERPRET=1 is set on their import).
This package imports torch (and, lazily, triton) only — never moesim.
"""

from moesim.kernels.api import KernelError, fused_moe, grouped_topk, moe_align, resolve_impl, topk_softmax
from moesim.kernels.reference import max_padded_slots

__all__ = [
    "KernelError",
    "fused_moe",
    "grouped_topk",
    "max_padded_slots",
    "moe_align",
    "resolve_impl",
    "topk_softmax",
]
