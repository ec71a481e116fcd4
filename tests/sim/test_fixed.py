"""Fixed costs (moesim.sim.fixed): NCCL's latency terms, host launches, LM head, the validate fit, both engines."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from moesim.calibration import OverheadFit
from moesim.cli import main
from moesim.cost import CostModel
from moesim.mapping import ExpertMapping
from moesim.models import get_model
from moesim.replica import ReplicaPolicy
from moesim.sim import SimConfig, simulate, workload_from_ids
from moesim.sim.fixed import (
    FixedCosts,
    allreduce_latency,
    alltoall_latency,
    from_overhead,
    load_fixed,
)
from moesim.sim.fixed import step_time as fixed_step_time
from moesim.topo import load_topology
from tests.sim.test_workload import random_ids, write_random_trace


def test_nccl_latency_terms() -> None:
    # one 8-GPU NVLink node: ring LL, 6.6 + 2·7·0.6 µs
    assert allreduce_latency(8, 8) == pytest.approx(15.0e-6)
    # 2 × 8: tree LL 6.8 + 2·(7·0.6 + 1·5.0) = 25.2 µs, what NCCL prints for 128 B on 2 H100 nodes (nccl#1453)
    assert allreduce_latency(16, 8) == pytest.approx(25.2e-6)
    assert allreduce_latency(64, 8) == pytest.approx((6.8 + 2 * (7 * 0.6 + 3 * 5.0)) * 1e-6)
    assert allreduce_latency(1, 8) == 0.0
    assert alltoall_latency(8, 8) == pytest.approx(7.2e-6) and alltoall_latency(16, 8) == pytest.approx(9.3e-6)


def _case(layout: str = "ep"):
    model = get_model("tiny")
    rng = np.random.default_rng(0)
    steps = np.array([32, 8, 8])
    ids = random_ids(rng, model.num_layers, int(steps.sum()), model.num_experts, model.top_k)
    topo = load_topology("dgx-h100:2")
    mapping = ExpertMapping.linear(model.num_layers, model.num_experts, topo.num_gpus, 1)
    cost = CostModel.roofline(model, topo.device)
    return model, ids, steps, topo, mapping, cost


@pytest.mark.parametrize("engine", ["analytic", "des"])
def test_graph_fixed_costs_add_what_they_say(engine) -> None:
    """ep: each dispatch and combine pays NCCL's all-to-all latency; each step one graph launch and the LM head."""
    model, ids, steps, topo, mapping, cost = _case()
    base = SimConfig(policy=ReplicaPolicy(gpus_per_node=8))
    wl = workload_from_ids(ids, steps, mapping, base)
    r0 = simulate(wl, topo, mapping, cost, model, base, engine=engine)
    fixed = FixedCosts()
    r1 = simulate(wl, topo, mapping, cost, model, replace(base, fixed=fixed), engine=engine)
    # LM head by hand: the busiest GPU's tokens, 2·T·H·V FLOPs vs H·V weights, at the roofline
    tok = wl.gpu_tokens[:, 0, :].max(axis=1)
    H, V = model.hidden_size, model.vocab_size
    lm = np.maximum(2 * tok * H * V / (0.6 * topo.device.peak_flops),
                    H * V * model.bytes_per_param / (0.8 * topo.device.hbm_bw)) + topo.device.kernel_launch
    per_step = fixed.graph_launch + lm
    np.testing.assert_allclose(r1.extra["fixed_time"], per_step, rtol=1e-12)
    expect = r0.step_time + per_step + 2 * model.num_layers * alltoall_latency(16, 8)
    np.testing.assert_allclose(r1.step_time, expect, rtol=1e-9 if engine == "analytic" else 0.02)


def test_eager_pays_host_launches_per_layer() -> None:
    model, ids, steps, topo, mapping, _ = _case()
    cfg = SimConfig(policy=ReplicaPolicy(gpus_per_node=8))
    wl = workload_from_ids(ids, steps, mapping, cfg)
    g = fixed_step_time(FixedCosts(cuda_graph=True), wl, model, topo.device)
    e = fixed_step_time(FixedCosts(cuda_graph=False, host_per_launch=8e-6, launches_per_layer=12), wl, model,
                        topo.device)
    np.testing.assert_allclose(e - g, model.num_layers * 12 * 8e-6 - FixedCosts().graph_launch, rtol=1e-12)


@pytest.mark.parametrize("engine", ["analytic", "des"])
def test_tp_allreduce_latency(engine) -> None:
    """tp: every MoE layer all-reduces attention and MoE outputs: two NCCL all-reduce latencies per layer."""
    model, ids, steps, topo, mapping, cost = _case()
    base = SimConfig(layout="tp", policy=ReplicaPolicy(gpus_per_node=8))
    wl = workload_from_ids(ids, steps, mapping, base)
    f = FixedCosts(lm_head=False, graph_launch=0.0)
    r0 = simulate(wl, topo, mapping, cost, model, base, engine=engine)
    r1 = simulate(wl, topo, mapping, cost, model, replace(base, fixed=f), engine=engine)
    np.testing.assert_allclose(r1.step_time - r0.step_time, 2 * model.num_layers * allreduce_latency(16, 8),
                               rtol=1e-9 if engine == "analytic" else 0.05)


def test_validate_overhead_fit_becomes_fixed_costs() -> None:
    """The per-step overhead validate fits, charged as fixed costs, gives exactly its own prediction."""
    model, ids, steps, topo, mapping, _ = _case()
    fit = OverheadFit({"prefill": (3e-3, 1e-6), "decode": (1e-3, 0.0), "all": (2e-3, 0.0)})
    phase = np.array([1, 0, 0], dtype=np.uint8)
    wl = workload_from_ids(ids, steps, mapping, SimConfig(), phase=phase)
    got = fixed_step_time(from_overhead(fit), wl, model, topo.device)
    np.testing.assert_allclose(got, fit.predict(["prefill", "decode", "decode"], steps), rtol=1e-12)
    np.testing.assert_allclose(got, [3e-3 + 32e-6, 1e-3, 1e-3], rtol=1e-12)


def test_fixed_json_round_trip_and_errors(tmp_path) -> None:
    f = FixedCosts(cuda_graph=False, sampling=2e-5, step_overhead={"decode": (1e-3, 2e-7)})
    path = tmp_path / "f.json"
    path.write_text(json.dumps(f.to_dict()))
    assert load_fixed(str(path)) == f
    assert load_fixed("none") is None and load_fixed("eager").cuda_graph is False
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**f.to_dict(), "mfu": 2.0}))
    with pytest.raises(Exception, match="mfu"):
        load_fixed(str(bad))
    with pytest.raises(Exception, match="--fixed"):
        load_fixed(str(tmp_path / "missing.json"))


def test_replay_fixed_flag(tmp_path, capsys) -> None:
    path = write_random_trace(tmp_path / "t.mtrace", get_model("tiny"), (32, 8), seed=2)
    lat = {}
    for fixed in ("none", "graph", "eager"):
        out = tmp_path / fixed
        assert main(["replay", "--trace", str(path), "--topology", "dgx-h100", "--fixed", fixed, "--out", str(out),
                     "--quiet", "--no-plots"]) == 0
        lat[fixed] = json.loads((out / "report.json").read_text())["summary"]
    key = next(k for k in lat["none"] if "latency" in k and "mean" in k)
    assert lat["none"][key] < lat["graph"][key] < lat["eager"][key]
    capsys.readouterr()
    rc = main(["replay", "--trace", str(path), "--topology", "dgx-h100", "--fixed", "warp", "--out",
               str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "--fixed" in err and err.count("\n") == 1
