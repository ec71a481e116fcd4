"""The expert-parallel MoE layer: replica choice, dispatch, fused expert compute, combine.

Rank ``r`` owns physical slots ``r*S .. r*S+S-1`` of the mapping (moesim's contract). Its experts live in an
:class:`ExpertStore` of S *rows*; a slot map sends each global slot to the local row holding its expert (-1
when the slot lives elsewhere). The indirection is what lets a live remap leave an expert that stays on this
rank in the very same storage even when its slot number changes (``moesim.runtime.remap``), and lets two slots of
one rank share one row.

Replica choice is ``moesim.replica``'s policy — the object the simulator uses — with key =
``policy.key(position in the step (ranks' tokens concatenated in rank order, as the trace stores them), index in
this rank's batch)``, origin = this rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from moesim.runtime.dispatch import Backend
from moesim.runtime.model import StepContext
from moesim.runtime.weights import WeightSource

from moesim import kernels
from moesim.mapping import ExpertMapping
from moesim.models import ModelSpec
from moesim.replica import ReplicaPolicy, choose_slots


@dataclass
class ExpertStore:
    """One layer's experts on one rank. w13 [S, 2F, H], w2 [S, H, F]; row_expert[row] = logical expert or -1."""

    w13: torch.Tensor
    w2: torch.Tensor
    row_expert: list[int] = field(default_factory=list)

    def row_of(self) -> dict[int, int]:
        return {e: r for r, e in enumerate(self.row_expert) if e >= 0}


def local_rows(mapping: ExpertMapping, layer: int, rank: int) -> list[int]:
    """Distinct logical experts of ``rank`` in ``layer``, in slot order: what its rows hold after a fresh load."""
    seen: list[int] = []
    for e in mapping.gpu_experts(layer, rank).tolist():
        if e not in seen:
            seen.append(e)
    return seen


def load_store(source: WeightSource, spec: ModelSpec, mapping: ExpertMapping, layer: int, rank: int,
               device: torch.device | str, dtype: torch.dtype) -> ExpertStore:
    """Read only the experts ``rank`` holds in ``layer`` (free rows are zero)."""
    S, H, F = mapping.slots_per_gpu, spec.hidden_size, spec.ffn_size
    w13 = torch.zeros((S, 2 * F, H), device=device, dtype=dtype)
    w2 = torch.zeros((S, H, F), device=device, dtype=dtype)
    experts = local_rows(mapping, layer, rank)
    for row, e in enumerate(experts):
        a, b = source.expert(layer, e)
        w13[row].copy_(a)
        w2[row].copy_(b)
    return ExpertStore(w13, w2, experts + [-1] * (S - len(experts)))


class EPMoE:
    """Expert part of one MoE layer under expert parallelism: ``(x, weights, ids, layer, ctx) -> [T, H]``."""

    def __init__(self, spec: ModelSpec, layer: int, rank: int, store: ExpertStore, mapping: ExpertMapping,
                 backend: Backend, policy: ReplicaPolicy, impl: str | None = None) -> None:
        self.spec, self.layer, self.rank, self.impl = spec, layer, rank, impl
        self.store, self.backend, self.policy = store, backend, policy
        self.set_mapping(mapping)

    def set_mapping(self, mapping: ExpertMapping, store: ExpertStore | None = None) -> None:
        """Switch to ``mapping`` (the store's rows must already hold this rank's experts).

        The slot map and this rank's replica table live in fixed device buffers that are overwritten in place,
        so a captured CUDA graph keeps reading the current mapping after a live remap."""
        if store is not None:
            self.store = store
        dev = self.store.w13.device
        self.mapping = mapping
        S = mapping.slots_per_gpu
        row_of = self.store.row_of()
        slot_map = np.full(mapping.num_slots + 1, -1, dtype=np.int64)  # last entry: the pad slot
        for j, e in enumerate(mapping.gpu_experts(self.layer, self.rank).tolist()):
            slot_map[self.rank * S + j] = row_of[e]  # KeyError here would mean a corrupt store: let it raise
        table, count = self.policy.tables(mapping, self.layer)  # [G, E, R], [G, E]: keep this rank's row
        full = np.zeros((1, mapping.num_experts, mapping.num_slots), dtype=np.int64)  # R <= slots of a layer
        full[0, :, :table.shape[2]] = table[self.rank]
        new = {"slot_map": slot_map, "table": full, "count": count[self.rank:self.rank + 1]}
        for name, value in new.items():
            buf = getattr(self, name, None)
            if buf is None or tuple(buf.shape) != value.shape:
                setattr(self, name, torch.from_numpy(value).to(dev))
            else:
                buf.copy_(torch.from_numpy(value))

    @property
    def local_experts(self) -> list[int]:
        """Logical expert of each local slot (the timing records' ``experts``)."""
        return self.mapping.gpu_experts(self.layer, self.rank).tolist()

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, layer: int,
                 ctx: StepContext) -> torch.Tensor:
        """x [T, H], weights [T, k] float32, ids [T, k] logical experts → [T, H] weighted expert outputs.

        No host synchronisation and no data-dependent shape: rows that ``ctx.valid`` marks as padding take the
        pad slot (it maps to no expert), token counts per slot are a device-side scatter-add."""
        T = x.shape[0]
        S, pad = self.mapping.slots_per_gpu, self.mapping.num_slots
        with ctx.timer.region(layer, "gate"):
            local = torch.arange(T, device=x.device)  # index in this rank's batch (the vllm policy's key)
            pos = ctx.keys[:T] if ctx.keys is not None else ctx.key_offset + local  # position in the step
            key = self.policy.key(pos, local)
            origin = torch.zeros(T, dtype=torch.int64, device=x.device)  # row 0 of the table is this rank's
            slots = choose_slots(self.table, self.count, ids, origin, key)  # [T, k] physical slots
            if ctx.valid is not None:
                slots = torch.where(ctx.valid[:T, None], slots, pad)
        with ctx.timer.region(layer, "dispatch"):
            d = self.backend.prepare(x, slots, weights.float(), S, pad)
        with ctx.timer.region(layer, "expert"):
            y = kernels.fused_moe(d.x, self.store.w13, self.store.w2, d.weights, d.slots, expert_map=self.slot_map,
                                  impl=self.impl)
            local = d.slots - self.rank * S
            local = torch.where((local >= 0) & (local < S), local, S).flatten()
            counts = torch.zeros(S + 1, dtype=torch.int64, device=x.device)
            counts.scatter_add_(0, local, torch.ones_like(local))
            ctx.timer.tokens(layer, counts[:S])
        with ctx.timer.region(layer, "combine"):
            return self.backend.finalize(y, d.handle)
