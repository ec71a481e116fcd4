"""Malformed topologies: every problem is one line naming it (MoesimError), and exit code 2 from the CLI."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import networkx as nx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moesim.cli import main
from moesim.errors import MoesimError
from moesim.topo import Topology, load_topology


def _small() -> dict:
    """Four GPUs on a ring of direct links (no switch), shortest routing."""
    nodes = [{"id": f"gpu{i}", "kind": "gpu", "index": i, "node": i // 2} for i in range(4)]
    links = [{"source": f"gpu{i}", "target": f"gpu{(i + 1) % 4}", "bandwidth": 1e11, "latency": 1e-6, "duplex": True}
             for i in range(4)]
    return {"format": "moesim.topology", "version": 1, "name": "ring4", "device": "h100", "gpus_per_node": 2,
            "graph": {"directed": True, "nodes": nodes, "links": links}}


def test_custom_ring_is_valid_and_routes_over_neighbours() -> None:
    d = _small()
    for nd in d["graph"]["nodes"]:
        del nd["kind"], nd["index"]  # gpu<i> names alone make GPUs
    t = Topology.from_json(d, "ring")
    assert (t.num_gpus, t.num_nodes, t.gpus_per_node) == (4, 2, 2)
    assert len(t.route(0, 2)) == 2 and t.path_latency()[0, 2] == pytest.approx(2e-6)
    assert t.is_inter_node()[0, 2] and not t.is_inter_node()[0, 1]


def _mutate(kind: str) -> tuple[dict, str]:
    d = _small()
    links, nodes = d["graph"]["links"], d["graph"]["nodes"]
    if kind == "disconnected":
        d["graph"]["links"] = [ln for ln in links if "gpu3" not in (ln["source"], ln["target"])]
        return d, "gpu3"
    if kind == "one-way":  # gpu3 can send but never receive
        d["graph"]["links"] = [ln for ln in links if "gpu3" not in (ln["source"], ln["target"])] + [
            {"source": "gpu3", "target": "gpu0", "bandwidth": 1e9, "latency": 0.0}]
        return d, "gpu3"
    if kind == "negative":
        links[1]["bandwidth"] = -5.0
        return d, "bandwidth"
    if kind == "zero":
        links[1]["bandwidth"] = 0
        return d, "bandwidth"
    if kind == "nan":
        links[2]["latency"] = float("nan")
        return d, "latency"
    if kind == "inf":
        links[2]["bandwidth"] = float("inf")
        return d, "bandwidth"
    if kind == "string-number":
        links[0]["bandwidth"] = "fast"
        return d, "bandwidth"
    if kind == "negative-latency":
        links[0]["latency"] = -1e-6
        return d, "latency"
    if kind == "gap":
        nodes[3]["index"] = 7
        nodes[3]["id"] = "gpu7"
        for ln in links:
            for end in ("source", "target"):
                if ln[end] == "gpu3":
                    ln[end] = "gpu7"
        return d, "index 3 is missing"
    if kind == "duplicate-index":
        nodes[3]["index"] = 1
        return d, "index 1"
    if kind == "unknown-node":
        links[0]["target"] = "ghost"
        return d, "ghost"
    if kind == "no-gpus":
        for nd in nodes:
            nd["kind"] = "switch"
            nd["id"] = "s" + nd["id"]
        d["graph"]["links"] = []
        return d, "no GPU"
    if kind == "device":
        d["device"] = "tpu9"
        return d, "tpu9"
    if kind == "device-fields":
        d["device"] = {"name": "x", "peak_flops": -1, "hbm_bw": 1e12, "hbm_bytes": 1e9}
        return d, "peak_flops"
    if kind == "gpus_per_node":
        d["gpus_per_node"] = 3
        return d, "gpus_per_node"
    if kind == "uneven-nodes":
        nodes[1]["node"] = 1
        del d["gpus_per_node"]
        return d, "same number of GPUs"
    if kind == "interleaved-nodes":
        nodes[1]["node"], nodes[2]["node"] = 1, 0
        return d, "GPU 1 is in node 1, expected 0"
    if kind == "node-gap":
        for nd in nodes[2:]:
            nd["node"] = 5
        return d, "contiguous"
    if kind == "kindless-gpu-named-switch":
        nodes[0]["kind"] = "switch"
        return d, "named like a GPU"
    if kind == "routing":
        d["routing"] = "magic"
        return d, "magic"
    if kind == "rail-without-nics":
        d["routing"] = "rail-pxn"
        return d, "NIC"
    if kind == "self-loop":
        links.append({"source": "gpu0", "target": "gpu0", "bandwidth": 1.0, "latency": 0.0})
        return d, "self-loop"
    if kind == "duplicate-link":
        links.append(dict(links[0]))
        return d, "twice"
    if kind == "no-graph":
        del d["graph"]
        return d, "graph"
    if kind == "unknown-key":
        d["colour"] = "red"
        return d, "colour"
    if kind == "version":
        d["version"] = 9
        return d, "version"
    raise AssertionError(kind)


KINDS = ["disconnected", "one-way", "negative", "zero", "nan", "inf", "string-number", "negative-latency", "gap",
         "duplicate-index", "unknown-node", "uneven-nodes", "interleaved-nodes", "node-gap",
         "kindless-gpu-named-switch", "no-gpus", "device", "device-fields", "gpus_per_node", "routing",
         "rail-without-nics", "self-loop", "duplicate-link", "no-graph", "unknown-key", "version"]


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_topology_one_line_error(kind: str, tmp_path: Path, capsys) -> None:
    data, needle = _mutate(kind)
    with pytest.raises(MoesimError) as exc:
        Topology.from_json(copy.deepcopy(data), "bad.json").routing_matrix()
    msg = str(exc.value)
    assert "\n" not in msg and needle in msg, msg
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(data))  # NaN/Infinity are written as JSON extensions; the reader accepts and rejects them
    capsys.readouterr()
    assert main(["topo", "validate", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moesim: error:") and len(err.splitlines()) == 1


@pytest.mark.parametrize("content,needle", [(b"\x00\xff\x10garbage", "not a text"), (b"{not json", "not valid JSON"),
                                            (b"[1, 2, 3]", "JSON object"), (b"", "not valid JSON")])
def test_garbage_files(tmp_path: Path, content: bytes, needle: str, capsys) -> None:
    f = tmp_path / "t.json"
    f.write_bytes(content)
    with pytest.raises(MoesimError, match=needle):
        load_topology(str(f))
    assert main(["topo", "show", str(f)]) == 2


@pytest.mark.parametrize("spec", ["dgx-h999", "dgx-h100:0", "dgx-h100:x", "dgx-h100:-2", "missing.json", "", "  "])
def test_unknown_presets(spec: str, capsys) -> None:
    with pytest.raises(MoesimError):
        load_topology(spec)
    capsys.readouterr()
    assert main(["topo", "show", spec]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@given(n=st.integers(2, 9), extra=st.integers(0, 12), seed=st.integers(0, 10_000), cut=st.booleans())
def test_random_graphs_valid_iff_connected(n: int, extra: int, seed: int, cut: bool) -> None:
    """A random spanning tree (plus extra links) of GPUs and switches is valid and every route is a path;
    cutting every link of the last GPU makes it invalid with an error naming that GPU."""
    import random

    rnd = random.Random(seed)
    names = [f"gpu{i}" for i in range(n)] + [f"sw{j}" for j in range(rnd.randint(0, 3))]
    rnd.shuffle(names)
    g = nx.DiGraph()
    for v in names:
        g.add_node(v, kind="gpu" if v.startswith("gpu") else "switch")
    order = names[:]
    for i in range(1, len(order)):
        u, v = order[i], order[rnd.randrange(i)]
        bw, lat = rnd.uniform(1e9, 1e12), rnd.uniform(0, 5e-6)
        g.add_edge(u, v, bandwidth=bw, latency=lat)
        g.add_edge(v, u, bandwidth=bw, latency=lat)
    for _ in range(extra):
        u, v = rnd.sample(names, 2)
        g.add_edge(u, v, bandwidth=rnd.uniform(1e9, 1e12), latency=rnd.uniform(0, 5e-6))
    if cut:
        last = f"gpu{n - 1}"
        g.remove_edges_from(list(g.in_edges(last)) + list(g.out_edges(last)))
        with pytest.raises(MoesimError, match="disconnected"):
            Topology(g, "rnd", load_topology("dgx-h100").device)
        return
    t = Topology(g, "rnd", load_topology("dgx-h100").device)
    edges = t.edges()
    for s in range(n):
        for d in range(n):
            r = t.route(s, d)
            if s != d:
                assert edges[r[0]][0] == f"gpu{s}" and edges[r[-1]][1] == f"gpu{d}"
                assert all(edges[a][1] == edges[b][0] for a, b in itertools.pairwise(r))
    # shortest routing: no route is slower than the direct link where one exists
    lat = t.path_latency()
    for s in range(n):
        for d in range(n):
            if s != d and g.has_edge(f"gpu{s}", f"gpu{d}"):
                assert lat[s, d] <= g.edges[f"gpu{s}", f"gpu{d}"]["latency"] + 1e-9
