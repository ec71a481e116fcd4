"""Turn a routing trace and an expert mapping into what every engine needs: tokens per slot, per GPU pair.

One :class:`Workload` holds, for consecutive steps ``S``, MoE layers ``L`` and GPUs ``G``:

- ``slot_tokens [S, L, slots]`` token-choices each physical slot computes (``slots`` = G × slots per GPU; GPU
  ``g`` owns the block ``g*W .. g*W+W-1``). Summed over slots: tokens × top_k of the step, in every layout.
- ``send_tokens [S, L, G, G]`` tokens (or token-choices, ``dedup=False``) sent from source GPU to destination GPU
  by the dispatch; the diagonal is the part that stays on its GPU (no bytes move). Combine sends it back.
- ``cells`` (:class:`SendCells`, per-token ``ep`` workloads whose G² pairs per step outnumber the token-choices,
  e.g. DeepSeek-V3 with 16 tokens per GPU on 256 GPUs): ``send_tokens`` summed per (GPU, node-local rank, same or
  other node), 2·G·P numbers per side instead of G²; ``send_tokens`` itself is then computed on first access
  (the analytic engine prices the flat all-to-all from the cells and never needs it).
- ``gpu_tokens [S, L, G]`` tokens whose attention/norm/gate each GPU computes (summed over GPUs: the step's
  tokens, in every layout; in the TP layouts each GPU does 1/G of every token: T/G token-equivalents).

Arrays whose values repeat along an axis are read-only broadcast views (stride 0 on that axis): ``gpu_tokens``
over layers, and ``send_tokens`` over sources in load-only ``ep`` workloads. The analytic engine prices such an
axis once; copy (``np.array``) before writing into them.

Which replica computes a token's choice: ``config.policy`` compiled by :meth:`ReplicaPolicy.tables` and applied
with :func:`choose_slots`, the same object the live runtime uses, with ``key`` = :meth:`ReplicaPolicy.key` of the
token's position in its step (ranks' tokens concatenated in rank order, as the runtime records them) and of its
index among its origin rank's tokens of the step (``vllm``).

Origin GPU of a token (where its attention runs in the ``ep`` layout): the trace's recorded origin rank when the
trace has origins and its ``num_ranks`` equals the mapping's GPU count; otherwise each step's tokens are split
into G contiguous blocks of (almost) equal size: token ``i`` of ``T`` goes to GPU ``floor(i·G / T)``.

Layouts (see :mod:`moesim.sim.config`):

- ``ep``: tokens sit on their origin GPU; ``send_tokens[o, d]`` counts tokens from origin ``o`` with at least one
  choice on GPU ``d`` (``dedup``, DeepEP sends a token once per destination GPU) or their choices there.
- ``ep-tp-attn``: every GPU holds every token, so nothing is dispatched: ``send_tokens`` is diagonal (the tokens
  or choices each GPU's own slots compute); outputs are combined by reduce-scatter + all-gather (the engines
  price those from ``step_tokens``).
- ``tp``: every expert is sharded over all GPUs; GPU ``g``'s block holds one shard slot per logical expert, each
  computing 1/G of that expert's token-choices (so slots = G × E and the sum stays tokens × top_k); pair it with
  :func:`moesim.sim.analytic.layout_cost`, which prices a 1/G shard of a token-choice as the TP shard does.

Load-only traces (counts per expert) and ``[L, E]`` load tables: :func:`workload_from_counts` spreads tokens
evenly over origins and each expert's load evenly over its replicas (whatever the policy); with ``dedup`` the
tokens a GPU receives are estimated as if a token's top_k choices fell independently (``T·(1-(1-p)^k)``,
``p`` = the GPU's share of the choices), never more than its choices.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from moesim.errors import MappingError, MoesimError
from moesim.mapping import ExpertMapping
from moesim.replica import choose_slots, local_index
from moesim.sim.cells import LazySend, SendCellCounter, SendCells, cells_kernel, dedup_rows
from moesim.sim.config import SimConfig

UNKNOWN_PHASE = 255
# ep per-token workloads use one bincount over (step, origin GPU, slot) bins per layer while the bins stay within
# this many per token-choice (or this minimum); beyond, two bincounts over (step, slot) and (step, origin, dest)
_COMBINED_BINS_PER_CHOICE = 4
_COMBINED_MIN_BINS = 1 << 16
# per-token ep workloads carry SendCells (and compute send_tokens only when asked) when the G² pairs per step
# times this outnumber the token-choices: measured break-even of build + engine (DeepSeek-V3, 4 x 4096 tokens:
# cells win at 128 GPUs with the compiled count, lose at 64; the numpy count is slower, so later)
_CELLS_PAIRS_FACTOR = 3.0
_CELLS_PAIRS_FACTOR_NUMPY = 1.5


@dataclass
class Workload:
    """Everything an engine needs, for one mapping and layout, as whole arrays (see the module docstring)."""

    step_tokens: np.ndarray  # [S]
    phase: np.ndarray  # [S] uint8 (trace codes: 0 decode, 1 prefill, 255 unknown)
    slot_tokens: np.ndarray  # [S, L, slots] float
    send_tokens: np.ndarray  # [S, L, G, G] float
    gpu_tokens: np.ndarray  # [S, L, G] float
    first_step: int = 0
    layout: str = "ep"
    kv_len: np.ndarray | None = None  # [S] KV positions per token (NaN unknown); None: the cost model's default
    # [S, L, G, N] tokens from each origin GPU with a choice on each node (the hierarchical backend's RDMA sends);
    # built only for SimConfig(comm="hierarchical") in the ep layout
    node_tokens: np.ndarray | None = None
    # send_tokens aggregated per GPU and node-local rank (see :class:`SendCells`); per-token ep workloads of many
    # GPUs carry these instead of the G² pairs, which are then computed on first access of ``send_tokens``
    cells: SendCells | None = None

    @property
    def num_steps(self) -> int:
        return len(self.step_tokens)

    @property
    def num_layers(self) -> int:
        return int(self.slot_tokens.shape[1])

    @property
    def num_gpus(self) -> int:
        send = self._send
        return send.num_gpus if isinstance(send, LazySend) else int(send.shape[-1])

    @property
    def slots_per_gpu(self) -> int:
        return int(self.slot_tokens.shape[2]) // self.num_gpus

    def gpu_choices(self) -> np.ndarray:
        """[S, L, G] token-choices each GPU's slots compute."""
        S, L, slots = self.slot_tokens.shape
        return self.slot_tokens.reshape(S, L, self.num_gpus, slots // self.num_gpus).sum(axis=3)

    def window(self, start: int, stop: int) -> Workload:
        """Steps ``start .. stop-1`` counted from this workload's first step (views, no copy)."""
        sl = slice(start, stop)
        send = self._send
        return replace(self, step_tokens=self.step_tokens[sl], phase=self.phase[sl], slot_tokens=self.slot_tokens[sl],
                       send_tokens=send.window(start, stop) if isinstance(send, LazySend) else send[sl],
                       gpu_tokens=self.gpu_tokens[sl], first_step=self.first_step + start,
                       kv_len=None if self.kv_len is None else self.kv_len[sl],
                       node_tokens=None if self.node_tokens is None else self.node_tokens[sl],
                       cells=None if self.cells is None else self.cells.window(start, stop))

    @staticmethod
    def concat(parts: list[Workload]) -> Workload:
        if not parts:
            raise MoesimError("no workload parts to concatenate")
        cat = np.concatenate
        kv = None
        if any(p.kv_len is not None for p in parts):
            kv = cat([np.full(p.num_steps, np.nan) if p.kv_len is None else p.kv_len for p in parts])
        nodes = None
        if all(p.node_tokens is not None for p in parts):
            nodes = cat([p.node_tokens for p in parts])
        cells = None
        if all(p.cells is not None for p in parts) and len({p.cells.gpus_per_node for p in parts}) == 1:
            cells = SendCells(cat([p.cells.src for p in parts]), cat([p.cells.dst for p in parts]),
                              parts[0].cells.gpus_per_node)
        send: np.ndarray | LazySend
        if all(isinstance(p._send, LazySend) for p in parts):
            send = LazySend(lambda: cat([p.send_tokens for p in parts]), sum(p.num_steps for p in parts),
                            parts[0].num_gpus)
        else:
            send = cat([p.send_tokens for p in parts])
        return Workload(cat([p.step_tokens for p in parts]), cat([p.phase for p in parts]),
                        cat([p.slot_tokens for p in parts]), send,
                        cat([p.gpu_tokens for p in parts]), parts[0].first_step, parts[0].layout, kv, nodes, cells)

    def kv_broadcast(self, ndim: int) -> np.ndarray | None:
        """kv_len shaped [S, 1, ...] (``ndim`` axes) to broadcast against per-(step, ...) token arrays."""
        return None if self.kv_len is None else np.asarray(self.kv_len, dtype=float).reshape((-1,) + (1,) * (ndim - 1))


def _get_send(self: Workload) -> np.ndarray:
    send = self._send
    if isinstance(send, LazySend):
        send = self._send = send.get()
    return send


def _set_send(self: Workload, value: np.ndarray | LazySend) -> None:
    self._send = value


# ``send_tokens`` stays a constructor field; stored in ``_send`` as an array or a LazySend computed on first access
Workload.send_tokens = property(_get_send, _set_send)  # type: ignore[assignment]


def check_mapping(mapping: ExpertMapping, model: Any) -> None:
    """One-line errors when a mapping does not fit the model (layers, experts)."""
    if mapping.num_experts != model.num_experts:
        raise MappingError(f"mapping is for {mapping.num_experts} experts but model {model.name!r} has "
                           f"{model.num_experts}")
    if mapping.num_layers != model.num_layers:
        raise MappingError(f"mapping has {mapping.num_layers} layers but model {model.name!r} has "
                           f"{model.num_layers} MoE layers")


def policy_tables(policy: Any, mapping: ExpertMapping) -> tuple[np.ndarray, np.ndarray]:
    """``policy.all_tables(mapping)``, built from one computation of the mapping's log2phy.

    (``ExpertMapping.log2phy`` is recomputed on every access and ``ReplicaPolicy.tables`` reads it per layer, so
    ``all_tables`` costs O(L²); a frozen copy holding the derived tables gives identical results in O(L).)
    """
    if getattr(policy, "shared", False):
        # the same table for every origin GPU (ReplicaPolicy.tables copies it G times): read-only broadcast views,
        # O(L·E) instead of O(L·G·E) (at 256 GPUs the copies cost more than replaying the tokens)
        l2p, cnt = mapping.log2phy, mapping.logcnt
        L, E, R = l2p.shape
        G = mapping.num_gpus
        return np.broadcast_to(l2p[:, None], (L, G, E, R)), np.broadcast_to(cnt[:, None], (L, G, E))
    cached = _FrozenTables(mapping)
    return policy.all_tables(cached)  # type: ignore[arg-type]


class _FrozenTables:
    """Duck-typed ExpertMapping with log2phy / logcnt / slot_gpu computed once."""

    def __init__(self, mapping: ExpertMapping) -> None:
        self.log2phy, self.logcnt = mapping.log2phy, mapping.logcnt
        self._slot_gpu = mapping.slot_gpu()
        self.num_gpus, self.num_experts, self.num_layers = mapping.num_gpus, mapping.num_experts, mapping.num_layers

    def slot_gpu(self) -> np.ndarray:
        return self._slot_gpu


def _chooser(tables: np.ndarray, counts: np.ndarray, layer: int, it: type, shared: bool) -> _LayerChooser:
    """The layer's chooser; shared tables are the same for every origin: only origin 0's are converted."""
    n = 1 if shared else tables.shape[1]
    return _LayerChooser(tables[layer, :n].astype(it), counts[layer, :n].astype(it), shared)


class _LayerChooser:
    """choose_slots for one layer, with fast paths that give exactly the same slots."""

    def __init__(self, table: np.ndarray, count: np.ndarray, shared: bool) -> None:
        self.table, self.count = table, count
        self.shared = shared  # tables identical for every origin
        self.single = bool(count.max() <= 1)
        _G, E, _ = table.shape
        self.E = E
        if self.single:
            self.first = np.ascontiguousarray(table[0, :, 0] if shared else table[:, :, 0].ravel())

    def __call__(self, ids_t: np.ndarray, origin: np.ndarray, key: np.ndarray) -> np.ndarray:
        """ids_t [k, T] (transposed choices) -> physical slots [k, T]."""
        if self.single:
            if self.shared:
                return np.take(self.first, ids_t)
            return np.take(self.first, origin[None, :] * self.E + ids_t)
        if self.shared:
            t, c = self.table[0], self.count[0]
            return t[ids_t, key[None, :] % np.take(c, ids_t)]
        return choose_slots(self.table, self.count, ids_t.T.astype(np.int64), origin, key).T


def workload_from_ids(ids: np.ndarray, step_tokens: np.ndarray, mapping: ExpertMapping,
                      config: SimConfig | None = None, origin: np.ndarray | None = None,
                      phase: np.ndarray | None = None, first_step: int = 0,
                      tables: tuple[np.ndarray, np.ndarray] | None = None, *, cells: bool | None = None) -> Workload:
    """Workload from per-token choices: ``ids [L, T, k]`` of consecutive steps of ``step_tokens [S]`` tokens.

    ``origin [T]``: origin GPU of each token (None: contiguous equal blocks per step, see the module docstring).
    ``tables``: ``config.policy.all_tables(mapping)`` when the caller already has them (they cost O(L²) to make).
    ``cells``: build :class:`SendCells` and leave ``send_tokens`` to first use (None: when the ep layout's G² pairs
    per step outnumber the token-choices and the flat all-to-all prices them; False: never; True: where possible).
    """
    config = config or SimConfig()
    ids = np.asarray(ids)
    step_tokens = np.asarray(step_tokens, dtype=np.int64)
    L, T, k = ids.shape
    S = len(step_tokens)
    G, E = mapping.num_gpus, mapping.num_experts
    slots = mapping.phy2log.shape[1]
    if mapping.num_layers != L:
        raise MappingError(f"mapping has {mapping.num_layers} layers but the trace has {L}")
    if int(step_tokens.sum()) != T:
        raise MoesimError(f"step_tokens add up to {int(step_tokens.sum())} but ids hold {T} tokens")
    if T and int(ids.max()) >= E:
        raise MoesimError(f"expert id {int(ids.max())} is out of range for {E} experts")
    offsets = np.concatenate([[0], np.cumsum(step_tokens)])
    step_of = np.repeat(np.arange(S, dtype=np.int64), step_tokens)
    key = np.arange(T, dtype=np.int64) - offsets[step_of]  # position in the step
    if origin is None:
        origin = key * G // np.maximum(step_tokens[step_of], 1)
    else:
        origin = np.asarray(origin, dtype=np.int64)
        if origin.shape != (T,):
            raise MoesimError(f"origin has shape {origin.shape}, expected ({T},)")
        if T and (origin.min() < 0 or origin.max() >= G):
            raise MoesimError(f"origin GPU {int(origin.max())} is outside the mapping's {G} GPUs")
    phase = np.full(S, UNKNOWN_PHASE, np.uint8) if phase is None else np.asarray(phase, dtype=np.uint8)
    layout = config.layout
    gpu_tokens = _gpu_tokens(step_tokens, origin, step_of, S, L, G, layout)
    if layout == "tp":
        counts = np.zeros((S, L, E))
        for layer in range(L):
            key_e = (step_of[:, None] * E + ids[layer]).ravel()
            counts[:, layer] = np.bincount(key_e, minlength=S * E).reshape(S, E)
        return _tp_workload(counts, step_tokens, phase, G, k, config.dedup, first_step)
    slot_gpu = mapping.slot_gpu()
    tables, counts_t = tables if tables is not None else policy_tables(config.policy, mapping)
    rr = config.policy.shared
    key = config.policy.key(key, local_index(step_of, origin) if config.policy.name == "vllm" else None)
    # 32-bit keys where they fit (half the memory traffic of int64): this loop is the replay's hot path
    it = np.int32 if max(S * slots, S * G * G + 1) < 2**31 and T < 2**31 else np.int64
    slot_gpu = slot_gpu.astype(it)
    slot_tokens = np.zeros((S, L, slots))
    send = np.zeros((S, L, G, G))
    step_slots = (step_of * slots).astype(it)[None, :]
    if layout == "ep":
        src = ((step_of * G + origin) * G).astype(it)[None, :]
    else:
        src = (step_of * G * G).astype(it)[None, :]
    sentinel = S * G * G
    origin_i = origin.astype(it)
    step_e = (step_of * E).astype(it)[None, :]
    replicas = mapping.logcnt.max(axis=1)  # [L]
    W = slots // G
    nodes = _NodeCounter(config, S, L, G, step_of, origin) if layout == "ep" and _per_node(config) else None
    P = int(config.policy.gpus_per_node)
    if cells is None:
        factor = _CELLS_PAIRS_FACTOR if cells_kernel() is not None else _CELLS_PAIRS_FACTOR_NUMPY
        cells = T * k < S * G * G * factor and G > P and not _custom_comm(config)
    if cells and layout == "ep" and nodes is None and G % P == 0:
        def dense() -> np.ndarray:
            return workload_from_ids(ids, step_tokens, mapping, config, origin, phase, first_step,
                                     (tables, counts_t), cells=False).send_tokens

        cell = SendCellCounter(S, L, G, P, step_of, origin, slot_gpu, config.dedup and k > 1, step_slots)
        for layer in range(L):
            ids_t = ids[layer].T  # [k, T]
            if replicas[layer] <= 1:
                slot = np.take(tables[layer, 0, :, 0].astype(it), ids_t)
            else:
                slot = _chooser(tables, counts_t, layer, it, rr)(ids_t, origin_i, key)
            slot_tokens[:, layer] = cell.add(layer, slot)
        return Workload(step_tokens, phase, slot_tokens, LazySend(dense, S, G), gpu_tokens, first_step, layout,
                        cells=SendCells(cell.src, cell.dst, P))
    if layout == "ep" and S * G * slots <= max(_COMBINED_BINS_PER_CHOICE * T * k, _COMBINED_MIN_BINS):
        # one bincount per layer over (step, origin GPU, slot): summed over origins it is slot_tokens, over each
        # GPU's slots the (origin, destination) choices; dedup subtracts the repeated choices (exact integers)
        base = ((step_of * G + origin) * slots).astype(np.intp)[None, :]
        sog = (step_of * G + origin) * G
        for layer in range(L):
            ids_t = ids[layer].T  # [k, T]
            if replicas[layer] <= 1:
                slot = np.take(tables[layer, 0, :, 0], ids_t)  # [k, T]: expert e's only slot, whatever the policy
            else:
                chooser = _chooser(tables, counts_t, layer, it, rr)
                slot = chooser(ids_t, origin_i, key)
            c = np.bincount((base + slot).ravel(), minlength=S * G * slots).reshape(S, G, slots)
            slot_tokens[:, layer] = c.sum(axis=1)
            pairs = _sum_last(c.reshape(S, G, G, W))  # [S, G, G]
            if config.dedup and k > 1:
                dst = np.take(slot_gpu, slot)
                dup = dedup_rows(dst)
                keys = [sog[t] + dst[j, t] for j in range(1, k) for t in (np.flatnonzero(dup[j]),) if t.size]
                if keys:
                    pairs -= np.bincount(np.concatenate(keys), minlength=S * G * G).reshape(S, G, G)
            send[:, layer] = pairs
            if nodes is not None:
                nodes.add(layer, np.take(slot_gpu, slot))
        return Workload(step_tokens, phase, slot_tokens, send, gpu_tokens, first_step, layout,
                        node_tokens=None if nodes is None else nodes.out)
    for layer in range(L):
        ids_t = ids[layer].T  # [k, T]
        if replicas[layer] <= 1:
            # one slot per expert: whatever the policy, expert e is computed by its only slot (table[:, e, 0])
            only = tables[layer, 0, :, 0]  # [E] slot of each expert
            per_e = np.bincount((step_e + ids_t).ravel(), minlength=S * E).reshape(S, E)
            slot_tokens[:, layer] = 0.0
            slot_tokens[:, layer, only] = per_e
            dst = np.take(slot_gpu[only], ids_t)
        else:
            chooser = _chooser(tables, counts_t, layer, it, rr)
            slot = chooser(ids_t, origin_i, key)  # [k, T]
            slot_tokens[:, layer] = np.bincount((step_slots + slot).ravel(), minlength=S * slots).reshape(S, slots)
            dst = np.take(slot_gpu, slot)
        flat = src + dst if layout == "ep" else src + dst * (G + 1)  # ep-tp-attn: every GPU keeps its own
        if config.dedup and k > 1:
            np.putmask(flat, dedup_rows(dst), sentinel)
        send[:, layer] = np.bincount(flat.ravel(), minlength=sentinel + 1)[:sentinel].reshape(S, G, G)
        if nodes is not None:
            nodes.add(layer, dst)
    return Workload(step_tokens, phase, slot_tokens, send, gpu_tokens, first_step, layout,
                    node_tokens=None if nodes is None else nodes.out)


def _custom_comm(config: SimConfig) -> bool:
    from moesim.sim.analytic import custom_comm

    return custom_comm(config)


def _per_node(config: SimConfig) -> bool:
    from moesim.sim.comm import get_backend

    return get_backend(config.comm).per_node


class _NodeCounter:
    """Tokens per (step, origin GPU, destination node), one layer at a time (the hierarchical backend's RDMA)."""

    def __init__(self, config: SimConfig, S: int, L: int, G: int, step_of: np.ndarray, origin: np.ndarray) -> None:
        from moesim.sim.comm import node_tokens_from_dst

        self.first = node_tokens_from_dst
        self.P = int(config.policy.gpus_per_node)
        if G % self.P:
            raise MoesimError(f"the hierarchical backend needs nodes of equal size: {G} GPUs do not split into "
                              f"nodes of {self.P}")
        self.N = G // self.P
        self.S, self.G = S, G
        self.key = ((step_of * G + origin) * self.N).astype(np.int64)[None, :]
        self.out = np.zeros((S, L, G, self.N))

    def add(self, layer: int, dst: np.ndarray) -> None:
        """dst [k, T] destination GPU of every choice."""
        first = self.first(dst, self.P)
        keys = (self.key + dst // self.P)[first]
        n = self.S * self.G * self.N
        self.out[:, layer] = np.bincount(keys, minlength=n).reshape(self.S, self.G, self.N)


def _sum_last(a: np.ndarray) -> np.ndarray:
    """a.sum(axis=-1) for a short last axis: one elementwise pass per entry (no per-row reduction overhead)."""
    n = a.shape[-1]
    if n > 16 or n == 0:
        return a.sum(axis=-1)
    out = a[..., 0].copy()
    for i in range(1, n):
        out += a[..., i]
    return out


def _gpu_tokens(step_tokens: np.ndarray, origin: np.ndarray, step_of: np.ndarray, S: int, L: int, G: int,
                layout: str) -> np.ndarray:
    if layout == "ep":
        per = np.bincount(step_of * G + origin, minlength=S * G).reshape(S, G).astype(float)
    else:
        per = np.repeat(step_tokens[:, None] / G, G, axis=1)
    return np.broadcast_to(per[:, None, :], (S, L, G))


def _tp_workload(counts: np.ndarray, step_tokens: np.ndarray, phase: np.ndarray, G: int, k: int, dedup: bool,
                 first_step: int) -> Workload:
    """Tensor-parallel MoE: GPU g holds a 1/G shard of every expert (slots = G × E)."""
    S, L, _E = counts.shape
    slot_tokens = np.tile(counts / G, (1, 1, G))  # [S, L, G*E]
    per_gpu = step_tokens / G * (1 if dedup else k)
    send = np.zeros((S, L, G, G))
    idx = np.arange(G)
    send[:, :, idx, idx] = per_gpu[:, None, None]
    gpu_tokens = np.broadcast_to((step_tokens / G)[:, None, None], (S, L, G))
    return Workload(np.asarray(step_tokens, dtype=np.int64), phase, slot_tokens, send, gpu_tokens, first_step, "tp")


def workload_from_counts(counts: np.ndarray, step_tokens: np.ndarray, mapping: ExpertMapping,
                         config: SimConfig | None = None, phase: np.ndarray | None = None,
                         first_step: int = 0, top_k: int | None = None) -> Workload:
    """Workload from load only: ``counts [S, L, E]`` token-choices per logical expert (or one ``[L, E]`` table).

    Tokens spread evenly over origins; replicas share their expert's load evenly (see the module docstring).
    ``top_k`` (for the dedup estimate) defaults to round(choices / tokens).
    """
    config = config or SimConfig()
    counts = np.asarray(counts, dtype=float)
    if counts.ndim == 2:
        counts = counts[None]
    step_tokens = np.asarray(step_tokens, dtype=np.int64).reshape(-1)
    if counts.ndim != 3:
        raise MoesimError(f"load must be [steps, layers, experts] or [layers, experts], got shape {counts.shape}")
    S, L, E = counts.shape
    if len(step_tokens) != S:
        raise MoesimError(f"{len(step_tokens)} step token counts for {S} steps of load")
    if mapping.num_experts != E or mapping.num_layers != L:
        raise MappingError(f"load is for {L} layers × {E} experts but the mapping has {mapping.num_layers} × "
                           f"{mapping.num_experts}")
    if counts.size and (not np.all(np.isfinite(counts)) or counts.min() < 0):
        raise MoesimError("load counts must be finite and >= 0")
    G = mapping.num_gpus
    if top_k is None:
        tot = float(step_tokens.sum())
        top_k = max(1, round(counts[:, 0].sum() / tot)) if tot > 0 else 1
    phase = np.full(S, UNKNOWN_PHASE, np.uint8) if phase is None else np.asarray(phase, dtype=np.uint8)
    if config.layout == "tp":
        return _tp_workload(counts, step_tokens, phase, G, top_k, config.dedup, first_step)
    p2l = mapping.phy2log  # [L, slots]
    slots = p2l.shape[1]
    cnt = np.take_along_axis(mapping.logcnt, p2l, axis=1)  # [L, slots] replicas of each slot's expert
    if slots == E and np.array_equal(p2l, np.broadcast_to(np.arange(E), p2l.shape)):
        slot_tokens = counts.reshape(S, L, E).copy()  # slot e computes expert e: a plain copy (the common case)
    else:
        flat_idx = (np.arange(L)[:, None] * E + p2l).ravel()  # one gather over [S, L·E] (faster than along axis)
        slot_tokens = np.take(counts.reshape(S, L * E), flat_idx, axis=1).reshape(S, L, slots)
    if cnt.max(initial=1) > 1:
        slot_tokens *= (1.0 / cnt)[None]
    W = slots // G
    choices = slot_tokens.copy() if W == 1 else slot_tokens.reshape(S, L, G, W).sum(axis=3)  # [S, L, G]
    if config.dedup and top_k > 1:
        T = step_tokens.astype(float)[:, None, None]
        # p = the GPU's share of the step's choices, clipped to [0, 1] (0 for empty steps)
        q = choices / np.maximum(T * top_k, 1e-300)
        if not np.all(T > 0):
            q[np.broadcast_to(~(T > 0), q.shape)] = 0.0
        np.clip(q, 0.0, 1.0, out=q)
        np.subtract(1.0, q, out=q)  # 1 - p
        np.power(q, top_k, out=q)
        np.subtract(1.0, q, out=q)
        q *= T
        received = np.minimum(q, choices, out=q)
    else:
        received = choices
    node_tokens = None
    if config.layout == "ep" and _per_node(config):
        from moesim.sim.comm import node_tokens_estimate

        P = int(config.policy.gpus_per_node)
        if G % P:
            raise MoesimError(f"the hierarchical backend needs nodes of equal size: {G} GPUs do not split into "
                              f"nodes of {P}")
        per_node = node_tokens_estimate(choices, step_tokens, top_k, P)  # [S, L, N]
        node_tokens = np.broadcast_to((per_node / G)[:, :, None, :], (S, L, G, G // P))
    if config.layout == "ep":
        send = np.broadcast_to((received / G)[:, :, None, :], (S, L, G, G))
    else:
        send = np.zeros((S, L, G, G))
        idx = np.arange(G)
        send[:, :, idx, idx] = received
    gpu_tokens = np.broadcast_to((step_tokens / G)[:, None, None], (S, L, G))
    return Workload(step_tokens, phase, slot_tokens, send, gpu_tokens, first_step, config.layout,
                    node_tokens=node_tokens)


def _check_range(trace: Any, start: int, stop: int | None) -> tuple[int, int]:
    n = trace.num_steps
    stop = n if stop is None else stop
    if not (isinstance(start, (int, np.integer)) and isinstance(stop, (int, np.integer))):
        raise MoesimError("step range bounds must be integers")
    if start < 0 or stop > n or start >= stop:
        raise MoesimError(f"step range {start}:{stop} is not inside the trace's {n} steps (0:{n})")
    return int(start), int(stop)


def build_workload(trace: Any, mapping: ExpertMapping, config: SimConfig | None = None, start: int = 0,
                   stop: int | None = None) -> Workload:
    """Workload of steps ``start .. stop-1`` of an open :class:`moesim.trace.Trace` under ``mapping``."""
    config = config or SimConfig()
    check_mapping(mapping, trace.model)
    start, stop = _check_range(trace, start, stop)
    use_origin = trace.has_origin and trace.num_ranks == mapping.num_gpus
    tables = policy_tables(config.policy, mapping) if config.layout != "tp" else None
    parts: list[Workload] = []
    for chunk in trace.chunks():
        first, n = chunk.first_step, chunk.num_steps
        lo, hi = max(start, first), min(stop, first + n)
        if lo >= hi:
            continue
        a, b = lo - first, hi - first
        st = np.asarray(chunk.step_tokens[a:b], dtype=np.int64)
        ph = np.asarray(chunk.phase[a:b])
        if chunk.counts is not None:
            part = workload_from_counts(chunk.counts[a:b], st, mapping, config, ph, lo, trace.model.top_k)
        else:
            assert chunk.ids is not None
            offsets = chunk.step_offsets
            t0, t1 = int(offsets[a]), int(offsets[b])
            origin = chunk.origin[t0:t1] if use_origin and chunk.origin is not None else None
            part = workload_from_ids(chunk.ids[:, t0:t1], st, mapping, config, origin, ph, lo, tables)
        kv = getattr(chunk, "kv_len", None)
        if kv is not None:
            part.kv_len = np.asarray(kv[a:b], dtype=float)  # (not dataclasses.replace: it would compute send_tokens)
        parts.append(part)
    return parts[0] if len(parts) == 1 else Workload.concat(parts)
