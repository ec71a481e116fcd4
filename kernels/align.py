"""Triton token alignment: sort (token, choice) slots by local expert into BLOCK_M-padded segments.

Semantics are vLLM's ``moe_align_block_size`` (see ``moesim.kernels.reference.moe_align_ref``), done in three Triton
launches and no host synchronisation (the output length is the static bound ``max_padded_slots``), so it can sit
inside a CUDA graph:
  1. per chunk, a histogram of local expert ids → counts [P, E]   (non-resident slots go to a spare bin)
  2. one program: padded segment starts, for each (chunk, expert) the first destination of its slots, the
     block → expert table and the padding sentinel (one launch instead of a dozen small torch ops)
  3. per chunk, each slot's rank among the chunk's earlier slots of the same expert (a [CHUNK, CHUNK] compare),
     and a scatter to  base[chunk, expert] + rank
Within an expert, slots keep increasing order, so the result equals the reference exactly. (``tl.sort`` would
also do for step 3, but the interpreter runs its custom-combine reductions element by element: ~1 s a chunk.)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from moesim.kernels._util import alloc, cdiv, interpret_without_gpu, next_pow2
from moesim.kernels.reference import max_padded_slots

interpret_without_gpu()  # Triton reads TRITON_INTERPRET when the @triton.jit decorators below run

# The rank step holds a [CHUNK, CHUNK] tile: 128 keeps it in registers on a GPU; the interpreter prefers few
# large programs (numpy does the tile at once).
_CHUNK_GPU = 128
_CHUNK_INTERPRET = 512


@triton.jit
def _local_experts(ids_ptr, map_ptr, offs, num_slots, NUM_E: tl.constexpr, HAS_MAP: tl.constexpr):
    """Local expert of each slot in ``offs``; NUM_E (an out-of-range bin) for padding and non-resident experts."""
    valid = offs < num_slots
    e = tl.load(ids_ptr + offs, mask=valid, other=0).to(tl.int32)
    if HAS_MAP:
        e = tl.load(map_ptr + e, mask=valid, other=-1).to(tl.int32)
    return tl.where(valid & (e >= 0), e, NUM_E)


@triton.jit
def _count_kernel(ids_ptr, map_ptr, counts_ptr, num_slots,
                  NUM_E: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr, HAS_MAP: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    e = _local_experts(ids_ptr, map_ptr, offs, num_slots, NUM_E, HAS_MAP)
    hist = tl.histogram(e, BINS)
    bins = tl.arange(0, BINS)
    tl.store(counts_ptr + pid * NUM_E + bins, hist, mask=bins < NUM_E)


@triton.jit
def _scatter_kernel(ids_ptr, map_ptr, base_ptr, sorted_ptr, num_slots,
                    NUM_E: tl.constexpr, CHUNK: tl.constexpr, HAS_MAP: tl.constexpr):
    pid = tl.program_id(0)
    lane = tl.arange(0, CHUNK)
    e = _local_experts(ids_ptr, map_ptr, pid * CHUNK + lane, num_slots, NUM_E, HAS_MAP)
    same_before = (e[:, None] == e[None, :]) & (lane[None, :] < lane[:, None])
    rank = tl.sum(same_before.to(tl.int32), axis=1)
    keep = e < NUM_E
    dest = tl.load(base_ptr + pid * NUM_E + e, mask=keep, other=0) + rank
    tl.store(sorted_ptr + dest, pid * CHUNK + lane, mask=keep)


@triton.jit
def _finalize_kernel(counts_ptr, base_ptr, block_expert_ptr, npost_ptr, sorted_ptr, chunks, num_blocks, padded_len,
                     num_slots, NUM_E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                     ROWS: tl.constexpr, FILL: tl.constexpr):
    """One program: padded segment layout from the per-chunk counts, scatter bases, block → expert table, and the
    padding sentinel in the sorted list. Doing this glue in one launch instead of ~15 small torch ops matters at
    decode, where the whole MoE layer is a few hundred microseconds."""
    ecols = tl.arange(0, BLOCK_E)
    emask = ecols < NUM_E
    rows = tl.arange(0, ROWS)
    totals = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for r0 in range(0, chunks, ROWS):
        m = ((r0 + rows) < chunks)[:, None] & emask[None, :]
        totals += tl.sum(tl.load(counts_ptr + (r0 + rows)[:, None] * NUM_E + ecols[None, :], mask=m, other=0), 0)
    padded = (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    seg_end = tl.cumsum(padded, 0)
    npost = tl.sum(padded, 0)
    tl.store(npost_ptr, npost)
    running = seg_end - padded  # segment starts
    for r0 in range(0, chunks, ROWS):
        m = ((r0 + rows) < chunks)[:, None] & emask[None, :]
        offs = (r0 + rows)[:, None] * NUM_E + ecols[None, :]
        c = tl.load(counts_ptr + offs, mask=m, other=0)
        tl.store(base_ptr + offs, tl.cumsum(c, 0) - c + running[None, :], mask=m)
        running += tl.sum(c, 0)
    for b0 in range(0, num_blocks, ROWS):
        blk = b0 + rows
        start = blk * BLOCK_M
        expert = tl.sum((seg_end[None, :] <= start[:, None]).to(tl.int32), 1)
        tl.store(block_expert_ptr + blk, tl.where(start < npost, expert, -1), mask=blk < num_blocks)
    sentinel = tl.zeros((FILL,), dtype=tl.int32) + num_slots
    for s0 in range(0, padded_len, FILL):
        offs = s0 + tl.arange(0, FILL)
        tl.store(sorted_ptr + offs, sentinel, mask=offs < padded_len)


def _finalize_rows(block_e: int) -> int:
    """Rows of the [ROWS, BLOCK_E] count tile the finalize program walks at a time (kernels.aot: no spills on sm_90
    up to 256 experts)."""
    return max(1, 2048 // block_e)


def moe_align_triton(
    ids: torch.Tensor, num_experts: int, block_m: int, expert_map: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [T, k] → (sorted_token_ids [P] i32, block_expert_ids [P/block_m] i32, num_tokens_post_pad [1] i32).

    Three launches: count, finalize, scatter (stream order makes the scatter see the sentinel fill first)."""
    dev = ids.device
    flat = ids.reshape(-1)
    flat = flat if flat.is_contiguous() else flat.contiguous()
    num_slots = flat.numel()
    padded_len = max_padded_slots(num_slots, num_experts, block_m)
    max_chunk = _CHUNK_INTERPRET if os.environ.get("TRITON_INTERPRET") == "1" else _CHUNK_GPU
    chunk = min(max_chunk, next_pow2(max(num_slots, 16)))
    chunks = max(1, cdiv(num_slots, chunk))
    emap = expert_map if expert_map is not None else flat
    has_map = expert_map is not None
    block_e = next_pow2(num_experts + 1)

    counts = alloc((chunks, num_experts), torch.int32, dev)
    base = alloc((chunks, num_experts), torch.int32, dev)
    sorted_ids = alloc((padded_len,), torch.int32, dev)
    block_experts = alloc((padded_len // block_m,), torch.int32, dev)
    npost = alloc((1,), torch.int32, dev)
    _count_kernel[(chunks,)](flat, emap, counts, num_slots, NUM_E=num_experts, BINS=block_e, CHUNK=chunk,
                             HAS_MAP=has_map)
    _finalize_kernel[(1,)](counts, base, block_experts, npost, sorted_ids, chunks, padded_len // block_m,
                           padded_len, num_slots, NUM_E=num_experts, BLOCK_E=block_e, BLOCK_M=block_m,
                           ROWS=_finalize_rows(block_e), FILL=1024, num_warps=8)
    _scatter_kernel[(chunks,)](flat, emap, base, sorted_ids, num_slots, NUM_E=num_experts, CHUNK=chunk,
                               HAS_MAP=has_map)
    return sorted_ids, block_experts, npost
