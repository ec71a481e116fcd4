"""Topology JSON: networkx node-link data plus the device and node layout.

    {"format": "moesim.topology", "version": 1, "name": "my-box", "device": "h100" | {DeviceSpec fields},
     "gpus_per_node": 8, "routing": "shortest" | "rail-pxn" | "rail-spine",
     "graph": {"directed": true, "nodes": [{"id": "gpu0", "kind": "gpu", "index": 0, "node": 0}, ...],
               "links": [{"source": "gpu0", "target": "sw0", "bandwidth": 4.5e11, "latency": 5e-7}, ...]}}

``"directed": false`` (or a link with ``"duplex": true``) adds both directions of each link. ``edges`` is
accepted for ``links`` (networkx ≥ 3.4 writes that name). ``moesim topo export PRESET`` writes a template.
"""

from __future__ import annotations

from typing import Any

import networkx as nx

from moesim.errors import MoesimError
from moesim.topo.devices import DeviceSpec

_RESERVED = {"id", "source", "target", "duplex"}


def topology_to_json(topo: Any) -> dict[str, Any]:
    g = topo.graph
    nodes = [{"id": v, **{k: _plain(x) for k, x in a.items()}} for v, a in g.nodes(data=True)]
    links = [{"source": u, "target": v, **{k: _plain(x) for k, x in a.items()}} for u, v, a in g.edges(data=True)]
    return {"format": "moesim.topology", "version": 1, "name": topo.name, "device": topo.device.to_dict(),
            "gpus_per_node": topo.gpus_per_node, "routing": topo.routing,
            "graph": {"directed": True, "nodes": nodes, "links": links}}


def _plain(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return x


def topology_from_json(cls: Any, data: Any, source: str) -> Any:
    def fail(msg: str) -> MoesimError:
        return MoesimError(f"topology {source}: {msg}")

    if not isinstance(data, dict):
        raise fail("must be a JSON object")
    fmt = data.get("format", "moesim.topology")
    if fmt != "moesim.topology":
        raise fail(f"format is {fmt!r}, expected 'moesim.topology'")
    if data.get("version", 1) != 1:
        raise fail(f"unsupported version {data.get('version')!r} (this moesim reads version 1)")
    unknown = sorted(set(data) - {"format", "version", "name", "device", "gpus_per_node", "routing", "graph",
                                  "description"})
    if unknown:
        raise fail(f"unknown keys: {', '.join(unknown)}")
    if "device" not in data:
        raise fail("lacks 'device' (a preset name such as 'h100', or an object with name, peak_flops, hbm_bw, "
                   "hbm_bytes)")
    try:
        device = DeviceSpec.from_dict(data["device"])
    except MoesimError as exc:
        raise fail(str(exc)) from None
    gpn = data.get("gpus_per_node")
    if gpn is not None and (isinstance(gpn, bool) or not isinstance(gpn, int) or gpn < 1):
        raise fail(f"gpus_per_node must be a positive integer, got {gpn!r}")
    routing = data.get("routing")
    if routing is not None and not isinstance(routing, str):
        raise fail("routing must be a string")
    name = data.get("name", source)
    if not isinstance(name, str):
        raise fail("name must be a string")
    graph = data.get("graph")
    if not isinstance(graph, dict):
        raise fail("lacks 'graph' (node-link data: an object with 'nodes' and 'links')")
    nodes = graph.get("nodes")
    links = graph.get("links", graph.get("edges"))
    if not isinstance(nodes, list) or not isinstance(links, list):
        raise fail("graph needs lists 'nodes' and 'links'")
    directed = graph.get("directed", True)
    if not isinstance(directed, bool):
        raise fail("graph.directed must be true or false")
    g = nx.DiGraph()
    for i, nd in enumerate(nodes):
        if not isinstance(nd, dict) or "id" not in nd:
            raise fail(f"node {i} must be an object with an 'id'")
        if not isinstance(nd["id"], str):
            raise fail(f"node {i} id {nd['id']!r} must be a string")
        if nd["id"] in g:
            raise fail(f"node {nd['id']} appears twice")
        g.add_node(nd["id"], **{k: v for k, v in nd.items() if k not in _RESERVED})
    for i, ln in enumerate(links):
        if not isinstance(ln, dict) or "source" not in ln or "target" not in ln:
            raise fail(f"link {i} must be an object with 'source' and 'target'")
        u, v = ln["source"], ln["target"]
        for end in (u, v):
            if not isinstance(end, str) or end not in g:
                raise fail(f"link {i} ({u!r}->{v!r}) names unknown node {end!r}")
        duplex = ln.get("duplex", not directed)
        attrs = {k: x for k, x in ln.items() if k not in _RESERVED}
        pairs = [(u, v), (v, u)] if duplex else [(u, v)]
        for a, b in pairs:
            if g.has_edge(a, b):
                raise fail(f"link {a}->{b} appears twice")
            g.add_edge(a, b, **attrs)
    return cls(g, name, device, gpus_per_node=gpn, routing=routing, source=source)
