"""Preset topologies: sizes, bandwidths, routes, the routing matrix, JSON round trips."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moesim.errors import MoesimError
from moesim.topo import DEVICES, PRESETS, Topology, load_topology
from moesim.topo.presets import H800_NVLINK_BW, IB_NDR_BW, NVLINK4_BW, PCIE5_X16_BW

SINGLE = {"dgx-h100": ("h100", NVLINK4_BW), "dgx-h200": ("h200", NVLINK4_BW), "hgx-h800": ("h800", H800_NVLINK_BW),
          "pcie-8gpu": ("h100-pcie", PCIE5_X16_BW)}


def test_constants_are_the_published_figures() -> None:
    assert NVLINK4_BW == 450e9 and H800_NVLINK_BW == 160e9 and IB_NDR_BW == 400e9 / 8 and PCIE5_X16_BW == 64e9
    assert DEVICES["h100"].peak_flops == 989e12 and DEVICES["h100"].hbm_bw == 3.35e12
    assert DEVICES["h200"].hbm_bw == 4.8e12 and DEVICES["h200"].hbm_bytes == 141e9
    assert DEVICES["h800"].hbm_bw == 3.35e12 and "cpu" in DEVICES


@pytest.mark.parametrize("name", PRESETS)
def test_single_node_presets(name: str) -> None:
    t = load_topology(name)
    dev, bw = SINGLE[name]
    assert (t.num_gpus, t.num_nodes, t.gpus_per_node) == (8, 1, 8)
    assert t.device == DEVICES[dev]
    assert not t.is_inter_node().any()
    # every link out of a GPU carries the node fabric's per-direction bandwidth
    out = [t.edge_bw[e] for e, (u, _) in enumerate(t.edges()) if u.startswith("gpu")]
    assert out and all(b == bw for b in out)
    s = t.summary()
    assert s["per_gpu"]["intra_node_injection_bw"] == bw and s["per_gpu"]["scale_out_bw"] == 0
    if name != "pcie-8gpu":  # NVSwitch: a uniform all-to-all runs at the full NVLink rate
        assert s["per_gpu"]["alltoall_bw"] == pytest.approx(bw)
        assert t.path_latency()[0, 1] == pytest.approx(1e-6)
    else:  # two GPUs share each PCIe switch's uplink to the host: slower than one PCIe link
        assert s["per_gpu"]["alltoall_bw"] < bw


@pytest.mark.parametrize("spec,nodes", [("dgx-h100:2", 2), ("hgx-h800:4", 4), ("pcie-8gpu:2", 2), ("dgx-h200:3", 3)])
def test_clusters(spec: str, nodes: int) -> None:
    t = load_topology(spec)
    assert (t.num_gpus, t.num_nodes, t.gpus_per_node) == (8 * nodes, nodes, 8)
    np.testing.assert_array_equal(t.gpu_node(), np.repeat(np.arange(nodes), 8))
    nic_links = [t.edge_bw[e] for e, (u, v) in enumerate(t.edges()) if u.startswith("nic") and v.startswith("leaf")]
    assert len(nic_links) == 8 * nodes and set(nic_links) == {IB_NDR_BW}
    s = t.summary()
    assert s["per_gpu"]["scale_out_bw"] == IB_NDR_BW
    if not spec.startswith("pcie"):
        assert s["per_gpu"]["inter_node_alltoall_bw"] == pytest.approx(IB_NDR_BW)
        if nodes % 2 == 0:  # whole nodes on each side of the cut: one NIC per GPU crosses it
            assert s["bisection_bw"] == pytest.approx(4 * nodes * IB_NDR_BW)
    lat = t.path_latency()
    inter = t.is_inter_node()
    assert lat[inter].min() >= 2e-6 and lat[inter].max() <= 5e-6  # IB: 2-5 µs
    assert lat[~inter].max() <= 2e-6


def _check_routes(t: Topology) -> None:
    G = t.num_gpus
    edges = t.edges()
    R = t.routing_matrix()
    inter = t.is_inter_node()
    for s in range(G):
        for d in range(G):
            r = t.route(s, d)
            if s == d:
                assert r == []
                continue
            # the path is connected and goes from gpu<s> to gpu<d>
            assert edges[r[0]][0] == t.gpu_names[s] and edges[r[-1]][1] == t.gpu_names[d]
            for a, b in itertools.pairwise(r):
                assert edges[a][1] == edges[b][0]
            assert len({edges[e][1] for e in r}) == len(r), "a route visits no node twice"
            kinds = set(t.edge_kind[r].tolist())
            assert ("ib" in kinds) == bool(inter[s, d])  # intra-node never touches IB; inter-node always does
            tab = t.route_table()[s * G + d]
            assert tab[:len(r)].tolist() == r and (tab[len(r):] == -1).all()
            row = R.getrow(s * G + d)
            assert sorted(row.indices.tolist()) == sorted(r)
            assert t.path_latency()[s, d] == pytest.approx(t.edge_latency[r].sum())


@pytest.mark.parametrize("spec", ["dgx-h100", "pcie-8gpu", "dgx-h100:2", "pcie-8gpu:2", "hgx-h800:3"])
def test_routes_are_paths(spec: str) -> None:
    _check_routes(load_topology(spec))


def test_pxn_routes_cross_rails_on_nvlink_and_stay_on_the_destination_rail() -> None:
    t = load_topology("dgx-h100:2")
    assert t.route_nodes(0, 9) == ["gpu0", "nvswitch0", "gpu1", "nic1", "leaf1", "nic9", "gpu9"]
    assert t.route_nodes(3, 11) == ["gpu3", "nic3", "leaf3", "nic11", "gpu11"]
    assert t.route_nodes(0, 5) == ["gpu0", "nvswitch0", "gpu5"]
    spines = [e for e, (u, v) in enumerate(t.edges()) if u.startswith("spine") or v.startswith("spine")]
    assert t.routing_matrix()[:, spines].nnz == 0  # one pod: PXN never needs a spine


def test_rail_spine_routing_and_pods() -> None:
    t = load_topology("dgx-h100:2")
    data = t.to_json()
    data["routing"] = "rail-spine"
    ts = Topology.from_json(data)
    path = ts.route_nodes(0, 9)
    assert path[:3] == ["gpu0", "nic0", "leaf0"] and path[3].startswith("spine")
    assert path[-3:] == ["leaf1", "nic9", "gpu9"]
    _check_routes(ts)
    big = load_topology("dgx-h100:33")  # two pods: same-rail traffic between pods crosses a spine
    p = big.route_nodes(0, 32 * 8)
    assert p[0] == "gpu0" and p[-1] == "gpu256" and any(n.startswith("spine") for n in p)


def test_flat() -> None:
    t = Topology.flat(4, 2e9, 3e-5, DEVICES["cpu"], name="fit")
    assert (t.num_gpus, t.num_nodes, t.name) == (4, 1, "fit")
    lat = t.path_latency()
    assert np.allclose(lat[~np.eye(4, dtype=bool)], 3e-5) and (np.diag(lat) == 0).all()
    assert t.summary()["per_gpu"]["alltoall_bw"] == pytest.approx(2e9)
    _check_routes(t)
    with pytest.raises(MoesimError):
        Topology.flat(0, 1e9, 0.0, DEVICES["cpu"])
    with pytest.raises(MoesimError):
        Topology.flat(2, -1.0, 0.0, DEVICES["cpu"])


def test_link_load_matches_the_routing_matrix() -> None:
    t = load_topology("dgx-h100:2")
    rng = np.random.default_rng(0)
    b = rng.random((3, 16, 16))
    load = t.link_load(b)
    manual = np.zeros(t.num_links)
    for s in range(16):
        for d in range(16):
            manual[t.route(s, d)] += b[1, s, d]
    np.testing.assert_allclose(load[1], manual)


@given(spec=st.sampled_from(["dgx-h100", "hgx-h800", "pcie-8gpu", "dgx-h100:2", "pcie-8gpu:3"]),
       routing=st.sampled_from([None, "shortest", "rail-spine"]))
def test_json_round_trip(spec: str, routing: str | None) -> None:
    t = load_topology(spec)
    data = json.loads(json.dumps(t.to_json()))
    if routing:
        data["routing"] = routing
    back = Topology.from_json(data, source="rt")
    assert back.edges() == t.edges()
    np.testing.assert_array_equal(back.edge_bw, t.edge_bw)
    np.testing.assert_array_equal(back.edge_latency, t.edge_latency)
    assert back.device == t.device and back.gpus_per_node == t.gpus_per_node
    if routing is None:
        assert (back.routing_matrix() != t.routing_matrix()).nnz == 0
    else:
        _check_routes(back) if back.num_gpus <= 16 else None
    assert json.loads(json.dumps(back.to_json())) == data


def test_route_bounds() -> None:
    with pytest.raises(MoesimError, match=r"GPUs 0\.\.7"):
        load_topology("dgx-h100").route(0, 8)


def test_link_load_dense_and_sparse_paths_agree() -> None:
    for spec in ("dgx-h100", "dgx-h100:2"):  # single node: dense product; cluster: sparse
        t = load_topology(spec)
        b = np.random.default_rng(1).random((2, 3, t.num_gpus, t.num_gpus))
        manual = np.einsum("...p,pe->...e", b.reshape(2, 3, -1), t.routing_matrix().toarray())
        np.testing.assert_allclose(t.link_load(b), manual)
    with pytest.raises(MoesimError, match="traffic matrix"):
        load_topology("dgx-h100").link_load(np.ones((4, 4)))


def _check_routes_vectorised(t: Topology) -> None:
    """Every row of the route table is a connected path from its source GPU to its destination GPU, crossing IB
    exactly when the GPUs sit in different nodes, visiting no node twice."""
    G = t.num_gpus
    names = np.array([u for u, _ in t.edges()] + [""]), np.array([v for _, v in t.edges()] + [""])
    tab = t.route_table()
    kind = np.append(t.edge_kind, "")[tab]
    head, tail = names[0][tab], names[1][tab]
    valid = tab >= 0
    lengths = valid.sum(1)
    assert (valid[:, :-1] | ~valid[:, 1:]).all()  # no gaps: padding only at the end
    src = np.repeat(np.arange(G), G)
    dst = np.tile(np.arange(G), G)
    gpu = np.array(t.gpu_names)
    off = src != dst
    assert (lengths[~off] == 0).all() and (lengths[off] > 0).all()
    assert (head[off, 0] == gpu[src[off]]).all()
    assert (tail[off, lengths[off] - 1] == gpu[dst[off]]).all()
    both = valid[:, :-1] & valid[:, 1:]
    assert (tail[:, :-1][both] == head[:, 1:][both]).all()
    inter = t.is_inter_node().ravel()
    assert ((kind == "ib").any(1) == inter).all()
    for row in np.nonzero(off)[0][:: max(1, G * G // 2000)]:  # a sample: no node visited twice
        path = tail[row, :lengths[row]]
        assert len(set(path.tolist())) == len(path)


@pytest.mark.parametrize("spec,routing", [("dgx-h100:33", None), ("dgx-h100:33", "rail-spine"),
                                          ("pcie-8gpu:5", "rail-spine"), ("hgx-h800:8", None)])
def test_large_clusters_route_correctly(spec: str, routing: str | None) -> None:
    t = load_topology(spec)
    if routing:
        data = t.to_json()
        data["routing"] = routing
        t = Topology.from_json(data)
    _check_routes_vectorised(t)
    # PXN inside a pod never uses a spine; rail-spine must, between different rails of different nodes
    on_spine = np.isin(np.arange(t.num_links), [e for e, (u, v) in enumerate(t.edges()) if "spine" in u + v])
    crosses = (t.routing_matrix()[:, on_spine].sum(axis=1).A1 > 0).reshape(t.num_gpus, t.num_gpus)
    node = t.gpu_node()
    pod = node // 32
    rail = np.arange(t.num_gpus) % 8
    inter = node[:, None] != node[None, :]
    if t.routing == "rail-pxn":
        np.testing.assert_array_equal(crosses, inter & (pod[:, None] != pod[None, :]))
    else:
        expect = inter & ((rail[:, None] != rail[None, :]) | (pod[:, None] != pod[None, :]))
        np.testing.assert_array_equal(crosses, expect)
