"""Topology knobs: NIC count / NIC and NVLink bandwidth on NAME:N presets, the first N GPUs, leaf-spine sizing."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import MoesimError
from moesim.topo import load_topology


def _bw(t, u: str, v: str) -> float:
    return float(t.edge_bw[t.edge_index(u, v)])


@pytest.mark.parametrize("nodes", [2, 3, 32, 40])
def test_leaf_spine_links_never_narrower_than_a_nic(nodes: int) -> None:
    """A leaf's 32 uplinks over 8 spines: 4 NIC ports per leaf-spine pair, whatever the node count."""
    t = load_topology(f"dgx-h100:{nodes}")
    ls = [e for e, (u, v) in enumerate(t.edges()) if u.startswith("leaf") and v.startswith("spine")]
    assert ls and np.all(t.edge_bw[ls] == 4 * 50e9)
    # cross-node traffic is limited by the NIC, not by the fabric above it
    assert min(t.edge_bw[e] for e in t.route(0, 9 + 8 * (nodes - 2))) == 50e9


def test_nic_count_and_bandwidths_change_the_graph() -> None:
    base = load_topology("hgx-h800:2")
    t = load_topology("hgx-h800:2", nics=4, nic_bw=25e9, nvlink_bw=300e9)
    assert t.name == "hgx-h800:2,nics=4,nic-bw=25,nvlink-bw=300"
    nics = [v for v, a in t.graph.nodes(data=True) if a.get("kind") == "nic"]
    assert len(nics) == 8 and len([v for v, a in base.graph.nodes(data=True) if a.get("kind") == "nic"]) == 16
    assert t.num_rails == 4 and [t.graph.nodes[f"gpu{i}"]["rail"] for i in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert _bw(t, "nic0", "leaf0") == 25e9 and _bw(base, "nic0", "leaf0") == 50e9
    assert _bw(t, "gpu0", "nvswitch0") == 300e9 and _bw(base, "gpu0", "nvswitch0") == 160e9
    assert _bw(t, "leaf0", "spine0") == 4 * 25e9
    # GPUs 0 and 1 share NIC 0 (and its PCIe switch) but talk to each other over NVLink
    assert t.route_nodes(0, 1) == ["gpu0", "nvswitch0", "gpu1"]
    assert t.route_nodes(1, 9) == ["gpu1", "nic0", "leaf0", "nic4", "gpu9"]
    # the same through the spec string and the CLI flags (GB/s)
    assert load_topology("hgx-h800:2,nics=4,nic-bw=25,nvlink-bw=300").to_json() == t.to_json()
    # half the NICs at half the rate: a quarter of the scale-out bandwidth per GPU, and of the inter-node all-to-all
    s0, s1 = base.summary()["per_gpu"], t.summary()["per_gpu"]
    assert s1["scale_out_bw"] == pytest.approx(s0["scale_out_bw"] / 4)
    assert s1["inter_node_alltoall_bw"] == pytest.approx(s0["inter_node_alltoall_bw"] / 4)


def test_first_gpus() -> None:
    t = load_topology("dgx-h100:4", gpus=16)
    assert (t.num_gpus, t.num_nodes, t.gpus_per_node) == (16, 2, 8)
    assert not any(a.get("node") in (2, 3) for _, a in t.graph.nodes(data=True))
    assert t.route_nodes(0, 9) == load_topology("dgx-h100:2").route_nodes(0, 9)
    part = load_topology("hgx-h800:2,gpus=4")
    assert (part.num_gpus, part.num_nodes) == (4, 1)
    assert {a.get("kind") for _, a in part.graph.nodes(data=True)} == {"gpu", "nvswitch"}
    assert part.num_links == 8
    with pytest.raises(MoesimError, match="take at most 8 or a multiple of 8"):
        load_topology("hgx-h800:2", gpus=12)
    with pytest.raises(MoesimError, match="has only 16 GPUs"):
        load_topology("hgx-h800:2", gpus=17)


@pytest.mark.parametrize("argv, match", [
    (["--nics", "3"], "3 NICs do not divide the 8 GPUs"),
    (["--nic-bw", "0"], "nic-bw must be a positive number"),
    (["--gpus", "0"], "gpus must be a positive integer"),
])
def test_bad_flags_one_line(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topo", "show", "dgx-h100:2", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and match in err


def test_cli_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topo", "show", "hgx-h800:2", "--gpus", "8", "--json"]) == 0
    import json

    s = json.loads(capsys.readouterr().out)
    assert (s["num_gpus"], s["num_nodes"], s["name"]) == (8, 1, "hgx-h800:2[gpus=8]")
