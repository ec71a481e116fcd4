"""Triton fused MoE expert FFN (module not named fused_moe: that would shadow kernels.fused_moe, the entry point).

align → grouped GEMM w13 + SiLU·mul → grouped GEMM w2 → weighted combine.

Pipeline (all on device, no host synchronisation, so it can be captured in a CUDA graph):
  1. ``moe_align``: slots (t*k + j) sorted by local expert into BLOCK_M-padded segments; each block of BLOCK_M
     sorted rows belongs to one expert. Non-resident experts are dropped here.
  2. ``_w13_kernel``: per (row block, F tile): gate and up tiles of that expert's w13 against the gathered token
     rows, fp32 accumulators, epilogue SiLU(gate)·up → intermediate [T*k, F] (rows by slot id). Fusing the
     activation saves a write and a read of the [T*k, 2F] gate/up tensor that vLLM's unfused path pays.
  3. ``_w2_kernel``: per (row block, H tile, K split): intermediate × w2ᵀ → per-slot expert outputs
     [SPLIT_K, T*k, H] (fp32 partials when split).
  4. ``_combine_kernel``: out[t] = Σ_j Σ_split w[t,j] · y[split, t*k+j]; a choice whose expert is not resident is
     skipped (its rows were never written), so every output element is written exactly once.
Programs past the used length of the sorted list exit at once, so the grid can be sized by the static bound.
Semantics: ``kernels.reference.fused_moe_ref``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels._util import alloc, cdiv, next_pow2
from kernels.align import moe_align_triton
from kernels.launch import MoEConfig, get_config


@triton.jit
def _grouped_pid(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id → (row block, column tile), GROUP_M row blocks at a time so neighbours share tiles in L2."""
    pid = tl.program_id(0)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # fp32 inputs: exact fp32 products instead of TF32
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _w13_kernel(
    x_ptr, w_ptr, inter_ptr, sorted_ptr, block_expert_ptr, npost_ptr,
    F, H, num_slots, padded_len,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wh, stride_is,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m, pid_n = _grouped_pid(tl.cdiv(padded_len, BLOCK_M), tl.cdiv(F, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(npost_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ptr + offs_m)
    row_ok = slot < num_slots
    tok = (slot // TOP_K).to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    # wrap the columns so that weight loads stay in bounds without a mask; the store is masked instead
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % F
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xh
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wh
    u_ptrs = g_ptrs + F * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(H, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            wg = tl.load(g_ptrs)
            wu = tl.load(u_ptrs)
        else:
            k_ok = offs_k < H - kk * BLOCK_K
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wg = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
            wu = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
        acc_g = _dot(x, wg, acc_g, IEEE)
        acc_u = _dot(x, wu, acc_u, IEEE)
        x_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_wh
        u_ptrs += BLOCK_K * stride_wh
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = inter_ptr + slot[:, None].to(tl.int64) * stride_is + cols[None, :]
    tl.store(out_ptrs, act.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < F))


@triton.jit
def _w2_kernel(
    a_ptr, w_ptr, y_ptr, sorted_ptr, block_expert_ptr, npost_ptr,
    H, F, num_slots, padded_len,
    stride_as, stride_af, stride_we, stride_wh, stride_wf, stride_ysplit, stride_ys,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m, pid_n = _grouped_pid(tl.cdiv(padded_len, BLOCK_M), tl.cdiv(H, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(npost_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ptr + offs_m)
    row_ok = slot < num_slots
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % H
    offs_k = tl.arange(0, BLOCK_K)
    k_tiles = tl.cdiv(F, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_lo = pid_k * per_split
    k_hi = tl.minimum(k_lo + per_split, k_tiles)
    a_ptrs = a_ptr + slot[:, None].to(tl.int64) * stride_as + (k_lo * BLOCK_K + offs_k[None, :]) * stride_af
    w_ptrs = (w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wh
              + (k_lo * BLOCK_K + offs_k[:, None]) * stride_wf)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(k_lo, k_hi):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < F - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = _dot(a, w, acc, IEEE)
        a_ptrs += BLOCK_K * stride_af
        w_ptrs += BLOCK_K * stride_wf
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = y_ptr + pid_k * stride_ysplit + slot[:, None].to(tl.int64) * stride_ys + cols[None, :]
    tl.store(out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < H))


@triton.jit
def _combine_kernel(
    y_ptr, tw_ptr, ids_ptr, map_ptr, out_ptr, T, H,
    stride_ysplit, stride_ys, stride_twt, stride_twk, stride_it, stride_ik, stride_ot,
    TOP_K: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_MAP: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < T
    cmask = cols < H
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + rows64 * stride_it + j * stride_ik, mask=rmask, other=-1)
        if HAS_MAP:
            e = tl.load(map_ptr + e, mask=rmask & (e >= 0), other=-1)
        ok = rmask & (e >= 0)
        w = tl.load(tw_ptr + rows64 * stride_twt + j * stride_twk, mask=ok, other=0.0).to(tl.float32)
        y_rows = y_ptr + (rows64 * TOP_K + j)[:, None] * stride_ys + cols[None, :]
        for s in tl.static_range(SPLIT_K):
            y = tl.load(y_rows + s * stride_ysplit, mask=ok[:, None] & cmask[None, :], other=0.0)
            acc += w[:, None] * y.to(tl.float32)
    out_ptrs = out_ptr + rows64[:, None] * stride_ot + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def fused_moe_triton(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None,
    config: MoEConfig | dict | None = None,
) -> torch.Tensor:
    """hidden [T, H], w13 [E, 2F, H], w2 [E, H, F], topk_* [T, k] → [T, H]; see reference.fused_moe_ref."""
    t, h = hidden.shape
    e, two_f, _ = w13.shape
    f = two_f // 2
    k = topk_ids.shape[1]
    dev = hidden.device
    out = alloc((t, h), hidden.dtype, dev)
    if t == 0:
        return out
    cfg = MoEConfig.from_dict(config) if config is not None else get_config(t, e, h, f, k, hidden.dtype, dev)
    c1, c2 = cfg.w13, cfg.w2
    num_slots = t * k
    ieee = hidden.dtype == torch.float32
    w13 = w13 if w13.stride(2) == 1 else w13.contiguous()
    w2 = w2 if w2.stride(2) == 1 else w2.contiguous()
    sorted_ids, block_experts, npost = moe_align_triton(topk_ids, e, cfg.BLOCK_M, expert_map)
    padded_len = sorted_ids.numel()
    blocks_m = padded_len // cfg.BLOCK_M

    inter = alloc((num_slots, f), hidden.dtype, dev)
    _w13_kernel[(blocks_m * cdiv(f, c1.BLOCK_N),)](
        hidden, w13, inter, sorted_ids, block_experts, npost,
        f, h, num_slots, padded_len,
        hidden.stride(0), hidden.stride(1), w13.stride(0), w13.stride(1), w13.stride(2), inter.stride(0),
        TOP_K=k, BLOCK_M=cfg.BLOCK_M, BLOCK_N=c1.BLOCK_N, BLOCK_K=c1.BLOCK_K, GROUP_M=c1.GROUP_M,
        EVEN_K=h % c1.BLOCK_K == 0, IEEE=ieee, num_warps=c1.num_warps, num_stages=c1.num_stages,
    )
    split = c2.SPLIT_K
    y = alloc((split, num_slots, h), torch.float32 if split > 1 else hidden.dtype, dev)
    _w2_kernel[(blocks_m * cdiv(h, c2.BLOCK_N), split)](
        inter, w2, y, sorted_ids, block_experts, npost,
        h, f, num_slots, padded_len,
        inter.stride(0), inter.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0), y.stride(1),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=c2.BLOCK_N, BLOCK_K=c2.BLOCK_K, GROUP_M=c2.GROUP_M, SPLIT_K=split,
        EVEN_K=f % c2.BLOCK_K == 0, IEEE=ieee, num_warps=c2.num_warps, num_stages=c2.num_stages,
    )
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    block_h = min(next_pow2(h), 4096 if interpret else 1024)
    block_t = max(1, min(next_pow2(t), (16384 if interpret else 4096) // block_h))
    emap = expert_map.contiguous() if expert_map is not None else topk_ids
    _combine_kernel[(cdiv(t, block_t), cdiv(h, block_h))](
        y, topk_weights, topk_ids, emap, out, t, h,
        y.stride(0), y.stride(1), topk_weights.stride(0), topk_weights.stride(1),
        topk_ids.stride(0), topk_ids.stride(1), out.stride(0),
        TOP_K=k, SPLIT_K=split, BLOCK_T=block_t, BLOCK_H=block_h, HAS_MAP=expert_map is not None, num_warps=4,
    )
    return out
