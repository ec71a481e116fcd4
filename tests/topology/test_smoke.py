"""First smoke tests: presets load, routes resolve, the CLI answers."""

from __future__ import annotations

import numpy as np

from moesim.cli import main
from moesim.cost import CostModel
from moesim.models import get_model
from moesim.topology import DEVICES, Topology, load_topology


def test_presets_load_and_route() -> None:
    for spec, gpus in (("dgx-h100", 8), ("hgx-h800", 8), ("pcie-8gpu", 8), ("dgx-h100:2", 16)):
        t = load_topology(spec)
        assert t.num_gpus == gpus
        assert t.routing_matrix().shape == (gpus * gpus, t.num_links)
        assert (np.diag(t.path_latency()) == 0).all()


def test_flat_and_cost_smoke() -> None:
    t = Topology.flat(3, 1e9, 1e-5, DEVICES["cpu"])
    assert np.allclose(t.path_latency()[0, 1], 1e-5)
    c = CostModel.roofline(get_model("mixtral-8x7b"), DEVICES["h100"])
    assert c.expert_time(np.zeros(4)) == 0
    assert CostModel.from_dict(c.to_dict()).to_dict() == c.to_dict()


def test_cli_show(capsys) -> None:
    assert main(["topo", "show", "dgx-h100"]) == 0
    assert main(["topo", "show", "nope"]) == 2
