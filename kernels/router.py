"""Triton router kernels: softmax top-k (Mixtral) and DeepSeek-V3 grouped sigmoid top-k.

One program handles BLOCK_T tokens × all experts (the expert axis padded to a power of two). Top-k is k rounds of
arg-max and knock-out, which for k ≤ 8 is cheaper than a sort and keeps everything in registers.
Semantics: ``moesim.kernels.reference.topk_softmax_ref`` / ``grouped_topk_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moesim.kernels._util import alloc, cdiv, interpret_without_gpu, next_pow2

interpret_without_gpu()  # Triton reads TRITON_INTERPRET when the @triton.jit decorators below run

# Elements of one [BLOCK_T, BLOCK_E] tile: small enough to stay in registers with 4 warps on a GPU.
_TILE_ELEMS = 2048


@triton.jit
def _topk_softmax_kernel(
    logits_ptr, w_ptr, ids_ptr, T, E, stride_t,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, RENORM: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    rmask = rows < T
    cmask = cols < E
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    x = tl.where(cmask[None, :], x, float("-inf"))
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    cur = tl.where(cmask[None, :], p, -1.0)
    w_tile = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    id_tile = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    for j in tl.static_range(K):
        best = tl.max(cur, axis=1)
        idx = tl.argmax(cur, axis=1)
        w_tile = tl.where(kcols[None, :] == j, best[:, None], w_tile)
        id_tile = tl.where(kcols[None, :] == j, idx[:, None].to(tl.int64), id_tile)
        cur = tl.where(cols[None, :] == idx[:, None], -2.0, cur)
    if RENORM:
        w_tile = w_tile / tl.sum(w_tile, axis=1)[:, None]
    out = rows[:, None].to(tl.int64) * K + kcols[None, :]
    omask = rmask[:, None] & (kcols[None, :] < K)
    tl.store(w_ptr + out, w_tile, mask=omask)
    tl.store(ids_ptr + out, id_tile, mask=omask)


@triton.jit
def _grouped_topk_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr, T, E, stride_t, scaling,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, GROUP_SIZE: tl.constexpr, KEEP_GROUPS: tl.constexpr,
    HAS_BIAS: tl.constexpr, TOP2: tl.constexpr, RENORM: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    gcols = tl.arange(0, BLOCK_G)
    kcols = tl.arange(0, BLOCK_K)
    rmask = rows < T
    cmask = cols < E
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    s = tl.sigmoid(x)
    if HAS_BIAS:
        b = s + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    else:
        b = s
    b = tl.where(cmask[None, :], b, float("-inf"))
    group_of = cols // GROUP_SIZE
    # group score: sum of the two best biased scores (DeepSeek-V3 with bias), else the best one
    gscore = tl.full((BLOCK_T, BLOCK_G), float("-inf"), dtype=tl.float32)
    for g in tl.static_range(GROUPS):
        bg = tl.where((group_of == g)[None, :], b, float("-inf"))
        top1 = tl.max(bg, axis=1)
        if TOP2:
            a1 = tl.argmax(bg, axis=1)
            top1 += tl.max(tl.where(cols[None, :] == a1[:, None], float("-inf"), bg), axis=1)
        gscore = tl.where(gcols[None, :] == g, top1[:, None], gscore)
    keep = cols[None, :] < 0  # all False, [1, BLOCK_E] broadcast below
    for _ in tl.static_range(KEEP_GROUPS):
        gi = tl.argmax(gscore, axis=1)
        keep = keep | (group_of[None, :] == gi[:, None])
        gscore = tl.where(gcols[None, :] == gi[:, None], float("-inf"), gscore)
    cur = tl.where(keep, b, float("-inf"))
    w_tile = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    id_tile = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    for j in tl.static_range(K):
        idx = tl.argmax(cur, axis=1)
        hit = cols[None, :] == idx[:, None]
        wj = tl.sum(tl.where(hit, s, 0.0), axis=1)
        w_tile = tl.where(kcols[None, :] == j, wj[:, None], w_tile)
        id_tile = tl.where(kcols[None, :] == j, idx[:, None].to(tl.int64), id_tile)
        cur = tl.where(hit, float("-inf"), cur)
    if RENORM:
        w_tile = w_tile / tl.sum(w_tile, axis=1)[:, None]
    w_tile = w_tile * scaling
    out = rows[:, None].to(tl.int64) * K + kcols[None, :]
    omask = rmask[:, None] & (kcols[None, :] < K)
    tl.store(w_ptr + out, w_tile, mask=omask)
    tl.store(ids_ptr + out, id_tile, mask=omask)


def _launch_shape(t: int, e: int) -> tuple[int, int, tuple[int]]:
    block_e = next_pow2(e)
    block_t = max(1, min(next_pow2(t), _TILE_ELEMS // block_e))
    return block_e, block_t, (max(1, cdiv(t, block_t)),)


def topk_softmax_triton(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] → (weights [T, k] float32, ids [T, k] int64); see reference.topk_softmax_ref."""
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    t, e = logits.shape
    weights = alloc((t, k), torch.float32, logits.device)
    ids = alloc((t, k), torch.int64, logits.device)
    if t == 0:
        return weights, ids
    block_e, block_t, grid = _launch_shape(t, e)
    _topk_softmax_kernel[grid](
        logits, weights, ids, t, e, logits.stride(0),
        K=k, BLOCK_K=next_pow2(k), BLOCK_T=block_t, BLOCK_E=block_e, RENORM=renormalize, num_warps=4,
    )
    return weights, ids


def grouped_topk_triton(
    logits: torch.Tensor, bias: torch.Tensor | None, k: int, num_groups: int, topk_groups: int,
    scaling: float, renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E], bias [E] | None → (weights [T, k] float32, ids [T, k] int64); see reference.grouped_topk_ref."""
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    t, e = logits.shape
    weights = alloc((t, k), torch.float32, logits.device)
    ids = alloc((t, k), torch.int64, logits.device)
    if t == 0:
        return weights, ids
    block_e, block_t, grid = _launch_shape(t, e)
    group_size = e // num_groups
    _grouped_topk_kernel[grid](
        logits, bias.contiguous() if bias is not None else logits, weights, ids, t, e, logits.stride(0),
        float(scaling),
        K=k, BLOCK_K=next_pow2(k), BLOCK_T=block_t, BLOCK_E=block_e, GROUPS=num_groups,
        BLOCK_G=next_pow2(num_groups), GROUP_SIZE=group_size, KEEP_GROUPS=topk_groups,
        HAS_BIAS=bias is not None, TOP2=bias is not None and group_size >= 2, RENORM=renormalize, num_warps=4,
    )
    return weights, ids
