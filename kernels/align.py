"""Triton token alignment: sort (token, choice) slots by local expert into BLOCK_M-padded segments.

Semantics are vLLM's ``moe_align_block_size`` (see ``kernels.reference.moe_align_ref``), done in two Triton passes
over chunks of slots with a little torch glue between them, and no host synchronisation (the output length is the
static bound ``max_padded_slots``), so it can sit inside a CUDA graph:
  1. per chunk, a histogram of local expert ids → counts [P, E]   (non-resident slots go to a spare bin)
  2. torch: padded segment starts, and for each (chunk, expert) the first destination of its slots
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

from kernels._util import alloc, cdiv, next_pow2
from kernels.reference import max_padded_slots

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


def moe_align_triton(
    ids: torch.Tensor, num_experts: int, block_m: int, expert_map: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [T, k] → (sorted_token_ids [P] i32, block_expert_ids [P/block_m] i32, num_tokens_post_pad [1] i32)."""
    dev = ids.device
    flat = ids.reshape(-1).contiguous()
    num_slots = flat.numel()
    padded_len = max_padded_slots(num_slots, num_experts, block_m)
    max_chunk = _CHUNK_INTERPRET if os.environ.get("TRITON_INTERPRET") == "1" else _CHUNK_GPU
    chunk = min(max_chunk, next_pow2(max(num_slots, 16)))
    chunks = max(1, cdiv(num_slots, chunk))
    emap = expert_map.contiguous() if expert_map is not None else flat
    has_map = expert_map is not None

    counts = alloc((chunks, num_experts), torch.int32, dev)
    _count_kernel[(chunks,)](flat, emap, counts, num_slots, NUM_E=num_experts, BINS=next_pow2(num_experts + 1),
                             CHUNK=chunk, HAS_MAP=has_map)
    # glue on [P, E]: segment starts padded to block_m, and where each chunk's slots of expert e begin
    totals = counts.sum(0, dtype=torch.int32)
    padded = (totals + block_m - 1) // block_m * block_m
    seg_end = torch.cumsum(padded, 0, dtype=torch.int32)
    seg_start = seg_end - padded
    before_chunk = torch.cumsum(counts, 0, dtype=torch.int32) - counts        # same expert, earlier chunks
    base = (seg_start[None, :] + before_chunk).contiguous()

    sorted_ids = torch.full((padded_len,), num_slots, dtype=torch.int32, device=dev)
    _scatter_kernel[(chunks,)](flat, emap, base, sorted_ids, num_slots, NUM_E=num_experts, CHUNK=chunk,
                               HAS_MAP=has_map)
    starts = torch.arange(0, padded_len, block_m, dtype=torch.int32, device=dev)
    block_experts = torch.searchsorted(seg_end, starts, right=True).to(torch.int32)
    block_experts = torch.where(block_experts < num_experts, block_experts, -1)
    return sorted_ids, block_experts, seg_end[-1:].clone()
