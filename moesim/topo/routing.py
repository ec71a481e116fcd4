"""Route tables for rail-optimised clusters, built with arrays (65k GPU pairs in well under a second).

A route from GPU s (node a, rail i) to GPU d (node b, rail j) is, for a ≠ b::

    leg inside node a from s to the NIC of rail r   (r = j with PXN, r = i without)
    NIC(a, r) -> leaf(pod(a), r)
    [leaf(pod(a), r) -> spine -> leaf(pod(b), j)]     only when the two leaves differ
    leaf(pod(b), j) -> NIC(b, j), leg inside node b from that NIC to d

and, for a = b, the leg inside the node from s to d. Legs inside a node are least-latency paths over the node's
own switches (NVSwitch, PCIe switches, host) computed with ``scipy.sparse.csgraph.dijkstra``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import dijkstra


def _pad(legs: list[list[int]], shape: tuple[int, ...]) -> np.ndarray:
    width = max([len(x) for x in legs] + [1])
    out = np.full((len(legs), width), -1, dtype=np.int64)
    for k, leg in enumerate(legs):
        out[k, :len(leg)] = leg
    return out.reshape(shape + (width,))


class _NodeLegs:
    """Least-latency paths inside one node, from its GPUs and NICs to every member."""

    def __init__(self, topo: Any, members: list[str], sources: list[str]) -> None:
        self.topo = topo
        self.idx = {v: k for k, v in enumerate(members)}
        self.members = members
        rows, cols, w = [], [], []
        self.eid: dict[tuple[int, int], int] = {}
        for v in members:
            for u in topo.graph.successors(v):
                if u in self.idx:
                    e = topo._edge_index[(v, u)]
                    rows.append(self.idx[v])
                    cols.append(self.idx[u])
                    w.append(float(topo.edge_latency[e]) + 1e-12)  # the tiny per-hop weight prefers fewer hops
                    self.eid[(self.idx[v], self.idx[u])] = e
        m = len(members)
        graph = sp.csr_matrix((w, (rows, cols)), shape=(m, m))
        # a NIC is an end point, never a transit hop (two GPUs sharing a NIC's PCIe switch talk over NVLink)
        is_nic = np.array([topo.graph.nodes[v].get("kind") == "nic" for v in members])
        transit = np.array([not is_nic[r] for r in rows], dtype=bool)
        no_nic = sp.csr_matrix((np.asarray(w)[transit], (np.asarray(rows)[transit], np.asarray(cols)[transit])),
                               shape=(m, m)) if rows else graph
        self.src_row = {v: k for k, v in enumerate(sources)}
        self.pred = np.empty((len(sources), m), dtype=np.int32)
        for k, v in enumerate(sources):
            g = graph if is_nic[self.idx[v]] else no_nic
            _, pred = dijkstra(g, directed=True, indices=[self.idx[v]], return_predecessors=True)
            self.pred[k] = pred[0]

    def leg(self, a: str, b: str) -> list[int] | None:
        """Edge indices from member a (a source) to member b, or None when b is unreachable inside the node."""
        row, i, j = self.src_row[a], self.idx[a], self.idx[b]
        out = []
        while j != i:
            p = int(self.pred[row, j])
            if p < 0:
                return None
            out.append(self.eid[(p, j)])
            j = p
        out.reverse()
        return out


def rail_route_table(topo: Any) -> np.ndarray:
    """[G*G, H] edge indices of every pair's route under ``topo.routing`` (rail-pxn / rail-spine), padded with -1
    anywhere (drop the -1 entries of a row, in order, to get the route)."""
    G, R, NR = topo.num_gpus, topo.gpus_per_node, topo.num_rails  # GPUs per node, NICs (rails) per node
    g = topo.graph
    node = topo._gpu_node
    rail = np.array([int(g.nodes[v]["rail"]) for v in topo.gpu_names], dtype=np.int64)
    pod_of = np.array([topo._node_pod.get(n, 0) for n in range(topo.num_nodes)], dtype=np.int64)
    members: dict[int, list[str]] = {}
    for v, a in g.nodes(data=True):
        if a.get("kind") not in ("leaf", "spine") and a.get("node") is not None:
            members.setdefault(int(a["node"]), []).append(v)
    leaves = sorted(set(topo._leaf.values()))
    leaf_id = {v: k for k, v in enumerate(leaves)}

    def edge(u: str, v: str) -> int:
        e = topo._edge_index.get((u, v))
        if e is None:
            raise topo._fail(f"routing {topo.routing}: no link {u}->{v}")
        return e

    def leg(legs: _NodeLegs, n: int, a: str, b: str) -> list[int]:
        out = legs.leg(a, b)
        if out is None:
            raise topo._fail(f"routing {topo.routing}: no path inside node {n} from {a} to {b}")
        return out

    up: list[list[int]] = []  # [G, NR]: GPU -> its node's NIC on rail r -> that rail's leaf
    down: list[list[int]] = []  # [G]: its rail's leaf -> its NIC -> the GPU
    intra: list[list[int]] = []  # [G, gpn]: GPU -> k-th GPU of its node
    for n in range(topo.num_nodes):
        gpus = [topo.gpu_names[i] for i in range(n * R, (n + 1) * R)]
        nics = [topo._nic[(n, r)] for r in range(NR)]
        legs = _NodeLegs(topo, members[n], gpus + nics)
        pod = int(pod_of[n])
        for s in gpus:
            for r in range(NR):
                up.append(leg(legs, n, s, nics[r]) + [edge(nics[r], topo._leaf[(pod, r)])])
            intra.extend(leg(legs, n, s, d) for d in gpus)
        for k, d in enumerate(gpus):
            r = int(rail[n * R + k])
            down.append([edge(topo._leaf[(pod, r)], topo._nic[(n, r)])] + leg(legs, n, topo._nic[(n, r)], d))
    UP, DOWN, INTRA = _pad(up, (G, NR)), _pad(down, (G,)), _pad(intra, (G, R))
    spines = topo._spines
    S = max(len(spines), 1)
    LS = np.full((len(leaves), S), -1, dtype=np.int64)  # leaf -> spine edge, spine -> leaf edge
    SL = np.full((S, len(leaves)), -1, dtype=np.int64)
    for k, sp_name in enumerate(spines):
        for lf, li in leaf_id.items():
            LS[li, k] = topo._edge_index.get((lf, sp_name), -1)
            SL[k, li] = topo._edge_index.get((sp_name, lf), -1)
    src = np.arange(G)[:, None]
    dst = np.arange(G)[None, :]
    r_out = np.broadcast_to(rail[None, :] if topo.routing == "rail-pxn" else rail[:, None], (G, G))
    leaf_of = np.array([[leaf_id[topo._leaf[(p, r)]] for r in range(NR)] for p in range(int(pod_of.max()) + 1)])
    leaf_up = leaf_of[pod_of[node][:, None], r_out]
    leaf_dn = np.broadcast_to(leaf_of[pod_of[node], rail][None, :], (G, G))
    cross = leaf_up != leaf_dn
    spine = (src + dst) % S
    fab = np.stack([LS[leaf_up, spine], SL[spine, leaf_dn]], axis=-1)
    same_node = node[:, None] == node[None, :]
    need = cross & ~same_node
    if need.any() and (not spines or (fab[need] < 0).any()):
        s, d = (int(x[0]) for x in np.nonzero(need & ((fab < 0).any(-1) if spines else need)))
        raise topo._fail(f"routing {topo.routing}: traffic gpu{s}->gpu{d} must cross from leaf "
                         f"{leaves[leaf_up[s, d]]} to {leaves[leaf_dn[s, d]]} but no spine links them")
    fab[~cross] = -1
    inter = np.concatenate([UP[src, r_out], fab, np.broadcast_to(DOWN[None, :, :], (G, G, DOWN.shape[-1]))],
                           axis=-1)
    local = (np.arange(G) % R)[None, :]
    within = INTRA[src, np.broadcast_to(local, (G, G))]
    width = inter.shape[-1]
    within = np.pad(within, ((0, 0), (0, 0), (0, max(width - within.shape[-1], 0))), constant_values=-1)
    inter = np.pad(inter, ((0, 0), (0, 0), (0, max(within.shape[-1] - width, 0))), constant_values=-1)
    table = np.where(same_node[..., None], within, inter)
    table[np.arange(G), np.arange(G)] = -1
    return table.reshape(G * G, -1)
