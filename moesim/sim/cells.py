"""The compact form of a per-token ``ep`` workload's traffic, for large clusters: ``send_tokens`` summed into
cells of (GPU, node-local rank, same node or not) — :class:`SendCells` — counted one layer at a time by
:class:`SendCellCounter` (compiled where numba is installed), with the dense [S, L, G, G] pairs kept computable
on first use (:class:`LazySend`) for the consumers that need them (the DES, validate, the other backends).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.jit import optional_kernel


def dedup_rows(dst: np.ndarray) -> np.ndarray:
    """dst [k, T] -> [k, T] True where a token's destination repeats an earlier choice's (k is small: pairwise)."""
    dup = np.zeros(dst.shape, dtype=bool)
    for j in range(1, dst.shape[0]):
        for i in range(j):
            dup[j] |= dst[i] == dst[j]
    return dup


class LazySend:
    """``send_tokens [S, L, G, G]`` computed on first use (``make()``), for workloads whose engines use cells."""

    def __init__(self, make: Any, num_steps: int, num_gpus: int) -> None:
        self.make, self.num_steps, self.num_gpus = make, int(num_steps), int(num_gpus)
        self.value: np.ndarray | None = None

    def get(self) -> np.ndarray:
        if self.value is None:
            self.value = self.make()
        return self.value

    def window(self, start: int, stop: int) -> LazySend:
        return LazySend(lambda: self.get()[start:stop], len(range(start, stop)[:self.num_steps]), self.num_gpus)


@dataclass
class SendCells:
    """``send_tokens`` summed into cells of (GPU, node-local rank, same node or not), ``P`` = ``gpus_per_node``.

    ``src [S, L, G, 2P]``: tokens source GPU ``g`` sends to GPU ``node(g)·P + j`` (``[j]``, ``j < P``; ``j`` =
    ``g mod P`` is its own copy) and to the GPUs of local rank ``j`` in every other node (``[P + j]``).
    ``dst [S, L, G, 2P]``: tokens destination GPU ``d`` receives from ``node(d)·P + j`` (``[j]``) and from the GPUs
    of local rank ``j`` in other nodes (``[P + j]``). On topologies whose links each carry the bytes of whole cells
    (rails: NVLink, per-GPU NICs) the analytic engine prices an exchange from these G·2P numbers per side instead
    of the G² pairs (:class:`moesim.sim.analytic._CommTables`).
    """

    src: np.ndarray
    dst: np.ndarray
    gpus_per_node: int

    def window(self, start: int, stop: int) -> SendCells:
        return SendCells(self.src[start:stop], self.dst[start:stop], self.gpus_per_node)

    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        """(src, dst) as contiguous [G*2P, S*L] columns (one exchange per column; computed once): the engine's
        sparse products read them so, for the dispatch and again for the combine."""
        cached = self.__dict__.get("_columns")
        if cached is None:
            n = self.src.shape[-2] * self.src.shape[-1]
            cached = self._columns = (np.ascontiguousarray(self.src.reshape(-1, n).T),
                                      np.ascontiguousarray(self.dst.reshape(-1, n).T))
        return cached


def cells_kernel() -> Any:
    """The compiled SendCells count (moesim.sim._cells_kernels) or None: numba missing or MOESIM_NO_JIT set."""
    global _CELLS_KERNEL
    if _CELLS_KERNEL is None:
        _CELLS_KERNEL = optional_kernel("moesim.sim._cells_kernels", "count_layer") or False
    return _CELLS_KERNEL or None


_CELLS_KERNEL: Any = None


class SendCellCounter:
    """slot_tokens and SendCells of a per-token ep workload, one layer at a time: the choices counted per
    (step, slot), and the de-duplicated ones per (step, source GPU, cell of the destination) and (step,
    destination GPU, cell of the source); compiled where numba is installed, else gathers and bincounts."""

    def __init__(self, S: int, L: int, G: int, P: int, step_of: np.ndarray, origin: np.ndarray,
                 slot_gpu: np.ndarray, dedup: bool, step_slots: np.ndarray) -> None:
        it = slot_gpu.dtype
        self.S, self.G, self.P, self.dedup = S, G, P, dedup
        self.n = S * G * 2 * P
        slots = len(slot_gpu)
        self.slots = slots
        # per (origin node, slot): the destination's cell of the source row and the destination row + cell
        node = np.arange(G // P)[:, None]
        inter = (slot_gpu // P)[None, :] != node  # [N, slots]
        self.cell_of = (inter * P + (slot_gpu % P)[None, :]).astype(it).ravel()
        self.dst_of = (slot_gpu[None, :] * 2 * P + inter * P).astype(it).ravel()
        self.o_slot = ((origin // P) * slots).astype(it)[None, :]
        self.row_src = ((step_of * G + origin) * 2 * P).astype(it)[None, :]
        self.row_dst = ((step_of * G) * 2 * P + origin % P).astype(it)[None, :]
        self.step_slots = step_slots
        self.slot_gpu = slot_gpu
        self.src = np.zeros((S, L, G, 2 * P))
        self.dst = np.zeros((S, L, G, 2 * P))
        self.kernel = cells_kernel()

    def add(self, layer: int, slot: np.ndarray) -> np.ndarray:
        """slot [k, T] physical slot of every choice -> the layer's slot_tokens [S, slots]."""
        shape = (self.S, self.G, 2 * self.P)
        if self.kernel is not None:
            per_slot, src, dst = np.zeros(self.S * self.slots), np.zeros(self.n), np.zeros(self.n)
            self.kernel(slot, self.step_slots[0], self.o_slot[0], self.row_src[0], self.row_dst[0], self.cell_of,
                        self.dst_of, self.slot_gpu, self.dedup, per_slot, src, dst)
            self.src[:, layer] = src.reshape(shape)
            self.dst[:, layer] = dst.reshape(shape)
            return per_slot.reshape(self.S, self.slots)
        per_slot = np.bincount((self.step_slots + slot).ravel(), minlength=self.S * self.slots)
        at = slot + self.o_slot
        ks = np.take(self.cell_of, at)
        ks += self.row_src
        kd = np.take(self.dst_of, at)
        kd += self.row_dst
        n = self.n
        if self.dedup:
            # a token's destination row repeats exactly when its destination GPU does (same step and origin)
            dup = dedup_rows(kd)
            np.putmask(ks, dup, n)
            np.putmask(kd, dup, n)
            n += 1
        self.src[:, layer] = np.bincount(ks.ravel(), minlength=n)[:self.n].reshape(shape)
        self.dst[:, layer] = np.bincount(kd.ravel(), minlength=n)[:self.n].reshape(shape)
        return per_slot.reshape(self.S, self.slots)
