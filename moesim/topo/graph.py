"""Cluster topologies: a ``networkx.DiGraph`` of GPUs, switches and NICs, with the routes the simulator needs.

Nodes ``gpu<i>`` (attrs ``kind="gpu"``, ``index=i``, ``node=n``) and anything else (``nvswitch<n>``,
``pcie<n>_<k>``, ``host<n>``, ``nic<i>``, ``leaf<k>``, ``spine<s>``, ``switch0``); every directed edge carries
``bandwidth`` (bytes/s), ``latency`` (s) and a ``kind`` (``nvlink``, ``pcie``, ``ib``, ``link``).
A full-duplex link is two edges. Every pair of GPUs has one fixed route (a list of edge indices); the
analytic engine multiplies traffic matrices by :meth:`Topology.routing_matrix`, so routes, the matrix and
path latencies are computed once per topology and cached.

Routing (graph attribute ``routing``): ``shortest`` (least total latency, then fewest hops; custom graphs),
``rail-pxn`` or ``rail-spine`` (rail-optimised clusters; see :mod:`moesim.topo.presets` for the rules).
Preset names: ``dgx-h100``, ``dgx-h200``, ``hgx-h800``, ``pcie-8gpu``, and ``NAME:N`` for N such nodes.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import scipy.sparse as sp

from moesim.errors import MoesimError
from moesim.topo.devices import DEVICES, DeviceSpec, get_device
from moesim.topo.presets import NODE_PRESETS, build_flat, build_preset

__all__ = ["DEVICES", "PRESETS", "DeviceSpec", "Topology", "get_device", "load_topology"]

PRESETS: tuple[str, ...] = tuple(NODE_PRESETS)
ROUTINGS = ("shortest", "rail-pxn", "rail-spine")
TOPOLOGY_FORMAT = "moesim.topology"
TOPOLOGY_VERSION = 1
_GPU_ID = re.compile(r"gpu(\d+)\Z")
MAX_NODES = 256
MAX_GPUS = 2048  # the largest preset cluster (256 nodes x 8); files are held to the same bound
MIN_BANDWIDTH, MAX_BANDWIDTH = 1e6, 1e15  # bytes/s: anything outside is a unit mistake, and 1e-300 overflows times
MAX_LATENCY = 1.0  # seconds per hop


def _num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


class Topology:
    """A validated cluster graph with cached, vectorised routing (see the module docstring)."""

    def __init__(self, graph: nx.DiGraph, name: str, device: DeviceSpec, gpus_per_node: int | None = None,
                 routing: str | None = None, source: str | None = None) -> None:
        self.graph = graph
        self.name = name
        self.device = device
        self.source = source or name
        self.routing = routing or graph.graph.get("routing") or "shortest"
        graph.graph["routing"] = self.routing
        self._validate(gpus_per_node)
        self._edges: list[tuple[str, str]] = list(graph.edges())
        self._edge_index = {e: k for k, e in enumerate(self._edges)}
        self.edge_bw = np.array([graph.edges[e]["bandwidth"] for e in self._edges], dtype=float)
        self.edge_latency = np.array([graph.edges[e]["latency"] for e in self._edges], dtype=float)
        self.edge_kind = np.array([str(graph.edges[e].get("kind", "link")) for e in self._edges])
        self._indptr: np.ndarray | None = None
        self._indices: np.ndarray | None = None
        self._rmat: sp.csr_matrix | None = None
        self._plat: np.ndarray | None = None
        self._table: np.ndarray | None = None
        self._dense: np.ndarray | None = None

    # -- validation -----------------------------------------------------------------------------------
    def _fail(self, msg: str) -> MoesimError:
        return MoesimError(f"topology {self.source}: {msg}")

    def _validate(self, gpus_per_node: int | None) -> None:
        g = self.graph
        if self.routing not in ROUTINGS:
            raise self._fail(f"unknown routing {self.routing!r}; known: {', '.join(ROUTINGS)}")
        gpus: dict[int, str] = {}
        for v, attrs in g.nodes(data=True):
            if not isinstance(v, str):
                raise self._fail(f"node id {v!r} is not a string")
            if "kind" not in attrs and _GPU_ID.match(v):
                attrs["kind"] = "gpu"  # a node named gpu<i> without a kind is a GPU
            is_gpu = attrs.get("kind") == "gpu"
            if not is_gpu and _GPU_ID.match(v):
                raise self._fail(f"node {v} is named like a GPU but its kind is {attrs.get('kind')!r}, not 'gpu'")
            if not is_gpu:
                continue
            idx = attrs.get("index")
            if idx is None:
                m = _GPU_ID.match(v)
                if not m:
                    raise self._fail(f"GPU node {v} has no 'index' and is not named gpu<i>")
                idx = attrs["index"] = int(m.group(1))
            if not isinstance(idx, (int, np.integer)) or isinstance(idx, bool) or idx < 0:
                raise self._fail(f"GPU node {v} has index {idx!r}; need an integer >= 0")
            if int(idx) in gpus:
                raise self._fail(f"GPU index {idx} is used by both {gpus[int(idx)]} and {v}")
            gpus[int(idx)] = v
        if not gpus:
            raise self._fail("has no GPU nodes (kind 'gpu')")
        G = len(gpus)
        if G > MAX_GPUS:  # routes are per GPU pair: memory and time grow with GPUs squared
            raise self._fail(f"has {G} GPUs; at most {MAX_GPUS} are supported")
        missing = sorted(set(range(G)) - set(gpus))
        if missing:
            raise self._fail(f"GPU indices must be contiguous 0..{G - 1}; index {missing[0]} is missing")
        self.gpu_names = [gpus[i] for i in range(G)]
        self.num_gpus = G
        for u, v, attrs in g.edges(data=True):
            if u == v:
                raise self._fail(f"edge {u}->{v} is a self-loop")
            for key in ("bandwidth", "latency"):
                x = attrs.get(key)
                if x is None:
                    raise self._fail(f"edge {u}->{v} has no {key}")
                if not _num(x) or not math.isfinite(float(x)):
                    raise self._fail(f"edge {u}->{v} has {key} {x!r}; need a finite number")
                if key == "bandwidth" and not float(x) > 0:
                    raise self._fail(f"edge {u}->{v} has non-positive bandwidth {x!r} (bytes/s)")
                if key == "bandwidth" and not MIN_BANDWIDTH <= float(x) <= MAX_BANDWIDTH:
                    raise self._fail(f"edge {u}->{v} has bandwidth {x!r} bytes/s; need {MIN_BANDWIDTH:g}.."
                                     f"{MAX_BANDWIDTH:g} (1 MB/s .. 1 PB/s)")
                if key == "latency" and not 0.0 <= float(x) <= MAX_LATENCY:
                    raise self._fail(f"edge {u}->{v} has latency {x!r} s; need 0..{MAX_LATENCY:g} s")
        # nodes: explicit attrs, else one node of gpus_per_node GPUs per block of indices
        nodes = [g.nodes[self.gpu_names[i]].get("node") for i in range(G)]
        if all(n is None for n in nodes):
            gpn = gpus_per_node or G
            if G % gpn:
                raise self._fail(f"{G} GPUs do not split into nodes of gpus_per_node={gpn}")
            nodes = [i // gpn for i in range(G)]
            for i in range(G):
                g.nodes[self.gpu_names[i]]["node"] = nodes[i]
        elif any(n is None or not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0 for n in nodes):
            bad = next(i for i, n in enumerate(nodes)
                       if n is None or not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0)
            raise self._fail(f"GPU {self.gpu_names[bad]} has node {nodes[bad]!r}; need an integer >= 0 on every GPU")
        node_ids = sorted(set(int(n) for n in nodes))
        if node_ids != list(range(len(node_ids))):
            raise self._fail(f"GPU node numbers must be contiguous 0..{len(node_ids) - 1}, got {node_ids[:8]}")
        counts = np.bincount(np.asarray(nodes, dtype=int))
        if gpus_per_node is not None and (counts != gpus_per_node).any():
            raise self._fail(f"gpus_per_node is {gpus_per_node} but the nodes hold {sorted(set(counts.tolist()))} GPUs")
        if (counts != counts[0]).any():
            raise self._fail(f"every node must hold the same number of GPUs; they hold {sorted(set(counts.tolist()))}")
        gpn = int(counts[0])
        wrong = [i for i in range(G) if int(nodes[i]) != i // gpn]
        if wrong:
            raise self._fail(f"GPU {wrong[0]} is in node {nodes[wrong[0]]}, expected {wrong[0] // gpn}: node n must "
                             f"hold GPUs n*{gpn}..n*{gpn}+{gpn - 1} (number GPUs node by node)")
        self._gpu_node = np.asarray(nodes, dtype=np.int64)
        self.num_nodes = len(node_ids)
        self.gpus_per_node = gpn
        self.num_rails = gpn  # NICs per node; rail-routed clusters read it from the GPUs' rails (_check_rails)
        self._check_reachable()
        if self.routing != "shortest":
            self._check_rails()

    def _check_reachable(self) -> None:
        g = self.graph
        g0 = self.gpu_names[0]
        fwd = nx.descendants(g, g0) | {g0}
        bwd = nx.ancestors(g, g0) | {g0}
        for name in self.gpu_names:
            if name not in fwd:
                raise self._fail(f"GPU {name} cannot be reached from {g0} (disconnected)")
            if name not in bwd:
                raise self._fail(f"GPU {name} cannot reach {g0} (disconnected)")

    def _check_rails(self) -> None:
        """Rail routing needs nic/leaf attributes: index the NIC of (node, rail) and the leaf of (pod, rail)."""
        g = self.graph
        self._nic: dict[tuple[int, int], str] = {}
        self._leaf: dict[tuple[int, int], str] = {}
        self._spines = sorted((v for v, a in g.nodes(data=True) if a.get("kind") == "spine"), key=_natural)
        self._node_pod: dict[int, int] = {}
        for v, a in g.nodes(data=True):
            kind = a.get("kind")
            try:
                if kind == "nic":
                    self._nic[(int(a["node"]), int(a["rail"]))] = v
                    self._node_pod[int(a["node"])] = int(a.get("pod", 0))
                elif kind == "leaf":
                    self._leaf[(int(a.get("pod", 0)), int(a["rail"]))] = v
            except (KeyError, TypeError, ValueError):
                raise self._fail(f"routing {self.routing} needs integer 'node'/'rail' on nic and 'rail' on leaf "
                                 f"nodes; {v} lacks them") from None
        rails = [g.nodes[v].get("rail") for v in self.gpu_names]
        ok = all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r >= 0 for r in rails)
        self.num_rails = int(max(rails)) + 1 if ok else self.gpus_per_node  # NICs per node
        if not ok:
            for i, v in enumerate(self.gpu_names):
                g.nodes[v]["rail"] = i % self.gpus_per_node
        if self.num_nodes > 1:
            for n in range(self.num_nodes):
                for r in range(self.num_rails):
                    if (n, r) not in self._nic:
                        raise self._fail(f"routing {self.routing}: node {n} has no NIC on rail {r}")
                    if (self._node_pod[n], r) not in self._leaf:
                        raise self._fail(f"routing {self.routing}: pod {self._node_pod[n]} has no leaf on rail {r}")

    # -- basic queries -------------------------------------------------------------------------------
    def gpu_node(self) -> np.ndarray:
        """[G] node index of each GPU."""
        return self._gpu_node.copy()

    def edges(self) -> list[tuple[str, str]]:
        """Directed links in a fixed order; position = edge index ``e`` of every per-link array."""
        return list(self._edges)

    def edge_index(self, u: str, v: str) -> int:
        try:
            return self._edge_index[(u, v)]
        except KeyError:
            raise MoesimError(f"topology {self.name} has no link {u}->{v}") from None

    @property
    def num_links(self) -> int:
        return len(self._edges)

    def is_inter_node(self) -> np.ndarray:
        """[G, G] True where source and destination GPU sit in different nodes."""
        return self._gpu_node[:, None] != self._gpu_node[None, :]

    # -- routing -------------------------------------------------------------------------------------
    def _path_edges(self, path: list[str]) -> list[int]:
        return [self._edge_index[(a, b)] for a, b in itertools.pairwise(path)]

    def _build_routes(self) -> None:
        G = self.num_gpus
        if self.routing == "shortest" or self.num_nodes == 1:
            per_pair = self._routes_shortest()
            lengths = np.fromiter((len(r) for r in per_pair), dtype=np.int64, count=G * G)
            self._indices = np.fromiter((e for r in per_pair for e in r), dtype=np.int64, count=int(lengths.sum()))
        else:
            from moesim.topo.routing import rail_route_table

            table = rail_route_table(self)
            keep = table >= 0
            lengths = keep.sum(axis=1)
            self._indices = table[keep]
        self._indptr = np.concatenate([[0], np.cumsum(lengths)])

    def _routes_shortest(self) -> list[list[int]]:
        """Least latency, then fewest hops (a tiny per-hop weight breaks ties deterministically)."""
        hop = 1e-12 + 1e-9 * float(self.edge_latency.min(initial=0.0))
        weight = {e: float(self.graph.edges[e]["latency"]) + hop for e in self._edges}
        out: list[list[int]] = []
        for s in self.gpu_names:
            paths = nx.single_source_dijkstra_path(self.graph, s, weight=lambda u, v, _d: weight[(u, v)])
            out.extend(self._path_edges(paths[d]) if d != s else [] for d in self.gpu_names)
        return out

    def route(self, src: int, dst: int) -> list[int]:
        """Edge indices of the path from GPU ``src`` to GPU ``dst`` (empty when src == dst)."""
        G = self.num_gpus
        if not (0 <= src < G and 0 <= dst < G):
            raise MoesimError(f"topology {self.name} has GPUs 0..{G - 1}; asked for route {src}->{dst}")
        if self._indptr is None:
            self._build_routes()
        k = src * G + dst
        return self._indices[self._indptr[k]:self._indptr[k + 1]].tolist()

    def route_nodes(self, src: int, dst: int) -> list[str]:
        """The graph nodes a route visits, source and destination GPUs included (for display and tests)."""
        path = [self.gpu_names[src]]
        for e in self.route(src, dst):
            path.append(self._edges[e][1])
        return path

    def routing_matrix(self) -> sp.csr_matrix:
        """[G*G, E] 0/1: row ``s*G+d`` marks the links the pair's route crosses (cached; do not modify)."""
        if self._rmat is None:
            if self._indptr is None:
                self._build_routes()
            G, E = self.num_gpus, self.num_links
            data = np.ones(len(self._indices), dtype=np.float64)
            m = sp.csr_matrix((data, self._indices.copy(), self._indptr.copy()), shape=(G * G, E))
            m.sum_duplicates()
            m.data[:] = 1.0
            self._rmat = m
        return self._rmat

    def route_table(self) -> np.ndarray:
        """[G*G, H] edge indices of every pair's route (row ``s*G+d``, in path order), padded with -1 (cached;
        read-only). H is the longest route's hop count. For event-driven consumers that start one flow per pair."""
        if self._table is None:
            if self._indptr is None:
                self._build_routes()
            assert self._indptr is not None and self._indices is not None
            lengths = np.diff(self._indptr)
            H = max(int(lengths.max(initial=0)), 1)
            table = np.full((len(lengths), H), -1, dtype=np.int64)
            rows = np.repeat(np.arange(len(lengths)), lengths)
            cols = np.arange(len(self._indices)) - np.repeat(self._indptr[:-1], lengths)
            table[rows, cols] = self._indices
            table.setflags(write=False)
            self._table = table
        return self._table

    def path_latency(self) -> np.ndarray:
        """[G, G] seconds: sum of link latencies along each route, 0 on the diagonal (cached; read-only)."""
        if self._plat is None:
            G = self.num_gpus
            plat = (self.routing_matrix() @ self.edge_latency).reshape(G, G)
            plat.setflags(write=False)
            self._plat = plat
        return self._plat

    def link_load(self, bytes_matrix: np.ndarray) -> np.ndarray:
        """bytes [..., G, G] (src, dst) -> [..., E] bytes on each link (a dense matrix product on small clusters,
        sparse on large ones)."""
        b = np.asarray(bytes_matrix, dtype=float)
        G, E = self.num_gpus, self.num_links
        if b.shape[-2:] != (G, G):
            raise MoesimError(f"topology {self.name} has {G} GPUs; traffic matrix has shape {b.shape}")
        flat = b.reshape(-1, G * G)
        if G * G * E <= 1 << 14:  # one node: BLAS beats the sparse product
            if self._dense is None:
                self._dense = self.routing_matrix().toarray()
            out = flat @ self._dense
        else:
            out = np.asarray((self.routing_matrix().T @ flat.T).T)
        return out.reshape(b.shape[:-2] + (E,))

    # -- constructors, serialisation, summary ----------------------------------------------------------
    @classmethod
    def flat(cls, num_gpus: int, link_bw: float, latency: float, device: DeviceSpec | str = "cpu",
             name: str = "flat") -> Topology:
        """One switch, every GPU on it by a link of ``link_bw`` bytes/s each way; GPU→GPU ``latency`` s.

        For clusters whose network was fitted from a run (CPU/gloo ranks), not modelled link by link.
        """
        if isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, np.integer)) or num_gpus < 1:
            raise MoesimError(f"flat topology needs num_gpus >= 1, got {num_gpus!r}")
        if not _num(link_bw) or not math.isfinite(link_bw) or link_bw <= 0:
            raise MoesimError(f"flat topology needs a positive finite link bandwidth, got {link_bw!r}")
        if not _num(latency) or not math.isfinite(latency) or latency < 0:
            raise MoesimError(f"flat topology needs a finite latency >= 0, got {latency!r}")
        dev = get_device(device) if isinstance(device, str) else device
        return cls(build_flat(int(num_gpus), float(link_bw), float(latency)), name, dev,
                   gpus_per_node=int(num_gpus))

    def to_json(self) -> dict[str, Any]:
        from moesim.topo.jsonio import topology_to_json

        return topology_to_json(self)

    @classmethod
    def from_json(cls, data: Any, source: str = "<json>") -> Topology:
        from moesim.topo.jsonio import topology_from_json

        return topology_from_json(cls, data, source)

    def summary(self) -> dict[str, Any]:
        """Counts, per-GPU bandwidths, all-to-all bandwidth and latencies (for ``moesim topo show``)."""
        from moesim.topo.summary import summarize

        return summarize(self)

    def __repr__(self) -> str:
        return (f"Topology({self.name!r}, {self.num_gpus} GPUs = {self.num_nodes}×{self.gpus_per_node}, "
                f"{self.num_links} links, {self.device.name})")


