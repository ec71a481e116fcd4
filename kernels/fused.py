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
Semantics: ``moesim.kernels.reference.fused_moe_ref``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from moesim.kernels._util import alloc, cdiv, interpret_without_gpu, next_pow2
from moesim.kernels.align import moe_align_triton
from moesim.kernels.launch import GemmConfig, MoEConfig, get_config

interpret_without_gpu()  # Triton reads TRITON_INTERPRET when the @triton.jit decorators below run


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
    # plain (not unrolled) loops: unrolled, the compiler hoists all TOP_K × SPLIT_K tile loads and spills
    for j in range(TOP_K):
        e = tl.load(ids_ptr + rows64 * stride_it + j * stride_ik, mask=rmask, other=-1)
        if HAS_MAP:
            e = tl.load(map_ptr + e, mask=rmask & (e >= 0), other=-1)
        ok = rmask & (e >= 0)
        w = tl.load(tw_ptr + rows64 * stride_twt + j * stride_twk, mask=ok, other=0.0).to(tl.float32)
        y_rows = y_ptr + (rows64 * TOP_K + j)[:, None] * stride_ys + cols[None, :]
        for s in range(SPLIT_K):
            y = tl.load(y_rows + s * stride_ysplit, mask=ok[:, None] & cmask[None, :], other=0.0)
            acc += w[:, None] * y.to(tl.float32)
    out_ptrs = out_ptr + rows64[:, None] * stride_ot + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@dataclass
class Plan:
    """Buffers and launch parameters of one fused_moe call, split out so the tuner can time each stage alone."""

    hidden: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    expert_map: torch.Tensor | None
    cfg: MoEConfig
    sorted_ids: torch.Tensor
    block_experts: torch.Tensor
    npost: torch.Tensor
    inter: torch.Tensor
    y: torch.Tensor
    out: torch.Tensor

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[1]


def plan(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
         topk_ids: torch.Tensor, expert_map: torch.Tensor | None, cfg: MoEConfig) -> Plan:
    """Align the slots for cfg.BLOCK_M and allocate the intermediate buffers."""
    sorted_ids, block_experts, npost = moe_align_triton(topk_ids, w13.shape[0], cfg.BLOCK_M, expert_map)
    return plan_buffers(hidden, w13, w2, topk_weights, topk_ids, expert_map, cfg, sorted_ids, block_experts, npost)


def plan_buffers(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor, expert_map: torch.Tensor | None, cfg: MoEConfig, sorted_ids: torch.Tensor,
                 block_experts: torch.Tensor, npost: torch.Tensor) -> Plan:
    """A Plan around given alignment outputs (``moesim.kernels.aot`` passes meta tensors here to compile offline)."""
    t, h = hidden.shape
    f = w13.shape[1] // 2
    num_slots = t * topk_ids.shape[1]
    dev = hidden.device
    inter = alloc((num_slots, f), hidden.dtype, dev)
    split = cfg.w2.SPLIT_K
    y = alloc((split, num_slots, h), torch.float32 if split > 1 else hidden.dtype, dev)
    out = alloc((t, h), hidden.dtype, dev)
    return Plan(hidden, w13 if w13.stride(2) == 1 else w13.contiguous(), w2 if w2.stride(2) == 1 else w2.contiguous(),
                topk_weights, topk_ids, expert_map, cfg, sorted_ids, block_experts, npost, inter, y, out)


Launch = tuple[tuple[int, ...], tuple, dict]  # grid, runtime arguments, compile-time arguments


