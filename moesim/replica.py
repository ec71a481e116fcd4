"""Which replica of a redundant expert serves a token: one policy shared by the simulator and the runtime.

A policy compiles a mapping's layer into two tables, so that the choice is pure integer indexing and
works the same on numpy arrays (simulator) and torch tensors (runtime):

    table [gpus, experts, R]  candidate slots per (origin GPU, logical expert), best first, padded with -1
    count [gpus, experts]     how many leading candidates are eligible
    slot = table[origin, expert, key % count[origin, expert]]

``key`` is the token's position in its step (vLLM: a token's choice goes to replica
``position % replica_count``). Policies:

- ``round_robin``: every replica is eligible, from every origin (vLLM's EPLB behaviour).
- ``local``: only the replicas nearest the token's origin are eligible — on the origin GPU if there is one,
  else on its node, else all — which keeps traffic off NVLink and InfiniBand where a replica allows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.errors import MoesimError
from moesim.mapping import ExpertMapping

POLICIES = ("round_robin", "local")


@dataclass(frozen=True)
class ReplicaPolicy:
    name: str = "round_robin"
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise MoesimError(f"unknown replica policy {self.name!r}; known: {', '.join(POLICIES)}")
        if self.gpus_per_node < 1:
            raise MoesimError("gpus_per_node must be positive")

    def tables(self, mapping: ExpertMapping, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(table [G, E, R] int64, count [G, E] int64) for one layer; see the module docstring."""
        log2phy = mapping.log2phy[layer]  # [E, R], -1 padded
        cnt = mapping.logcnt[layer]  # [E]
        G, E = mapping.num_gpus, mapping.num_experts
        R = log2phy.shape[1]
        if self.name == "round_robin":
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

    expert_ids [T, k]; origin [T] (origin GPU of each token); key [T] (position in the step).
    """
    o = origin[:, None]
    c = count[o, expert_ids]
    return table[o, expert_ids, key[:, None] % c]