def _natural(s: str) -> tuple[Any, ...]:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


_OPTION_KEYS = {"gpus": "gpus", "nics": "nics", "nic-bw": "nic_bw", "nvlink-bw": "nvlink_bw"}


def _parse_options(spec: str, text: str) -> dict[str, float]:
    """``gpus=12,nics=4,nic-bw=25,nvlink-bw=300`` (bandwidths in GB/s) -> keyword arguments (bytes/s)."""
    out: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key.strip().lower() not in _OPTION_KEYS:
            raise MoesimError(f"topology {spec!r}: option {part.strip()!r} is not KEY=VALUE with KEY one of "
                              f"{', '.join(_OPTION_KEYS)}")
        try:
            v = float(value)
        except ValueError:
            raise MoesimError(f"topology {spec!r}: {key.strip()} must be a number, got {value!r}") from None
        name = _OPTION_KEYS[key.strip().lower()]
        out[name] = v * 1e9 if name.endswith("_bw") else v
    return out


def _check_count(spec: str, what: str, v: float | None) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not float(v).is_integer() or v < 1:
        raise MoesimError(f"topology {spec}: {what} must be a positive integer, got {v!r}")
    return int(v)


def load_topology(spec: str | Topology, *, gpus: int | None = None, nics: int | None = None,
                  nic_bw: float | None = None, nvlink_bw: float | None = None) -> Topology:
    """A preset (``dgx-h100``), a cluster of preset nodes (``dgx-h100:8``) or a topology JSON file.

    ``NAME:1`` is the single node (no InfiniBand). A :class:`Topology` is returned as it is (or its first
    ``gpus``). Presets take ``nics`` (NICs per node), ``nic_bw`` and ``nvlink_bw`` (bytes/s), also written in the
    spec: ``hgx-h800:2,nics=4,nic-bw=25,nvlink-bw=300`` (GB/s there). ``gpus``: only the first N GPUs
    (:func:`first_gpus`), for any topology.
    """
    if isinstance(spec, Topology):
        return first_gpus(spec, gpus) if gpus is not None else spec
    if not isinstance(spec, str) or not spec.strip():
        raise MoesimError("topology must be a preset name, NAME:N or a JSON file path")
    spec = spec.strip()
    key = spec.lower()
    base, _, opt_text = key.partition(",")
    opts: dict[str, Any] = _parse_options(spec, opt_text) if opt_text and base.split(":")[0] in NODE_PRESETS else {}
    for name, v in (("gpus", gpus), ("nics", nics), ("nic_bw", nic_bw), ("nvlink_bw", nvlink_bw)):
        if v is not None:
            opts[name] = v
    n_gpus = _check_count(spec, "gpus", opts.pop("gpus", None))
    n_nics = _check_count(spec, "nics", opts.get("nics"))
    for name in ("nic_bw", "nvlink_bw"):
        v = opts.get(name)
        if v is not None and (not _num(v) or not math.isfinite(float(v)) or float(v) <= 0):
            raise MoesimError(f"topology {spec}: {name.replace('_', '-')} must be a positive number, got {v!r}")
    node_opts = {"nics": n_nics, "nic_bw": opts.get("nic_bw"), "nvlink_bw": opts.get("nvlink_bw")}
    label = key if not any(v is not None for v in node_opts.values()) or opt_text else key + "," + ",".join(
        f"{k.replace('_', '-')}={v / 1e9 if k.endswith('_bw') else v:g}" for k, v in node_opts.items() if v is not None)
    m = re.fullmatch(r"([a-z0-9-]+)(?::(\S+))?", base)
    topo: Topology | None = None
    if m and m.group(1) in NODE_PRESETS and not Path(spec).exists():
        count = m.group(2)
        if count is not None and (not count.isdigit() or int(count) < 1):
            raise MoesimError(f"topology {spec!r}: the node count after ':' must be a positive integer")
        if count is not None and int(count) > MAX_NODES:  # routes are per GPU pair: memory grows with GPUs squared
            raise MoesimError(f"topology {spec!r}: at most {MAX_NODES} nodes are supported")
        try:
            graph, node = build_preset(m.group(1), None if count is None else int(count), **node_opts)
        except ValueError as exc:
            raise MoesimError(f"topology {spec}: {exc}") from None
        topo = Topology(graph, label, node.device, gpus_per_node=node.gpus)
    else:
        if any(v is not None for v in node_opts.values()):
            raise MoesimError(f"topology {spec}: --nics, --nic-bw and --nvlink-bw apply to preset topologies "
                              "(NAME or NAME:N) only; edit the JSON file instead")
        path = Path(spec)
        if path.exists() or spec.endswith(".json"):
            from moesim.io import read_json

            topo = Topology.from_json(read_json(path, "topology file"), source=str(path))
    if topo is None:
        raise MoesimError(f"unknown topology {spec!r}; use a preset ({', '.join(PRESETS)}), NAME:N for a cluster "
                          "of N such nodes (e.g. dgx-h100:8, options as dgx-h100:8,nics=4,nic-bw=25), or a topology "
                          "JSON file")
    return first_gpus(topo, n_gpus) if n_gpus is not None else topo


