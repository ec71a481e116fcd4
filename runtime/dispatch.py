"""Dispatch/combine backends: how token rows reach the ranks holding their experts and come back.

As in vLLM's modular fused-MoE kernel, "prepare" (dispatch) and "finalize" (combine) are separate from the
expert compute, so any backend pairs with any expert kernel. A backend hands the expert side rows of
hidden states with their top-k *physical slot* ids and router weights; the expert kernel computes the choices
whose slot is local (a slot map sends the others to -1, contributing 0) and already weights its outputs, so
finalize only has to sum partial outputs per token.

- :class:`AllToAll`: each token goes once to every rank that holds one of its chosen slots (DeepEP-style
  de-duplication). Counts are exchanged first with ``all_to_all_single`` on a count tensor, so both sides
  always agree on split sizes (mismatched splits hang gloo and NCCL without an error), then rows, slot ids
  and weights travel with ``all_to_all_single`` and uneven splits (Megatron-Core's dispatcher does the same).
- :class:`AllGather`: every rank gathers every token (padded to the largest batch), computes its local
  choices, and a reduce-scatter sums the partial outputs back to their owners. More bytes, fewer moving
  parts; the usual choice when batches are tiny.
Both work on gloo (CPU) and NCCL (GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# torch 2.13 renamed the flat collectives (the old names warn); torch 2.11 on the GPU box has only the old ones.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class Dispatched:
    """Rows for this rank's experts: x [N, H], slots [N, k] global slot ids, weights [N, k] float32."""

    x: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor
    handle: Any  # what finalize needs to bring the outputs home


def pack_meta(slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """slots [T, k] int64 and weights [T, k] float32 → [T, 2k] float64, one message instead of two (both
    round-trip exactly: slot ids are far below 2**53, float32 embeds in float64)."""
    return torch.cat([slots.double(), weights.double()], dim=1)


def unpack_meta(meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = meta.shape[1] // 2
    return meta[:, :k].to(torch.int64), meta[:, k:].float()


class Backend:
    name = "base"

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def prepare(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, slots_per_rank: int,
                pad_slot: int) -> Dispatched:
        raise NotImplementedError

    def finalize(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        raise NotImplementedError


class AllToAll(Backend):
    name = "all2all"

    def prepare(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, slots_per_rank: int,
                pad_slot: int) -> Dispatched:
        """x [T, H], slots [T, k], weights [T, k] → the rows other ranks sent here."""
        T, G = x.shape[0], self.world
        dest = torch.div(slots, slots_per_rank, rounding_mode="floor")  # [T, k] owning rank of each choice
        goes = torch.zeros(T, G, dtype=torch.bool, device=x.device)
        goes.scatter_(1, dest, True)  # [T, G]: token t has a choice on rank g
        pairs = goes.t().nonzero()  # (g, t) ordered by destination rank, then token
        send_tok = pairs[:, 1]
        send_counts = goes.sum(0).to(torch.int64)  # [G]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_split, recv_split = send_counts.tolist(), recv_counts.tolist()
        n = sum(recv_split)
        recv_x = x.new_empty((n, x.shape[1]))
        dist.all_to_all_single(recv_x, x[send_tok].contiguous(), recv_split, send_split, group=self.group)
        meta = pack_meta(slots, weights)[send_tok].contiguous()
        recv_meta = meta.new_empty((n, meta.shape[1]))
        dist.all_to_all_single(recv_meta, meta, recv_split, send_split, group=self.group)
        recv_slots, recv_w = unpack_meta(recv_meta)
        return Dispatched(recv_x, recv_slots, recv_w, (send_tok, send_split, recv_split, T))

    def finalize(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        """y [N, H] weighted partial outputs of the received rows → [T, H] summed per token."""
        send_tok, send_split, recv_split, T = handle
        back = y.new_empty((send_tok.shape[0], y.shape[1]))
        dist.all_to_all_single(back, y.contiguous(), send_split, recv_split, group=self.group)
        out = torch.zeros((T, y.shape[1]), dtype=torch.float32, device=y.device)
        out.index_add_(0, send_tok, back.float())
        return out.to(y.dtype)


class AllGather(Backend):
    name = "allgather"

    def __init__(self, group: Any = None) -> None:
        super().__init__(group)
        self._reduce_scatter_ok: bool | None = None

    def prepare(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, slots_per_rank: int,
                pad_slot: int) -> Dispatched:
        """Gather every rank's tokens, padded to the largest batch (padding uses ``pad_slot``, which maps to
        no expert, and weight 0)."""
        T, G = x.shape[0], self.world
        sizes = torch.empty(G, dtype=torch.int64, device=x.device)
        _all_gather(sizes, torch.tensor([T], dtype=torch.int64, device=x.device), group=self.group)
        tmax = int(sizes.max())

        def gather(t: torch.Tensor, fill: float) -> torch.Tensor:
            padded = t.new_full((tmax, t.shape[1]), fill)
            padded[:T] = t
            out = t.new_empty((G * tmax, t.shape[1]))
            _all_gather(out, padded, group=self.group)
            return out

        meta = gather(pack_meta(slots, weights), 0)
        gslots, gweights = unpack_meta(meta)
        # padding rows (beyond each rank's batch) point at pad_slot, which maps to no expert
        pad_rows = (torch.arange(G * tmax, device=x.device) % tmax) >= sizes.repeat_interleave(tmax)
        gslots[pad_rows] = pad_slot
        return Dispatched(gather(x, 0), gslots, gweights, (T, tmax))

    def finalize(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        """y [G*Tmax, H] partial outputs of every rank's tokens → this rank's [T, H], summed over ranks."""
        T, tmax = handle
        out = y.new_empty((tmax, y.shape[1]))
        if self._reduce_scatter_ok is not False:
            try:
                _reduce_scatter(out, y.contiguous(), group=self.group)
                self._reduce_scatter_ok = True
                return out[:T]
            except (RuntimeError, NotImplementedError):
                if self._reduce_scatter_ok:  # it worked before: a real failure
                    raise
                self._reduce_scatter_ok = False  # this gloo build lacks reduce_scatter
        total = y.contiguous().clone()
        dist.all_reduce(total, group=self.group)
        return total[self.rank * tmax:self.rank * tmax + T]


BACKENDS = {b.name: b for b in (AllToAll, AllGather)}


def make_backend(name: str, group: Any = None) -> Backend:
    return BACKENDS[name](group)
