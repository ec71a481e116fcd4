"""DeepSeek's EPLB (github.com/deepseek-ai/EPLB, eplb.py @d52c72d), re-implemented in numpy.

Same algorithm, same output on the same inputs, ties included:
1. hierarchical policy (expert groups divide the nodes): pack expert groups onto nodes with equal group
   counts (balanced packing), replicate experts within each node (each extra slot to the expert with the
   largest load per replica), pack a node's replicas onto its GPUs with equal slot counts;
2. global policy (otherwise): the same with one group and one node.

How the reference breaks ties, and how this file reproduces it:
- it computes in float32 (``weight.float()``); so does this file (group sums exact below 2**24);
- ``Tensor.max(dim).indices`` returns the first maximum: ``np.argmax`` does the same;
- balanced packing takes items in the order of ``Tensor.sort(descending=True)`` on the CPU, which is
  libstdc++'s ``std::sort`` (introsort: median-of-three quicksort down to 16-element runs, then insertion
  sort; heapsort past the depth limit), NOT a stable sort: among equal loads (replicas of one expert, idle
  experts) the order is that algorithm's. ``_torch_sort_desc`` replays it; for rows of ≤ 16 items or without
  equal values it equals a stable sort, which is what runs then. Checked against torch 2.13 on thousands of
  random tie-heavy rows (the test data keeps only numbers);
- a pack is chosen with Python's ``min`` over packs with room: the lightest, first index on ties, its weight
  accumulated in float32.
"""

from __future__ import annotations

import numpy as np

from moesim.mapping import ExpertMapping

_THRESHOLD = 16  # libstdc++ _S_threshold: introsort leaves runs of at most 16 to insertion sort


def _torch_sort_desc(values: np.ndarray) -> np.ndarray:
    """Indices that sort ``values`` descending exactly as torch's CPU sort orders them (ties included)."""
    values = np.asarray(values, dtype=np.float32)
    n = len(values)
    if n <= _THRESHOLD or len(np.unique(values)) == n:
        return np.argsort(-values, kind="stable")
    return _introsort_desc(values)


def _introsort_desc(values: np.ndarray) -> np.ndarray:
    """libstdc++ std::sort on (value, index) pairs with comp(a, b) = a > b, written out in Python."""
    v = [float(x) for x in values]
    idx = list(range(len(v)))
    n = len(v)
    if n == 0:
        return np.array(idx, dtype=np.int64)

    def comp(i, j):  # positions in arrays
        return v[i] > v[j]

    def swap(i, j):
        v[i], v[j] = v[j], v[i]
        idx[i], idx[j] = idx[j], idx[i]

    def adjust_heap(first, hole, length, val):
        # val: (value, index) tuple; heap over positions first..first+length
        top = hole
        child = hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if v[first + child] > v[first + child - 1]:  # comp(child, child-1)
                child -= 1
            v[first + hole], idx[first + hole] = v[first + child], idx[first + child]
            hole = child
        if (length & 1) == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            v[first + hole], idx[first + hole] = v[first + child - 1], idx[first + child - 1]
            hole = child - 1
        # push_heap
        parent = (hole - 1) // 2
        while hole > top and v[first + parent] > val[0]:  # comp(parent, val)
            v[first + hole], idx[first + hole] = v[first + parent], idx[first + parent]
            hole = parent
            parent = (hole - 1) // 2
        v[first + hole], idx[first + hole] = val

    def heap_sort(first, last):
        length = last - first
        if length >= 2:
            parent = (length - 2) // 2
            while True:
                val = (v[first + parent], idx[first + parent])
                adjust_heap(first, parent, length, val)
                if parent == 0:
                    break
                parent -= 1
        while last - first > 1:
            last -= 1
            val = (v[last], idx[last])
            v[last], idx[last] = v[first], idx[first]
            adjust_heap(first, 0, last - first, val)

    def median_to_first(result, a, b, c):
        if comp(a, b):
            if comp(b, c):
                swap(result, b)
            elif comp(a, c):
                swap(result, c)
            else:
                swap(result, a)
        elif comp(a, c):
            swap(result, a)
        elif comp(b, c):
            swap(result, c)
        else:
            swap(result, b)

    def partition(first, last, pivot):
        while True:
            while comp(first, pivot):
                first += 1
            last -= 1
            while comp(pivot, last):
                last -= 1
            if not first < last:
                return first
            swap(first, last)
            first += 1

    def introsort_loop(first, last, depth):
        while last - first > _THRESHOLD:
            if depth == 0:
                heap_sort(first, last)
                return
            depth -= 1
            mid = first + (last - first) // 2
            median_to_first(first, first + 1, mid, last - 1)
            cut = partition(first + 1, last, first)
            introsort_loop(cut, last, depth)
            last = cut

    def linear_insert(pos):
        val = (v[pos], idx[pos])
        nxt = pos - 1
        while val[0] > v[nxt]:
            v[pos], idx[pos] = v[nxt], idx[nxt]
            pos = nxt
            nxt -= 1
        v[pos], idx[pos] = val

    def insertion_sort(first, last):
        for i in range(first + 1, last):
            if v[i] > v[first]:
                val = (v[i], idx[i])
                for k in range(i, first, -1):
                    v[k], idx[k] = v[k - 1], idx[k - 1]
                v[first], idx[first] = val
            else:
                linear_insert(i)

    introsort_loop(0, n, 2 * (n.bit_length() - 1))
    if n > _THRESHOLD:
        insertion_sort(0, _THRESHOLD)
        for i in range(_THRESHOLD, n):
            linear_insert(i)
    else:
        insertion_sort(0, n)
    return np.array(idx, dtype=np.int64)