def first_gpus(topo: Topology, n: int) -> Topology:
    """The sub-cluster of GPUs ``0..n-1``: whole nodes (n a multiple of the GPUs per node) or part of the first
    node (n below it). Switches, NICs and hosts of nodes left without GPUs go too; so do the NICs of the GPUs
    removed. Links keep their bandwidths (the fabric a job on part of a cluster sees)."""
    G, gpn = topo.num_gpus, topo.gpus_per_node
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise MoesimError(f"--gpus must be a positive integer, got {n!r}")
    if n > G:
        raise MoesimError(f"--gpus {n}: topology {topo.name} has only {G} GPUs")
    if n == G:
        return topo
    if n > gpn and n % gpn:
        raise MoesimError(f"--gpus {n}: topology {topo.name} has nodes of {gpn} GPUs; take at most {gpn} or a "
                          f"multiple of {gpn}")
    g = topo.graph.copy()
    keep = set(topo.gpu_names[:n])
    nodes_kept = {int(g.nodes[v]["node"]) for v in keep}
    drop = []
    for v, a in g.nodes(data=True):
        if a.get("kind") == "gpu":
            if v not in keep:
                drop.append(v)
        elif a.get("node") is not None and int(a["node"]) not in nodes_kept:
            drop.append(v)
    g.remove_nodes_from(drop)
    orphan = [v for v, a in g.nodes(data=True) if a.get("kind") == "nic"
              and not any(g.nodes[u].get("kind") in ("gpu", "pcie_switch") for u in g.successors(v))]
    g.remove_nodes_from(orphan)
    if len(nodes_kept) == 1:  # one node: no scale-out fabric left to use
        g.remove_nodes_from([v for v, a in g.nodes(data=True) if a.get("kind") in ("nic", "leaf", "spine")])
    name = f"{topo.name}[gpus={n}]"
    return Topology(g, name, topo.device, gpus_per_node=min(n, gpn), routing=topo.routing, source=name)
