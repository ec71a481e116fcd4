"""Entry points: one function per kernel, choosing Triton on a GPU and the torch reference on CPU.

``impl=None`` → "triton" when the input is on CUDA, else "torch". ``impl="triton"`` with CPU tensors runs the
Triton kernels under the interpreter (TRITON_INTERPRET=1); that is how the tests exercise them without a GPU.
Triton modules are imported lazily, so ``import kernels`` stays cheap and the interpreter switch can still be
flipped before the first Triton kernel is defined.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any

import torch
from moesim.kernels import reference

__all__ = ["KernelError", "fused_moe", "grouped_topk", "moe_align", "resolve_impl", "topk_softmax"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KernelError(ValueError):
    """A bad argument to a kernel entry point (shape, dtype, device or impl), with a one-line message."""


def resolve_impl(impl: str | None, tensor: torch.Tensor) -> str:
    if impl is None:
        return "triton" if tensor.is_cuda else "torch"
    if impl not in ("triton", "torch"):
        raise KernelError(f"impl must be 'triton', 'torch' or None, not {impl!r}")
    return impl


def _triton_module(name: str, tensor: torch.Tensor) -> ModuleType:
    """Import moesim.kernels.<name> (a Triton module), switching the interpreter on first if the data is on CPU."""
    full = f"moesim.kernels.{name}"
    if not tensor.is_cuda:
        if full not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
        elif os.environ.get("TRITON_INTERPRET") != "1":
            raise KernelError(
                f"{full} was compiled for the GPU; CPU tensors need TRITON_INTERPRET=1 set before it is imported"
            )
    return importlib.import_module(full)


def _check_float(name: str, x: torch.Tensor, ndim: int) -> None:
    if x.dim() != ndim:
        raise KernelError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise KernelError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")


def topk_softmax(
    logits: torch.Tensor, k: int, renormalize: bool = True, impl: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax router top-k. logits [T, E] → (weights [T, k] float32, ids [T, k] int64).

    With ``renormalize`` the chosen probabilities are rescaled to sum to 1 per token.
    """
    _check_float("logits", logits, 2)
    if not 1 <= k <= logits.shape[1]:
        raise KernelError(f"top-k must be in 1..{logits.shape[1]} (experts), got {k}")
    if resolve_impl(impl, logits) == "torch":
        return reference.topk_softmax_ref(logits, k, renormalize)
    return _triton_module("router", logits).topk_softmax_triton(logits, k, renormalize)


def grouped_topk(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    num_groups: int,
    topk_groups: int,
    scaling: float = 1.0,
    impl: str | None = None,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 grouped sigmoid top-k. logits [T, E], bias [E] | None → (weights [T, k] f32, ids [T, k] i64).

    See ``reference.grouped_topk_ref`` for the exact rule.
    """
    _check_float("logits", logits, 2)
    e = logits.shape[1]
    if num_groups < 1 or e % num_groups:
        raise KernelError(f"{e} experts do not split into {num_groups} equal groups")
    if not 1 <= topk_groups <= num_groups:
        raise KernelError(f"topk_groups must be in 1..{num_groups}, got {topk_groups}")
    if not 1 <= k <= topk_groups * (e // num_groups):
        raise KernelError(f"top-k {k} exceeds the {topk_groups * (e // num_groups)} experts of the kept groups")
    if bias is not None and tuple(bias.shape) != (e,):
        raise KernelError(f"bias must have shape ({e},), got {tuple(bias.shape)}")
    if resolve_impl(impl, logits) == "torch":
        return reference.grouped_topk_ref(logits, bias, k, num_groups, topk_groups, scaling, renormalize)
    return _triton_module("router", logits).grouped_topk_triton(
        logits, bias, k, num_groups, topk_groups, scaling, renormalize
    )


def _check_ids(ids: torch.Tensor, expert_map: torch.Tensor | None, num_local: int) -> None:
    """Shapes and dtypes always; value ranges only off the GPU (there a check would cost a host sync per call, and
    the Triton kernels do not bound-check: out-of-range ids read garbage)."""
    if ids.dim() != 2:
        raise KernelError(f"topk_ids must be [T, k], got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise KernelError(f"topk_ids must be int32 or int64, got {ids.dtype}")
    if expert_map is not None and (expert_map.dim() != 1 or expert_map.dtype not in (torch.int32, torch.int64)):
        raise KernelError("expert_map must be a 1-D int32/int64 tensor (local index, -1 = not resident)")
    if ids.is_cuda or ids.numel() == 0:
        return
    limit = expert_map.numel() if expert_map is not None else num_local
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= limit:
        what = "expert_map's length" if expert_map is not None else "the number of local experts"
        raise KernelError(f"topk_ids must lie in [0, {limit}) ({what}), got values in [{lo}, {hi}]")
    if expert_map is not None and expert_map.numel() and int(expert_map.max()) >= num_local:
        raise KernelError(f"expert_map points at local expert {int(expert_map.max())} but only {num_local} exist")


def moe_align(
    ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    expert_map: torch.Tensor | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (token, choice) slots by local expert into block_m-padded segments.

    ids [T, k] → (sorted_token_ids [P] int32, block_expert_ids [P // block_m] int32, num_tokens_post_pad [1] int32);
    see ``reference.moe_align_ref``. ``num_experts`` is the number of local experts.
    """
    if num_experts < 1 or block_m < 1:
        raise KernelError(f"num_experts and block_m must be positive, got {num_experts}, {block_m}")
    _check_ids(ids, expert_map, num_experts)
    if resolve_impl(impl, ids) == "torch":
        return reference.moe_align_ref(ids, num_experts, block_m, expert_map)
    return _triton_module("align", ids).moe_align_triton(ids, num_experts, block_m, expert_map)


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None = None,
    impl: str | None = None,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Expert FFN of a MoE layer for the experts resident here; returns [T, H] in hidden's dtype.

    hidden [T, H]; w13 [E_local, 2F, H] (gate rows then up rows); w2 [E_local, H, F]; topk_weights [T, k];
    topk_ids [T, k] global expert ids; expert_map [E_global] int (-1 = not resident) or None (ids are local).
    out[t] = Σ_j w[t,j] · W2 (SiLU(gate(x_t)) ⊙ up(x_t)); non-resident choices contribute 0.
    ``config`` overrides the launch configuration (see kernels.configs); by default it is looked up by shape,
    device and dtype.
    """
    _check_float("hidden", hidden, 2)
    _check_float("w13", w13, 3)
    _check_float("w2", w2, 3)
    t, h = hidden.shape
    e, two_f, h13 = w13.shape
    _check_ids(topk_ids, expert_map, e)
    if two_f % 2 or h13 != h:
        raise KernelError(f"w13 must be [E, 2F, {h}], got {tuple(w13.shape)}")
    if tuple(w2.shape) != (e, h, two_f // 2):
        raise KernelError(f"w2 must be [{e}, {h}, {two_f // 2}], got {tuple(w2.shape)}")
    if w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise KernelError(f"weights must share hidden's dtype {hidden.dtype}, got {w13.dtype} and {w2.dtype}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape) or topk_ids.shape[0] != t:
        raise KernelError(
            f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} must both be [{t}, k]"
        )
    if resolve_impl(impl, hidden) == "torch":
        return reference.fused_moe_ref(hidden, w13, w2, topk_weights, topk_ids, expert_map)
    return _triton_module("fused", hidden).fused_moe_triton(
        hidden, w13, w2, topk_weights, topk_ids, expert_map, config=config
    )
