"""Topology-aware placement: experts a token uses together go on the same node, the load stays balanced.

Co-activation graph (``coactivation_from_trace``): vertices are (layer, expert); an edge weighs how many
tokens chose both experts in the same layer (``same`` [L, E, E]), or expert i in layer l and expert j in layer
l+1 (``cross`` [L-1, E, E]). With DeepEP-style dispatch a token crosses InfiniBand once per remote *node* it
needs, so experts that share tokens on one node cut inter-node bytes; cross-layer edges keep a token's
consecutive layers on the same nodes (what a node-affine serving layout or a pipelined dispatch exploits).

Algorithm, per layer in order (M nodes of G/M GPUs, S slots per GPU; E divisible by M):
1. node partition of the layer's experts, E/M per node (as DeepSeek's EPLB packs whole groups per node), from
   up to two starts: (a) grown greedily, heaviest expert first, each to the node with the most co-activation
   to its members (plus ``cross_weight`` × co-activation with the previous layer's experts on that node)
   among nodes with room under the load target (1 + ε) · mean; (b) the model's expert groups when they divide
   over the nodes (DeepSeek-V3's group-limited routing makes them the natural clusters);
2. balance repair: while the busiest node is above target, swap one of its experts with another node's so
   both end below it, losing the least affinity; then Kernighan–Lin style swaps that raise the intra-node
   weight without pushing a node above max(target, busiest); the start with more intra-node weight wins;
3. within each node: replicas by water-filling over the node's slots, then LPT packing onto its GPUs plus
   improving swaps (``simple.refine_swaps``).
Deterministic. Without co-activation data the affinity term is zero: a node-balanced greedy placement.
Nodes with unequal expert counts (E not divisible by M) or a single node fall back to ``greedy``. A layer whose
busiest GPU ends more than ε above greedy's (an expert hotter than a node's share of the load needs replicas on
several nodes) is redone with global replica counts, first replicas at home and further ones spilling to the
lightest node when the home node is full (``_spill_layer``); if that too is more than ε above greedy, the layer
takes greedy's placement. info counts spilled and fallback layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.mapping import ExpertMapping
from moesim.placement.base import gpu_loads, replica_counts
from moesim.placement.simple import greedy, layout, lpt_pack, refine_swaps, replica_items


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
             coactivation: Coactivation | None = None, cross_weight: float = 0.5, epsilon: float = 0.005,
             max_swaps: int = 32, num_groups: int = 1) -> ExpertMapping:
    """Experts partitioned onto nodes by co-activation (equal expert counts, node loads within 1 + ε of the
    mean), replicated within their node, packed onto the node's GPUs; see the module docstring."""
    L, E = load.shape
    G, S = num_gpus, num_slots // num_gpus
    M = G // gpus_per_node if G % gpus_per_node == 0 else 1
    if M <= 1 or E % M or num_slots % M or num_slots // M > (E // M) * gpus_per_node:
        # one node, experts not divisible by nodes, or a node's slots cannot hold its experts without two
        # replicas of one on a GPU (the replica cap): plain balance
        m = greedy(load, G, num_slots)
        return ExpertMapping(m.phy2log, G, E, {"algo": "affinity", "nodes": 1})
    per_node = E // M
    cap = num_slots // M  # slots per node
    rows_e = np.empty((L, M, per_node), dtype=np.int64)
    prev_part: np.ndarray | None = None  # [E] node of each previous-layer expert
    for layer in range(L):
        w = load[layer]
        aff = np.zeros((E, E)) if coactivation is None else coactivation.same[layer].astype(np.float64)
        if coactivation is not None and layer > 0 and prev_part is not None and cross_weight > 0:
            cross = coactivation.cross[layer - 1].astype(np.float64).T  # [E this, E prev]
            prev_onehot = np.eye(M)[prev_part]  # [E prev, M]
            bonus = cross_weight * (cross @ prev_onehot)  # [E, M]
        else:
            bonus = np.zeros((E, M))
        inits = [_grow_parts(w, aff, bonus, M, per_node, epsilon)]
        if num_groups > 1 and num_groups % M == 0 and E % num_groups == 0:
            inits.append(np.arange(E) // (E // M))  # the model's expert groups, as DeepSeek's EPLB packs them
        best, best_val = None, -np.inf
        for part in inits:
            part = _repair_balance(w, aff, bonus, part, M, epsilon)
            part = _swap_parts(w, aff, bonus, part, M, epsilon, max_swaps)
            val = _intra(aff, bonus, part, M)
            if val > best_val:
                best, best_val = part, val
        part = best
        for m in range(M):
            rows_e[layer, m] = np.nonzero(part == m)[0]
        prev_part = part
    # replicas within each node (water-filling on the node's experts), then GPUs within the node
    node_load = np.take_along_axis(np.repeat(load[:, None, :], M, axis=1), rows_e, axis=2).reshape(L * M, per_node)
    counts = replica_counts(node_load, cap, gpus_per_node)
    expert_local, weight = replica_items(node_load, counts)
    bins = lpt_pack(weight, gpus_per_node, S, keys=expert_local)
    bins = refine_swaps(weight, bins, gpus_per_node, item_key=expert_local)
    local = layout(expert_local, bins)  # [L*M, cap] local expert index within the node
    phy2log = np.take_along_axis(rows_e.reshape(L * M, per_node), local, axis=1).reshape(L, num_slots)
    # guard: a layer whose node partition cannot balance (an expert hotter than a node's share needs replicas on
    # several nodes) takes the balance-first placement instead
    mine = ExpertMapping(phy2log, G, E)
    plain = greedy(load, G, num_slots)
    worse = gpu_loads(load, mine).max(axis=1) > gpu_loads(load, plain).max(axis=1) * (1 + epsilon) + 1e-12
    spilled = 0
    if worse.any():
        from moesim.placement.simple import spread_nodes

        plain_busy = gpu_loads(load, plain).max(axis=1)
        spread = spread_nodes(load, plain, gpus_per_node).phy2log
        home = np.empty((L, E), dtype=np.int64)
        for m in range(M):
            np.put_along_axis(home, rows_e[:, m], m, axis=1)
        for layer in np.nonzero(worse)[0]:
            row = _spill_layer(load[layer], home[layer], G, num_slots, gpus_per_node, epsilon)
            busy = gpu_loads(load[layer:layer + 1], ExpertMapping(row[None], G, E)).max()
            if busy <= plain_busy[layer] * (1 + epsilon) + 1e-12:
                phy2log[layer] = row
                worse[layer] = False
                spilled += 1
            else:
                phy2log[layer] = spread[layer]
    return ExpertMapping(phy2log, G, E, {"algo": "affinity", "nodes": M, "cross_weight": cross_weight,
                                         "epsilon": epsilon, "fallback_layers": int(worse.sum()),
                                         "spilled_layers": spilled})


def _spill_layer(w: np.ndarray, home: np.ndarray, G: int, num_slots: int, gpus_per_node: int,
                 epsilon: float) -> np.ndarray:
    """One layer with global replica counts: each expert's first replica on its home node, further replicas
    (heaviest first) on the home node while it has a free slot and load room, else on the lightest node with
    a free slot; then LPT + swaps onto each node's GPUs. Trades a little locality for balance."""
    E = len(w)
    M = G // gpus_per_node
    cap = num_slots // M
    S = num_slots // G
    counts = replica_counts(w[None], num_slots, G)[0]
    per = w / counts
    node_items: list[list[int]] = [[] for _ in range(M)]
    fill = np.zeros(M)
    for e in range(E):
        node_items[home[e]].append(e)
        fill[home[e]] += per[e]
    extras = np.repeat(np.arange(E), counts - 1)
    extras = extras[np.argsort(-per[extras], kind="stable")]
    target = w.sum() / M * (1 + epsilon)
    used = np.array([len(x) for x in node_items])
    for e in extras:
        m = home[e]
        if used[m] >= cap or fill[m] + per[e] > target:
            m = int(np.argmin(np.where(used < cap, fill, np.inf)))
        node_items[m].append(int(e))
        fill[m] += per[e]
        used[m] += 1
    ee = np.array(node_items, dtype=np.int64)  # [M, cap]
    ww = per[ee]
    order = np.argsort(-ww, axis=1, kind="stable")
    ee, ww = np.take_along_axis(ee, order, axis=1), np.take_along_axis(ww, order, axis=1)
    bins = refine_swaps(ww, lpt_pack(ww, gpus_per_node, S, keys=ee), gpus_per_node, item_key=ee)
    return layout(ee, bins).reshape(-1)


def _grow_parts(w: np.ndarray, aff: np.ndarray, bonus: np.ndarray, M: int, per_node: int,
                epsilon: float) -> np.ndarray:
    """Experts heaviest first, each to the node with the most affinity (same layer + previous layer) among
    those with a free expert place and load room; the lightest node when none has room."""
    E = len(w)
    target = w.sum() / M * (1 + epsilon)
    part = np.full(E, -1, dtype=np.int64)
    members = np.zeros((E, M))  # one-hot of placed experts
    fill = np.zeros(M)
    used = np.zeros(M, dtype=np.int64)
    scale = max(float(aff.max(initial=0)), float(np.abs(bonus).max(initial=0)), 1e-12)
    for e in np.argsort(-w, kind="stable"):
        room = used < per_node
        fits = room & (fill + w[e] <= target)
        score = (aff[e] @ members + bonus[e]) / scale - 1e-6 * fill / max(target, 1e-12)
        if fits.any():
            m = int(np.argmax(np.where(fits, score, -np.inf)))
        else:
            m = int(np.argmin(np.where(room, fill, np.inf)))
        part[e] = m
        members[e, m] = 1
        fill[m] += w[e]
        used[m] += 1
    return part


def _intra(aff: np.ndarray, bonus: np.ndarray, part: np.ndarray, M: int) -> float:
    """Co-activation weight inside nodes plus the previous-layer bonus of the chosen nodes."""
    same = part[:, None] == part[None, :]
    return float(aff[same].sum()) + float(bonus[np.arange(len(part)), part].sum())


def _repair_balance(w: np.ndarray, aff: np.ndarray, bonus: np.ndarray, part: np.ndarray, M: int,
                    epsilon: float, max_iter: int = 100) -> np.ndarray:
    """While the busiest node is above (1 + ε) · mean: swap one of its experts with one of another node so
    that both end below its load, choosing the swap that loses the least affinity."""
    part = part.copy()
    E = len(w)
    target = w.sum() / M * (1 + epsilon)
    fill = np.bincount(part, weights=w, minlength=M)
    val = aff @ np.eye(M)[part] + bonus  # kept up to date below
    for _ in range(max_iter):
        a = int(np.argmax(fill))
        if fill[a] <= target * (1 + 1e-12):
            break
        here = val[np.arange(E), part]
        ii = np.nonzero(part == a)[0]
        d = w[ii][:, None] - w[None, :]  # load leaving a
        fa = fill[a] - d
        fb = fill[part][None, :] + d
        ok = (part[None, :] != a) & (d > 0) & (np.maximum(fa, fb) < fill[a] * (1 - 1e-12))
        if not ok.any():
            break
        gain = val[ii][:, part] + val[:, a][None, :] - here[ii][:, None] - here[None, :] - 2 * aff[ii]
        # prefer swaps that reach the target, then the least affinity lost
        score = np.where(ok, gain - 1e6 * np.maximum(np.maximum(fa, fb) - target, 0) / max(target, 1e-12), -np.inf)
        k, j = divmod(int(np.argmax(score)), E)
        _swap_replicas(ii[k], j, part, val, fill, aff, w)
    return part


def _swap_parts(w: np.ndarray, aff: np.ndarray, bonus: np.ndarray, part: np.ndarray, M: int, epsilon: float,
                max_swaps: int, candidates: int = 32) -> np.ndarray:
    """Kernighan–Lin style: swap two experts of different nodes while the intra-node weight (plus the
    previous-layer bonus) rises and neither node ends above max((1 + ε) · mean, the busiest node now).

    Each round looks at the ``candidates`` experts with the most to gain from leaving their node (against
    every other expert), which keeps a round O(candidates · E)."""
    part = part.copy()
    E = len(w)
    target = w.sum() / M * (1 + epsilon)
    idx = np.arange(E)
    tol = 1e-9 * max(float(aff.max(initial=0)), 1.0)
    val = aff @ np.eye(M)[part] + bonus  # [E, M]: weight of e to each node's experts (kept up to date)
    fill = np.bincount(part, weights=w, minlength=M)
    for _ in range(max_swaps):
        here = val[idx, part]
        cap = max(target, float(fill.max()))
        ii = np.argsort(here - val.max(axis=1), kind="stable")[:candidates]  # most to gain by moving
        gain = val[ii][:, part] + val[:, part[ii]].T - here[ii][:, None] - here[None, :] - 2 * aff[ii]
        d = w[ii][:, None] - w[None, :]
        fa = fill[part[ii]][:, None] - d
        fb = fill[part][None, :] + d
        bad = (part[ii][:, None] == part[None, :]) | (fa > cap) | (fb > cap)
        gain = np.where(bad, -np.inf, gain)
        k, j = divmod(int(np.argmax(gain)), E)
        if not gain[k, j] > tol:
            break
        _swap_replicas(ii[k], j, part, val, fill, aff, w)
    return part


# -- colocate: greedy's balance, then co-activated replicas onto the same GPU ---------------------------------
def colocate(load: np.ndarray, num_gpus: int, num_slots: int, gpus_per_node: int = 8,
             coactivation: Coactivation | None = None, epsilon: float = 0.004, max_swaps: int = 600,
             candidates: int = 48, num_groups: int = 1) -> ExpertMapping:
    """Balance first, then co-location: the ``greedy`` packing, then swaps of two replicas between GPUs that
    raise the co-activation inside GPUs while no GPU ends above (1 + ε) × greedy's busiest GPU of the layer.

    Why GPUs and not nodes: DeepEP-style dispatch (and the simulator, sim.workload ``dedup``) sends a token once
    per destination *GPU*; with tokens originating evenly over the nodes, its expected inter-node copies are
    (1 − 1/M) × the number of distinct GPUs holding its experts, whatever GPUs form a node. So inter-node bytes
    fall only when a token's experts share GPUs — which is how EPLB's hierarchical policy (whole expert groups
    per node, so a GPU's replicas share a group) saves bytes, at the price of balance. Here a replica pair's
    affinity is the tokens choosing both experts ÷ (r_e · r_f) (a token's choice goes to one replica of r).
    Then GPUs are dealt over nodes and rails as for greedy (``spread_nodes``). Deterministic; without
    co-activation data it is greedy.
    """
    from moesim.placement.simple import layout, spread_nodes

    L, E = load.shape
    G, S = num_gpus, num_slots // num_gpus
    base = greedy(load, G, num_slots)
    if coactivation is None or G < 2 or coactivation.same.shape != (L, E, E):
        return spread_nodes(load, base, gpus_per_node)
    phy = base.phy2log.copy()
    cnt = base.logcnt
    bins = np.repeat(np.arange(G), S)
    swaps = grown_layers = 0
    for layer in range(L):
        expert = phy[layer]
        r = cnt[layer][expert].astype(np.float64)
        w = load[layer][expert] / r
        co = coactivation.same[layer].astype(np.float64)
        A = co[expert][:, expert] / (r[:, None] * r[None, :])
        A[expert[:, None] == expert[None, :]] = 0.0
        fill = np.bincount(bins, weights=w, minlength=G)
        cap = fill.max() * (1 + epsilon)
        best_bins, n = _colocate_swaps(w, expert, A, bins, G, E, cap, max_swaps, candidates)
        best_val = _intra_bins(A, best_bins)
        if num_groups > 1 and E % num_groups == 0:
            grown = _group_bins(w, expert // (E // num_groups), G, S)
            grown = _repair_cap(w, expert, A, grown, G, E, cap)
            no_dup = np.bincount(grown * E + expert, minlength=G * E).max() <= 1  # the replica cap
            if no_dup and np.bincount(grown, weights=w, minlength=G).max() <= cap:
                grown, n2 = _colocate_swaps(w, expert, A, grown, G, E, cap, max_swaps, candidates)
                if _intra_bins(A, grown) > best_val * (1 + 1e-12):
                    best_bins, n = grown, n2
                    grown_layers += 1
        swaps += n
        phy[layer] = layout(expert[None], best_bins[None])[0]
    m = ExpertMapping(phy, G, E, {"algo": "colocate", "swaps": swaps, "epsilon": epsilon,
                                    "grown_layers": grown_layers})
    return spread_nodes(load, m, gpus_per_node)


def _colocate_swaps(w: np.ndarray, key: np.ndarray, A: np.ndarray, bins: np.ndarray, G: int, E: int, cap: float,
                    max_swaps: int, candidates: int) -> tuple[np.ndarray, int]:
    """Best-gain swaps of two items on different bins while the intra-bin affinity rises, no bin ends above
    ``cap`` and no bin gets a second replica of an expert. Each round looks at the ``candidates`` items with the
    most to gain by leaving their bin, against every other item."""
    bins = bins.copy()
    N = len(w)
    idx = np.arange(N)
    onehot = np.zeros((N, G))
    onehot[idx, bins] = 1.0
    val = A @ onehot  # [N, G]: affinity of each item to each bin's items
    fill = np.bincount(bins, weights=w, minlength=G)
    has = np.zeros((E, G), dtype=np.int64)  # replicas of expert e on bin g
    np.add.at(has, (key, bins), 1)
    tol = 1e-9 * max(float(A.max(initial=0)), 1e-12)
    k = min(candidates, N)
    done = 0
    for _ in range(max_swaps):
        here = val[idx, bins]
        ii = np.argsort(here - val.max(axis=1), kind="stable")[:k]
        a = bins[ii]
        gain = val[ii][:, bins] + val[:, a].T - here[ii][:, None] - here[None, :] - 2 * A[ii]
        d = w[ii][:, None] - w[None, :]
        bad = ((a[:, None] == bins[None, :]) | (fill[a][:, None] - d > cap) | (fill[bins][None, :] + d > cap)
               | (has[key[ii][:, None], bins[None, :]] > 0) | (has[key[None, :], a[:, None]] > 0))
        gain = np.where(bad, -np.inf, gain)
        flat = int(np.argmax(gain))
        ki, j = divmod(flat, N)
        if not gain[ki, j] > tol:
            break
        _swap_replicas(ii[ki], j, bins, val, fill, A, w, has, key)
        done += 1
    return bins, done


def _swap_replicas(i: int, j: int, bins: np.ndarray, val: np.ndarray, fill: np.ndarray, A: np.ndarray,
                   w: np.ndarray, has: np.ndarray | None = None, key: np.ndarray | None = None) -> None:
    """Exchange items i and j (experts or replicas) between their bins (nodes or GPUs), updating the running
    tables in place: ``val`` [N, bins] (affinity of each item with each bin's contents), ``fill`` [bins] (load)
    and, for replicas, ``has`` [E, bins] (copies of expert ``key[item]`` per bin)."""
    ba, bb = bins[i], bins[j]
    val[:, ba] += A[:, j] - A[:, i]
    val[:, bb] += A[:, i] - A[:, j]
    fill[ba] += w[j] - w[i]
    fill[bb] += w[i] - w[j]
    if has is not None and key is not None:
        has[key[i], ba] -= 1
        has[key[i], bb] += 1
        has[key[j], bb] -= 1
        has[key[j], ba] += 1
    bins[i], bins[j] = bb, ba


def _intra_bins(A: np.ndarray, bins: np.ndarray) -> float:
    """Affinity inside bins (each pair once)."""
    return float(A[bins[:, None] == bins[None, :]].sum()) / 2


def _grow_bins(w: np.ndarray, key: np.ndarray, A: np.ndarray, G: int, S: int, cap: float) -> np.ndarray:
    """Items heaviest first, each to the bin with the most affinity to its items among those with a free slot,
    room under ``cap`` and no replica of the same expert (ties: the lightest); else the lightest bin with a free
    slot. A start for ``_colocate_swaps`` that gathers co-activated replicas before balance is repaired."""
    N = len(w)
    bins = np.full(N, -1, dtype=np.int64)
    val = np.zeros((N, G))
    fill = np.zeros(G)
    used = np.zeros(G, dtype=np.int64)
    holds = np.zeros((int(key.max()) + 1, G), dtype=bool)
    scale = max(float(A.max(initial=0)), 1e-12)
    for i in np.argsort(-w, kind="stable"):
        room = used < S
        fits = room & (fill + w[i] <= cap) & ~holds[key[i]]
        if fits.any():
            score = val[i] / scale - 1e-6 * fill / max(cap, 1e-12)
            g = int(np.argmax(np.where(fits, score, -np.inf)))
        else:
            free = room & ~holds[key[i]]
            g = int(np.argmin(np.where(free if free.any() else room, fill, np.inf)))
        bins[i] = g
        val[:, g] += A[:, i]
        fill[g] += w[i]
        used[g] += 1
        holds[key[i], g] = True
    return bins


def _group_bins(w: np.ndarray, group: np.ndarray, G: int, S: int) -> np.ndarray:
    """Group-major start: the groups' items laid out on the slot line group after group (each group on a run
    of consecutive GPUs, sharing a GPU with its neighbour at the ends), heaviest first to the lightest GPU of
    its run with a free slot. Balance is repaired afterwards (``_repair_cap``)."""
    N = len(w)
    bins = np.empty(N, dtype=np.int64)
    fill = np.zeros(G)
    order = np.lexsort((-w, group))  # by group, heaviest first within a group
    start = 0
    for g in np.unique(group):
        items = order[group[order] == g]
        slots = np.arange(start, start + len(items))
        gpus, cap = np.unique(slots // S, return_counts=True)
        used = np.zeros(len(gpus), dtype=np.int64)
        for i in items:
            k = int(np.argmin(np.where(used < cap, fill[gpus], np.inf)))
            bins[i] = gpus[k]
            fill[gpus[k]] += w[i]
            used[k] += 1
        start += len(items)
    return bins


def _repair_cap(w: np.ndarray, key: np.ndarray, A: np.ndarray, bins: np.ndarray, G: int, E: int, cap: float,
                max_iter: int = 3000) -> np.ndarray:
    """While the busiest bin is above ``cap``: swap one of its items with an item elsewhere so that both bins
    end below its load, the swap that loses the least affinity (ties: the lower resulting maximum)."""
    bins = bins.copy()
    N = len(w)
    onehot = np.zeros((N, G))
    onehot[np.arange(N), bins] = 1.0
    val = A @ onehot
    fill = np.bincount(bins, weights=w, minlength=G)
    has = np.zeros((E, G), dtype=np.int64)
    np.add.at(has, (key, bins), 1)
    idx = np.arange(N)
    scale = max(float(A.max(initial=0)), 1e-12)
    for _ in range(max_iter):
        a = int(np.argmax(fill))
        top = fill[a]
        if top <= cap:
            break
        ii = np.nonzero(bins == a)[0]
        here = val[idx, bins]
        gain = val[ii][:, bins] + val[:, a][None, :] - here[ii][:, None] - here[None, :] - 2 * A[ii]
        d = w[ii][:, None] - w[None, :]
        worst = np.maximum(top - d, fill[bins][None, :] + d)
        ok = ((bins[None, :] != a) & (d > 0) & (worst < top * (1 - 1e-12))
              & (has[key[ii][:, None], bins[None, :]] == 0) & (has[key, a] == 0)[None, :])
        if not ok.any():
            break
        score = np.where(ok, gain / scale - 1e-2 * worst / top, -np.inf)
        k, j = divmod(int(np.argmax(score)), N)
        _swap_replicas(ii[k], j, bins, val, fill, A, w, has, key)
    return bins