# -- the algorithm ------------------------------------------------------------------------------------
def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """weight [X, n] float32 → (pack [X, n], rank_in_pack [X, n]): n/num_packs items per pack, heaviest first
    into the lightest pack with room."""
    X, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return np.tile(np.arange(n, dtype=np.int64), (X, 1)), np.zeros((X, n), dtype=np.int64)
    pack = np.full((X, n), -1, dtype=np.int64)
    rank = np.full((X, n), -1, dtype=np.int64)
    for row in range(X):
        fill = [np.float32(0)] * num_packs
        items = [0] * num_packs
        w = weight[row]
        for item in _torch_sort_desc(w):
            best = -1
            for p in range(num_packs):
                if items[p] < per_pack and (best < 0 or fill[p] < fill[best]):
                    best = p
            pack[row, item] = best
            rank[row, item] = items[best]
            fill[best] = np.float32(fill[best] + w[item])
            items[best] += 1
    return pack, rank


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weight [X, num_log] float32 → (phy2log [X, num_phy], replica rank [X, num_phy], logcnt [X, num_log]).

    Physical slot i < num_log holds expert i; each further slot replicates the expert with the largest load
    per replica (first on ties)."""
    X, num_log = weight.shape
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (X, 1))
    rank = np.zeros((X, num_phy), dtype=np.int64)
    logcnt = np.ones((X, num_log), dtype=np.int64)
    rows = np.arange(X)
    for i in range(num_log, num_phy):
        best = np.argmax(weight / logcnt.astype(np.float32), axis=1)
        phy2log[:, i] = best
        rank[:, i] = logcnt[rows, best]
        logcnt[rows, best] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_hierarchical(weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int,
                           num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weight [L, E] float32 → (phy2log [L, num_phy], replica rank [L, num_phy], logcnt [L, E])."""
    L, E = weight.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    per_gpu = num_phy // num_gpus
    # 1. groups onto nodes; "mlog" numbers the experts node by node
    group_load = weight.astype(np.float64).reshape(L, num_groups, group_size).sum(-1).astype(np.float32)
    gpack, grank = balanced_packing(group_load, num_nodes)
    log2mlog = (((gpack * groups_per_node + grank) * group_size)[:, :, None]
                + np.arange(group_size)).reshape(L, E)
    mlog2log = _inverse(log2mlog)
    # 2. replicate within each node
    mload = np.take_along_axis(weight, mlog2log, axis=1).reshape(L * num_nodes, E // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(mload, num_phy // num_nodes)
    # 3. a node's replicas onto its GPUs
    phy_load = np.take_along_axis(mload / mlogcnt.astype(np.float32), phy2mlog, axis=1)
    pack, rank = balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * per_gpu + rank)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (pphy2mlog.reshape(L, num_nodes, -1)
                 + np.arange(0, E, E // num_nodes).reshape(1, -1, 1)).reshape(L, -1)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    prank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(L, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, -1), log2mlog, axis=1)
    return phy2log, prank, logcnt


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                      policy: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference's entry point: (phy2log [L, R], log2phy [L, E, max count] (-1 padded), logcnt [L, E]).

    ``policy`` auto: hierarchical when ``num_groups % num_nodes == 0``, else global (the reference's rule);
    ``hierarchical`` / ``global`` force one.
    """
    weight = np.asarray(weight, dtype=np.float32)
    L, E = weight.shape
    hier = num_groups % num_nodes == 0 if policy == "auto" else policy == "hierarchical"
    if hier:
        phy2log, rank, logcnt = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, logcnt = rebalance_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    width = int(logcnt.max())
    log2phy = np.full((L, E * width), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * width + rank, np.broadcast_to(np.arange(num_replicas), (L, num_replicas)),
                      axis=1)
    return phy2log, log2phy.reshape(L, E, width), logcnt


def check_eplb(num_experts: int, num_slots: int, num_groups: int, num_nodes: int, num_gpus: int,
               policy: str) -> str:
    """Which policy runs; raise PlacementError where the reference would fail an assertion."""
    from moesim.placement.base import PlacementError

    if num_gpus % num_nodes:
        raise PlacementError(f"eplb: {num_gpus} GPUs do not divide into {num_nodes} nodes")
    if num_experts % num_groups:
        raise PlacementError(f"eplb: {num_experts} experts do not divide into {num_groups} groups")
    hier = num_groups % num_nodes == 0 if policy == "auto" else policy == "hierarchical"
    if policy not in ("auto", "hierarchical", "global"):
        raise PlacementError(f"eplb: unknown policy {policy!r} (auto, hierarchical, global)")
    if hier:
        if num_groups % num_nodes:
            raise PlacementError(f"eplb hierarchical: {num_groups} groups do not divide over {num_nodes} nodes")
        if num_slots % num_nodes or (num_slots // num_nodes) < num_experts // num_nodes:
            raise PlacementError(f"eplb hierarchical: {num_slots} slots do not split over {num_nodes} nodes")
        return "hierarchical"
    return "global"


def eplb(load: np.ndarray, num_gpus: int, num_slots: int, gpus_per_node: int = 8, num_groups: int = 1,
         policy: str = "auto") -> ExpertMapping:
    """DeepSeek EPLB's mapping for ``load`` [L, E] (nodes = GPUs / gpus_per_node, at least one).

    Like the reference, it may give an expert more replicas than GPUs, two of them on one GPU (replicate_experts
    water-fills without a cap): kept, so that it stays equal to DeepSeek's output; this project's own algorithms
    never do (``placement.CAPPED``)."""
    return eplb_with_log2phy(load, num_gpus, num_slots, gpus_per_node, num_groups, policy)[0]


def eplb_with_log2phy(load: np.ndarray, num_gpus: int, num_slots: int, gpus_per_node: int = 8, num_groups: int = 1,
                      policy: str = "auto") -> tuple[ExpertMapping, np.ndarray]:
    """(``eplb``'s mapping, the reference's log2phy [L, E, max count]: slots in replica-rank order)."""
    E = load.shape[1]
    num_nodes = max(1, num_gpus // gpus_per_node) if num_gpus % gpus_per_node == 0 else 1
    used = check_eplb(E, num_slots, num_groups, num_nodes, num_gpus, policy)
    phy2log, log2phy, _ = rebalance_experts(load, num_slots, num_groups, num_nodes, num_gpus, used)
    return ExpertMapping(phy2log, num_gpus, E, {"algo": "eplb", "policy": used, "num_groups": num_groups,
                                                "num_nodes": num_nodes}), log2phy
