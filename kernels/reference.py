"""Torch reference implementations of every MoE kernel.

These are the ground truth the Triton kernels are tested against and the path used on CPU. They are written
for clarity first, but stay vectorised (one loop over *local experts*, never over tokens) so that they are also a
fair baseline in ``benchmarks/bench_kernels.py``.

Conventions shared with the Triton path (and with vLLM's fused_moe, whose semantics we follow):
    T tokens, k choices per token, E_global router experts, E_local experts resident in this launch.
    A *slot* is one (token, choice) pair, flat index ``s = t * k + j`` in ``[0, T*k)``.
    ``expert_map[E_global]`` maps a global expert id to its local index, or -1 when it is not resident.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "fused_moe_ref",
    "grouped_topk_ref",
    "max_padded_slots",
    "moe_align_ref",
    "topk_softmax_ref",
]


def topk_softmax_ref(logits: torch.Tensor, k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax router followed by top-k (Mixtral, Qwen-MoE).

    logits [T, E] any float dtype → weights [T, k] float32, ids [T, k] int64.
    With ``renormalize`` the k chosen probabilities are divided by their sum (Mixtral's convention), so each row
    of ``weights`` sums to 1; without it they are the plain softmax probabilities.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.contiguous(), ids.to(torch.int64).contiguous()


def grouped_topk_ref(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    num_groups: int,
    topk_groups: int,
    scaling: float = 1.0,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 node-limited sigmoid router ("noaux_tc").

    logits [T, E], bias [E] (the aux-loss-free correction bias, or None) → weights [T, k] float32, ids [T, k] int64.

    Follows DeepSeek-V3's public ``inference/model.py`` Gate and vLLM's ``grouped_topk``:
        scores = sigmoid(logits); choice scores = scores + bias.
        Experts are split into ``num_groups`` contiguous groups; a group's score is the sum of its two best
        biased scores (its best one when there is no bias, or when a group holds a single expert).
        Only the ``topk_groups`` best groups stay eligible; the top-k of the biased scores among them are chosen.
        weights = the *unbiased* scores of the chosen experts, normalised to sum 1 (``renormalize``),
        times ``scaling`` (DeepSeek's routed_scaling_factor, 2.5 for V3).
    """
    t, e = logits.shape
    if e % num_groups:
        raise ValueError(f"grouped_topk: {e} experts do not split into {num_groups} groups")
    scores = torch.sigmoid(logits.float())
    choice = scores + bias.float() if bias is not None else scores
    grouped = choice.view(t, num_groups, e // num_groups)
    if bias is not None and e // num_groups >= 2:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.amax(dim=-1)
    keep_groups = group_scores.topk(topk_groups, dim=-1).indices
    dropped = torch.ones(t, num_groups, dtype=torch.bool, device=logits.device).scatter_(1, keep_groups, False)
    masked = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view(t, e)
    ids = masked.topk(k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * scaling
    return weights.contiguous(), ids.to(torch.int64).contiguous()


def max_padded_slots(num_slots: int, num_local_experts: int, block_m: int) -> int:
    """Upper bound on the padded length of the sorted slot list, known without reading the routing.

    Every non-empty expert segment is padded up to a multiple of ``block_m`` (adds at most block_m - 1), and at
    most min(E_local, num_slots) experts are non-empty. Rounded up to a whole block; at least one block.
    """
    bound = num_slots + min(num_local_experts, num_slots) * (block_m - 1)
    return max(block_m, -(-bound // block_m) * block_m)


def _local_ids(ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    """[T, k] global ids → [T, k] local ids (int64), -1 where the expert is not resident."""
    ids = ids.to(torch.int64)
    if expert_map is None:
        return ids
    return expert_map.to(device=ids.device, dtype=torch.int64)[ids]


def moe_align_ref(
    ids: torch.Tensor, num_experts: int, block_m: int, expert_map: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort slots by local expert into block_m-padded segments (vLLM's ``moe_align_block_size`` semantics).

    ids [T, k] global expert ids; num_experts = E_local (the number of segments); expert_map [E_global] or None.
    Returns
        sorted_token_ids [P] int32: slot ids (t*k + j) grouped by local expert, in increasing slot order within an
            expert; each expert's segment starts at a multiple of block_m; padding entries hold T*k.
            P = max_padded_slots(T*k, E_local, block_m) (fixed, so the GPU path needs no host sync).
        block_expert_ids [P // block_m] int32: local expert of each block; -1 for blocks past the end.
        num_tokens_post_pad [1] int32: used length of sorted_token_ids (a multiple of block_m).
    Slots of non-resident experts (expert_map == -1) appear nowhere.
    """
    local = _local_ids(ids, expert_map).reshape(-1)
    num_slots = local.numel()
    dev = local.device
    padded_len = max_padded_slots(num_slots, num_experts, block_m)
    counts = torch.bincount(local[local >= 0], minlength=num_experts)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    seg_start = torch.cumsum(padded, 0) - padded
    total = int(padded.sum())

    keep = torch.nonzero(local >= 0).flatten()
    order = keep[torch.argsort(local[keep], stable=True)]
    experts_sorted = local[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=dev) - first_of_expert[experts_sorted]
    sorted_ids = torch.full((padded_len,), num_slots, dtype=torch.int32, device=dev)
    sorted_ids[seg_start[experts_sorted] + rank] = order.to(torch.int32)

    block_experts = torch.full((padded_len // block_m,), -1, dtype=torch.int32, device=dev)
    blocks_per_expert = padded // block_m
    block_experts[: total // block_m] = torch.repeat_interleave(
        torch.arange(num_experts, device=dev, dtype=torch.int32), blocks_per_expert
    )
    return sorted_ids, block_experts, torch.tensor([total], dtype=torch.int32, device=dev)


def fused_moe_ref(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert FFN of a MoE layer: out[t] = Σ_j w[t,j] · W2_e (SiLU(G_e x_t) ⊙ U_e x_t), e = local(ids[t,j]).

    hidden [T, H]; w13 [E_local, 2F, H] (gate rows 0..F-1, then up rows F..2F-1); w2 [E_local, H, F];
    topk_weights [T, k]; topk_ids [T, k] global ids; expert_map [E_global] (-1 = not resident) or None.
    Returns [T, H] in hidden's dtype. Choices of non-resident experts contribute zero.

    Numerics mirror the Triton path: each GEMM accumulates in fp32 (cuBLAS and Triton both do), the
    intermediate activation and the per-choice expert outputs are rounded to the input dtype, and the weighted
    sum over choices is done in fp32.
    """
    t, h = hidden.shape
    k = topk_ids.shape[1]
    f = w13.shape[1] // 2
    local = _local_ids(topk_ids, expert_map).reshape(-1)
    weights = topk_weights.reshape(-1).float()
    out = torch.zeros(t, h, dtype=torch.float32, device=hidden.device)
    order = torch.argsort(local, stable=True)
    counts = torch.bincount(local[local >= 0], minlength=w13.shape[0]).tolist()
    start = int((local < 0).sum())
    for e, n in enumerate(counts[: w13.shape[0]]):
        if n == 0:
            continue
        slots = order[start : start + n]
        start += n
        tokens = slots // k
        x = hidden[tokens]
        gate_up = x @ w13[e].t()
        act = (F.silu(gate_up[:, :f].float()) * gate_up[:, f:].float()).to(hidden.dtype)
        y = act @ w2[e].t()
        out.index_add_(0, tokens, y.float() * weights[slots, None])
    return out.to(hidden.dtype)