def w13_launch(p: Plan, c1: GemmConfig) -> Launch:
    x, w13, inter = p.hidden, p.w13, p.inter
    f, h = inter.shape[1], x.shape[1]
    padded_len = p.sorted_ids.numel()
    grid = (padded_len // p.cfg.BLOCK_M * cdiv(f, c1.BLOCK_N),)
    args = (x, w13, inter, p.sorted_ids, p.block_experts, p.npost, f, h, inter.shape[0], padded_len,
            x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2), inter.stride(0))
    meta = dict(TOP_K=p.top_k, BLOCK_M=p.cfg.BLOCK_M, BLOCK_N=c1.BLOCK_N, BLOCK_K=c1.BLOCK_K, GROUP_M=c1.GROUP_M,
                EVEN_K=h % c1.BLOCK_K == 0, IEEE=x.dtype == torch.float32, num_warps=c1.num_warps,
                num_stages=c1.num_stages)
    return grid, args, meta


def w2_launch(p: Plan, c2: GemmConfig, y: torch.Tensor) -> Launch:
    inter, w2 = p.inter, p.w2
    h, f = w2.shape[1], w2.shape[2]
    padded_len = p.sorted_ids.numel()
    grid = (padded_len // p.cfg.BLOCK_M * cdiv(h, c2.BLOCK_N), c2.SPLIT_K)
    args = (inter, w2, y, p.sorted_ids, p.block_experts, p.npost, h, f, inter.shape[0], padded_len,
            inter.stride(0), inter.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0), y.stride(1))
    meta = dict(BLOCK_M=p.cfg.BLOCK_M, BLOCK_N=c2.BLOCK_N, BLOCK_K=c2.BLOCK_K, GROUP_M=c2.GROUP_M,
                SPLIT_K=c2.SPLIT_K, EVEN_K=f % c2.BLOCK_K == 0, IEEE=inter.dtype == torch.float32,
                num_warps=c2.num_warps, num_stages=c2.num_stages)
    return grid, args, meta


def combine_launch(p: Plan, y: torch.Tensor, interpret: bool) -> Launch:
    out, tw, ids = p.out, p.topk_weights, p.topk_ids
    t, h = out.shape
    block_h = min(next_pow2(h), 4096 if interpret else 1024)
    block_t = max(1, min(next_pow2(t), (16384 if interpret else 2048) // block_h))
    emap = p.expert_map.contiguous() if p.expert_map is not None else ids
    grid = (cdiv(t, block_t), cdiv(h, block_h))
    args = (y, tw, ids, emap, out, t, h, y.stride(0), y.stride(1), tw.stride(0), tw.stride(1), ids.stride(0),
            ids.stride(1), out.stride(0))
    meta = dict(TOP_K=p.top_k, SPLIT_K=y.shape[0], BLOCK_T=block_t, BLOCK_H=block_h,
                HAS_MAP=p.expert_map is not None, num_warps=4)
    return grid, args, meta


def run_w13(p: Plan, c1: GemmConfig | None = None) -> None:
    """Gate/up GEMM + SiLU·mul into p.inter (``c1`` overrides p.cfg.w13, for the tuner)."""
    grid, args, meta = w13_launch(p, c1 or p.cfg.w13)
    _w13_kernel[grid](*args, **meta)


def run_w2(p: Plan, c2: GemmConfig | None = None, y: torch.Tensor | None = None) -> None:
    """Down-projection GEMM of p.inter into y (default p.y; its first dim must equal c2.SPLIT_K)."""
    grid, args, meta = w2_launch(p, c2 or p.cfg.w2, p.y if y is None else y)
    _w2_kernel[grid](*args, **meta)


def run_combine(p: Plan, y: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum of the per-slot expert outputs back into token order; writes and returns p.out."""
    grid, args, meta = combine_launch(p, p.y if y is None else y, os.environ.get("TRITON_INTERPRET") == "1")
    _combine_kernel[grid](*args, **meta)
    return p.out


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
    if t == 0:
        return alloc((0, h), hidden.dtype, hidden.device)
    e, two_f, _ = w13.shape
    cfg = (MoEConfig.from_dict(config) if config is not None
           else get_config(t, e, h, two_f // 2, topk_ids.shape[1], hidden.dtype, hidden.device))
    p = plan(hidden, w13, w2, topk_weights, topk_ids, expert_map, cfg)
    run_w13(p)
    run_w2(p)
    return run_combine(p)
