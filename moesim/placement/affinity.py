"""Topology-aware placement: experts a token uses together go on the same node, the load stays balanced.

Co-activation graph (``coactivation_from_trace``): vertices are (layer, expert); an edge weighs how many
tokens chose both experts in the same layer (``same`` [L, E, E]), or expert i in layer l and expert j in layer
l+1 (``cross`` [L-1, E, E]). With DeepEP-style dispatch a token crosses InfiniBand once per remote *node* it
needs, so experts that share tokens on one node cut inter-node bytes; cross-layer edges keep a token's
consecutive layers on the same nodes (what a node-affine serving layout or a pipelined dispatch exploits).

Algorithm, per layer in order (all sizes from the cluster: M nodes, G/M GPUs each, S slots per GPU):
1. replica counts: those of ``greedy`` for the layer (water-filling plus its count search), so the balance
   target is the heuristic's;
2. nodes: every expert's replicas are dealt to nodes (replicas of one expert on different nodes when it has
   several), heaviest first, each to the node maximising affinity − β · overload, where affinity is the
   co-activation weight to experts already on the node (same layer) and to the previous layer's experts on
   the node (cross), and a node takes at most G/M·S replicas; then Kernighan–Lin style pairwise swaps of
   single replicas between nodes that raise the intra-node weight without raising the busiest node's load
   above max(mean node load · (1 + ε), its current value);
3. GPUs within each node: LPT packing with S slots per GPU plus improving swaps (``simple.refine_swaps``).
Deterministic (no randomness; ``seed`` only breaks nothing). Without co-activation data the affinity term is
zero and the result is a node-balanced greedy placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.mapping import ExpertMapping
from moesim.placement.simple import greedy, layout, lpt_pack, refine_swaps


@dataclass
class Coactivation:
    """same [L, E, E] (symmetric, zero diagonal) and cross [L-1, E, E] co-activation counts."""

    same: np.ndarray
    cross: np.ndarray

    @property
    def num_layers(self) -> int:
        return int(self.same.shape[0])


def coactivation_from_ids(ids: np.ndarray, num_experts: int) -> Coactivation:
    """ids [L, T, k] (a token's experts per layer) → co-activation counts (duplicates in a row counted once)."""
    from scipy import sparse

    L, T, k = ids.shape
    mats = []
    for layer in range(L):
        a = sparse.csr_matrix((np.ones(T * k), (np.repeat(np.arange(T), k), ids[layer].ravel())),
                              shape=(T, num_experts))
        a.data[:] = 1.0  # duplicates summed by csr: clamp
        a.sum_duplicates()
        a.data[:] = 1.0
        mats.append(a)
    same = np.stack([(m.T @ m).toarray() for m in mats]) if L else np.zeros((0, num_experts, num_experts))
    for layer in range(L):
        np.fill_diagonal(same[layer], 0)
    cross = (np.stack([(mats[i].T @ mats[i + 1]).toarray() for i in range(L - 1)]) if L > 1
             else np.zeros((0, num_experts, num_experts)))
    return Coactivation(same, cross)


def coactivation_from_trace(trace: Any, start: int = 0, stop: int | None = None) -> Coactivation | None:
    """Co-activation of a token trace's steps ``start..stop-1``; None for a load-only trace."""
    if trace.kind != "tokens":
        return None
    E = trace.model.num_experts
    total: Coactivation | None = None
    for step in trace.steps(start, stop):
        if step.ids is None or step.num_tokens == 0:
            continue
        c = coactivation_from_ids(np.asarray(step.ids), E)
        if total is None:
            total = c
        else:
            total.same += c.same
            total.cross += c.cross
    return total


def affinity(load: np.ndarray, num_gpus: int, num_slots: int, gpus_per_node: int = 8,
             coactivation: Coactivation | None = None, cross_weight: float = 0.5, epsilon: float = 0.01,
             max_swaps: int = 200) -> ExpertMapping:
    """Node partition by co-activation under a node-balance constraint, then balanced GPUs within nodes."""
    L, E = load.shape
    G, S = num_gpus, num_slots // num_gpus
    if G % gpus_per_node or gpus_per_node >= G:
        m = greedy(load, G, num_slots)  # one node: nothing to partition
        return ExpertMapping(m.phy2log, G, E, {"algo": "affinity", "nodes": 1})
    M = G // gpus_per_node
    cap = gpus_per_node * S  # replicas per node
    base = greedy(load, G, num_slots)
    counts = base.logcnt
    node_items_e = np.empty((L * M, cap), dtype=np.int64)
    node_items_w = np.empty((L * M, cap))
    prev_node_of: np.ndarray | None = None  # [E, M] replicas of each previous-layer expert per node
    for layer in range(L):
        w = load[layer]
        c = counts[layer]
        aff = np.zeros((E, E)) if coactivation is None else coactivation.same[layer].astype(np.float64)
        cross = np.zeros((E, E))
        if coactivation is not None and layer > 0 and prev_node_of is not None and cross_weight > 0:
            cross = coactivation.cross[layer - 1].astype(np.float64).T  # [E this, E prev]
        # items: replicas, heaviest first
        expert = np.repeat(np.arange(E), c)
        rw = (w / c)[expert]
        order = np.argsort(-rw, kind="stable")
        expert, rw = expert[order], rw[order]
        N = len(expert)
        node = np.empty(N, dtype=np.int64)
        held = np.zeros((E, M))  # replicas of each expert per node
        fill = np.zeros(M)
        used = np.zeros(M, dtype=np.int64)
        target = w.sum() / M
        scale_aff = max(aff.sum() / max(E, 1), 1e-12)
        for t in range(N):
            e = expert[t]
            has = (held > 0).astype(np.float64)
            gain = aff[e] @ has  # [M] same-layer weight to experts already on each node
            if prev_node_of is not None:
                gain = gain + cross_weight * (cross[e] @ (prev_node_of > 0))
            gain = gain / scale_aff
            over = np.maximum(fill + rw[t] - target * (1 + epsilon), 0) / max(target, 1e-12)
            # balance first, then affinity, then spread an expert's replicas, then the lightest node (LPT)
            score = gain - 1e3 * over - 10.0 * (held[e] > 0) - 1e-3 * fill / max(target, 1e-12)
            score = np.where(used < cap, score, -np.inf)
            m = int(np.argmax(score))
            node[t] = m
            held[e, m] += 1
            fill[m] += rw[t]
            used[m] += 1
        node = _kl_swaps(expert, rw, node, aff, cross if prev_node_of is not None else None, prev_node_of,
                         cross_weight, M, target * (1 + epsilon), max_swaps)
        # items of each node, heaviest first (rw is sorted, a stable sort by node keeps that order)
        o = np.argsort(node, kind="stable")
        node_items_e[layer * M:(layer + 1) * M] = expert[o].reshape(M, cap)
        node_items_w[layer * M:(layer + 1) * M] = rw[o].reshape(M, cap)
        prev_node_of = np.zeros((E, M))
        np.add.at(prev_node_of, (expert, node), 1)
    # GPUs within each node: all (layer, node) rows at once
    bins = lpt_pack(node_items_w, gpus_per_node, S)
    bins = refine_swaps(node_items_w, bins, gpus_per_node, item_key=node_items_e)
    phy2log = layout(node_items_e, bins).reshape(L, num_slots)
    return ExpertMapping(phy2log, G, E, {"algo": "affinity", "nodes": M, "cross_weight": cross_weight})


def _kl_swaps(expert: np.ndarray, rw: np.ndarray, node: np.ndarray, aff: np.ndarray, cross: np.ndarray | None,
              prev: np.ndarray | None, cross_weight: float, M: int, limit: float, max_swaps: int) -> np.ndarray:
    """Swap replicas between nodes while the intra-node co-activation weight rises and no node exceeds the
    larger of ``limit`` and the current busiest node load."""
    node = node.copy()
    E = aff.shape[0]
    for _ in range(max_swaps):
        held = np.zeros((E, M))
        np.add.at(held, (expert, node), 1)
        has = (held > 0).astype(np.float64)
        # value of item t on node m: affinity of its expert to experts on m (excluding itself)
        val = aff[expert] @ has  # [N, M]
        if cross is not None and prev is not None:
            val = val + cross_weight * (cross[expert] @ (prev > 0))
        fill = np.bincount(node, weights=rw, minlength=M)
        cap = max(limit, float(fill.max()))
        here = val[np.arange(len(node)), node]
        # swap i (node a) with j (node b): gain ≈ val[i,b] + val[j,a] - here_i - here_j (first order)
        gain = val[:, node] + val[:, node].T - here[:, None] - here[None, :]
        gain = gain - 2 * aff[expert][:, expert]  # they leave each other's node
        d = rw[:, None] - rw[None, :]  # load moving from a to b
        fa = fill[node][:, None] - d
        fb = fill[node][None, :] + d
        bad = (node[:, None] == node[None, :]) | (expert[:, None] == expert[None, :]) | (fa > cap) | (fb > cap)
        gain = np.where(bad, -np.inf, gain)
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if not gain[i, j] > 1e-9:
            break
        node[i], node[j] = node[j], node[i]
    return node
