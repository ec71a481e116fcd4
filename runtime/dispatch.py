"""Dispatch/combine backends: how token rows reach the ranks holding their experts and come back.

As in vLLM's modular fused-MoE kernel, "prepare" (dispatch) and "finalize" (combine) are separate from the
expert compute, so any backend pairs with any expert kernel. A backend hands the expert side rows of
hidden states with their top-k *physical slot* ids and router weights; the expert kernel computes the choices
whose slot is local (a slot map sends the others to -1, contributing 0) and already weights its outputs, so
finalize only has to sum partial outputs per token.

Both backends are graph-ready: fixed-capacity buffers whose size is the worst case, equal split sizes (so
``all_to_all_single`` needs no host-side counts), no ``nonzero``/``item``/``tolist``, nothing whose shape depends on
the routing. Rows that carry no work hold the pad slot (``num_slots``, which every slot map sends to -1) and
weight 0, so the receiver needs no counts either: the expert kernel skips them. Every rank steps with the same
number of rows T (same batch, same bucket).

- :class:`AllToAll`: each token goes once to every rank that holds one of its chosen slots (DeepEP-style
  de-duplication), packed per destination on the device (a cumulative sum gives each token its row); capacity
  per destination is T rows (every token may have a choice there), so the wire carries G*T rows each way.
- :class:`AllGather`: every rank gathers every token, computes its local choices, and a reduce-scatter sums
  the partial outputs back to their owners.
A world of one runs no collective at all. Both work on gloo (CPU) and NCCL (GPU).
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
        """x [T, H], slots [T, k], weights [T, k] → the [G*T] rows other ranks packed for this one."""
        T, G = x.shape[0], self.world
        if G == 1:
            return Dispatched(x, slots, weights, None)
        dest = torch.div(slots, slots_per_rank, rounding_mode="floor")  # [T, k]; the pad slot → G
        goes = torch.zeros(T, G + 1, dtype=torch.bool, device=x.device)
        goes.scatter_(1, dest, True)
        goes = goes[:, :G]  # [T, G]: token t has a choice on rank g
        row = torch.cumsum(goes.to(torch.int64), dim=0) - 1  # [T, G]: its row in g's block
        dummy = G * T  # where tokens that do not go to g land (one scratch row, never sent)
        index = torch.where(goes, torch.arange(G, device=x.device) * T + row, dummy)  # [T, G]
        flat = index.flatten()
        send_x = x.new_zeros((G * T + 1, x.shape[1]))
        send_x.index_copy_(0, flat, x[:, None, :].expand(T, G, x.shape[1]).reshape(T * G, -1))
        meta = pack_meta(slots, weights)
        send_meta = meta.new_zeros((G * T + 1, meta.shape[1]))
        send_meta[:, :slots.shape[1]] = pad_slot  # rows no token fills: pad slot, weight 0
        send_meta.index_copy_(0, flat, meta[:, None, :].expand(T, G, meta.shape[1]).reshape(T * G, -1))
        recv_x = torch.empty_like(send_x[:dummy])
        dist.all_to_all_single(recv_x, send_x[:dummy], group=self.group)
        recv_meta = torch.empty_like(send_meta[:dummy])
        dist.all_to_all_single(recv_meta, send_meta[:dummy], group=self.group)
        recv_slots, recv_w = unpack_meta(recv_meta)
        return Dispatched(recv_x, recv_slots, recv_w, index)

    def finalize(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        """y [G*T, H] weighted partial outputs of the received rows → [T, H] summed per token (float32)."""
        if handle is None:
            return y
        back = y.new_empty((y.shape[0] + 1, y.shape[1]))
        dist.all_to_all_single(back[:-1], y.contiguous(), group=self.group)
        back[-1].zero_()  # the scratch row: tokens without a choice on a rank get 0 from it
        return back[handle].float().sum(dim=1).to(y.dtype)  # [T, G, H] → [T, H]


class AllGather(Backend):
    name = "allgather"

    def __init__(self, group: Any = None) -> None:
        super().__init__(group)
        self._reduce_scatter_ok: bool | None = None

    def prepare(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, slots_per_rank: int,
                pad_slot: int) -> Dispatched:
        """Gather every rank's T rows (padding rows already carry the pad slot and contribute nothing)."""
        T, G = x.shape[0], self.world
        if G == 1:
            return Dispatched(x, slots, weights, None)

        def gather(t: torch.Tensor) -> torch.Tensor:
            out = t.new_empty((G * T, t.shape[1]))
            _all_gather(out, t.contiguous(), group=self.group)
            return out

        gslots, gweights = unpack_meta(gather(pack_meta(slots, weights)))
        return Dispatched(gather(x), gslots, gweights, T)

    def finalize(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        """y [G*T, H] partial outputs of every rank's tokens → this rank's [T, H], summed over ranks."""
        if handle is None:
            return y
        T = handle
        out = y.new_empty((T, y.shape[1]))
        if self._reduce_scatter_ok is not False:
            try:
                _reduce_scatter(out, y.contiguous(), group=self.group)
                self._reduce_scatter_ok = True
                return out
            except (RuntimeError, NotImplementedError):
                if self._reduce_scatter_ok:  # it worked before: a real failure
                    raise
                self._reduce_scatter_ok = False  # this gloo build lacks reduce_scatter
        total = y.contiguous().clone()
        dist.all_reduce(total, group=self.group)
        return total[self.rank * T:(self.rank + 1) * T]


BACKENDS = {b.name: b for b in (AllToAll, AllGather)}


def make_backend(name: str, group: Any = None) -> Backend:
    return BACKENDS[name](group)
