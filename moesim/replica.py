"""Which replica of a redundant expert serves a token: one policy shared by the simulator and the runtime.

A policy compiles a mapping's layer into two tables, so that the choice is pure integer indexing and
works the same on numpy arrays (simulator) and torch tensors (runtime):

    table [gpus, experts, R]  candidate slots per (origin GPU, logical expert), best first, padded with -1
    count [gpus, experts]     how many leading candidates are eligible
    slot = table[origin, expert, key % count[origin, expert]]

and gives each token a ``key`` (:meth:`ReplicaPolicy.key`). Policies:

- ``vllm``: what vLLM does today (``eplb_map_to_physical_and_record`` → ``_eplb_map_and_record_i32_kernel`` in
  vllm/model_executor/layers/fused_moe/router/base_router.py): replica index ``((t * 2654435769) & 0xFFFFFFFF) %
  replica_count``, ``t`` the token's index in the batch its rank routes (Knuth's multiplicative hash), the same
  replica index for all of a token's top-k choices, looked up in the expert's replica list (vLLM's
  ``logical_to_physical_map`` row; from a phy2log alone moesim lists replicas in slot order).
- ``position`` (formerly ``round_robin``, still accepted): replica ``position % replica_count``, ``position`` the
  token's index in its whole step (ranks' tokens concatenated in rank order), every replica eligible from every
  origin. (Older vLLM releases took the flattened (token, choice) position within a rank's batch instead.)
- ``local``: only the replicas nearest the token's origin are eligible — on the origin GPU if there is one,
  else on its node, else all — chosen by ``position`` among them; keeps traffic off NVLink and InfiniBand where
  a replica allows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.errors import MoesimError
from moesim.mapping import ExpertMapping

POLICIES = ("vllm", "position", "local")
ALIASES = {"round_robin": "position"}  # the name 'position' had before it was named for what it does
KNUTH_MULTIPLIER = 2654435769  # floor(2**32 / golden ratio), vLLM's replica hash


def vllm_hash(index: Any) -> Any:
    """vLLM's replica key of a token index (numpy or torch integer array, int64): (t · 2654435769) mod 2**32."""
    return (index * KNUTH_MULTIPLIER) & 0xFFFFFFFF


@dataclass(frozen=True)
class ReplicaPolicy:
    name: str = "position"
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", ALIASES.get(self.name, self.name))
        if self.name not in POLICIES:
            raise MoesimError(f"unknown replica policy {self.name!r}; known: {', '.join(POLICIES)}")
        if self.gpus_per_node < 1:
            raise MoesimError("gpus_per_node must be positive")

    @property
    def shared(self) -> bool:
        """True when every origin GPU has the same table (the choice does not depend on where a token is)."""
        return self.name != "local"

    def key(self, position: Any, local_index: Any) -> Any:
        """Each token's key [T]: ``position`` (index in the step) or, for ``vllm``, the hash of ``local_index``
        (index in its rank's batch). numpy or torch int64 arrays."""
        return vllm_hash(local_index) if self.name == "vllm" else position

    def tables(self, mapping: ExpertMapping, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(table [G, E, R] int64, count [G, E] int64) for one layer; see the module docstring."""
        log2phy = mapping.log2phy[layer]  # [E, R], -1 padded
        cnt = mapping.logcnt[layer]  # [E]
        G, E = mapping.num_gpus, mapping.num_experts
        R = log2phy.shape[1]
        if self.shared:
            table = np.broadcast_to(log2phy, (G, E, R)).copy()
            count = np.broadcast_to(cnt, (G, E)).copy()
            return table, count
        slot_gpu = mapping.slot_gpu()
        valid = log2phy >= 0
        gpu = np.where(valid, slot_gpu[np.maximum(log2phy, 0)], -1)  # [E, R]
        origin = np.arange(G)[:, None, None]
        # distance class: 0 same GPU, 1 same node, 2 elsewhere, 3 padding
        dist = np.where(gpu[None] == origin, 0,
                        np.where(gpu[None] // self.gpus_per_node == origin // self.gpus_per_node, 1, 2))
        dist = np.where(valid[None], dist, 3)  # [G, E, R]
        order = np.argsort(dist, axis=2, kind="stable")
        table = np.take_along_axis(np.broadcast_to(log2phy, (G, E, R)), order, axis=2)
        best = dist.min(axis=2, keepdims=True)
        count = (dist == best).sum(axis=2)
        return table, count

    def all_tables(self, mapping: ExpertMapping) -> tuple[np.ndarray, np.ndarray]:
        """Tables for every layer: ([L, G, E, R], [L, G, E])."""
        pairs = [self.tables(mapping, layer) for layer in range(mapping.num_layers)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def choose_slots(table: Any, count: Any, expert_ids: Any, origin: Any, key: Any) -> Any:
    """Physical slot of each (token, choice). Works on numpy arrays and torch tensors alike.

    expert_ids [T, k]; origin [T] (origin GPU of each token); key [T] (:meth:`ReplicaPolicy.key`).
    """
    o = origin[:, None]
    c = count[o, expert_ids]
    return table[o, expert_ids, key[:, None] % c]


def local_index(step_of: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """[T] each token's index among the tokens of its (step, origin rank), in trace order: the batch position a
    rank's router sees."""
    T = len(step_of)
    if not T:
        return np.zeros(0, dtype=np.int64)
    group = step_of.astype(np.int64) * (int(origin.max()) + 1) + origin
    order = np.argsort(group, kind="stable")
    g = group[order]
    starts = np.searchsorted(g, g, side="left")
    out = np.empty(T, dtype=np.int64)
    out[order] = np.arange(T) - starts
    return out
