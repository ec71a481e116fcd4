"""Fast paths of the simulator equal the straightforward computations they replace (random inputs)."""

from __future__ import annotations

from unittest import mock

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import moesim.sim.workload as wmod
from moesim.cost import CostModel
from moesim.mapping import ExpertMapping
from moesim.models import get_model
from moesim.sim.analytic import run_analytic
from moesim.sim.config import SimConfig
from moesim.sim.workload import Workload, workload_from_counts, workload_from_ids
from moesim.topo import load_topology
from tests.sim.test_workload import cases, naive_workload


@settings(max_examples=30, deadline=None)
@given(cases(), st.booleans())
def test_ep_two_bincount_path_matches_reference(case, dedup) -> None:
    """With the combined (step, origin, slot) bincount switched off, the per-layer two-bincount path gives the
    token-by-token reference too (test_workload checks the combined path, which small cases take)."""
    mapping, ids, st_, origin, policy = case
    with mock.patch.object(wmod, "_COMBINED_BINS_PER_CHOICE", 0), mock.patch.object(wmod, "_COMBINED_MIN_BINS", 0):
        wl = workload_from_ids(ids, st_, mapping, SimConfig(policy=policy, dedup=dedup), origin)
    slot_tokens, send = naive_workload(ids, st_, mapping, policy, origin, dedup)
    np.testing.assert_array_equal(wl.slot_tokens, slot_tokens)
    np.testing.assert_array_equal(wl.send_tokens, send)


def _materialised(wl: Workload) -> Workload:
    """The same workload with every array a plain writable copy (no broadcast axes)."""
    return Workload(np.array(wl.step_tokens), np.array(wl.phase), np.array(wl.slot_tokens),
                    np.array(wl.send_tokens), np.array(wl.gpu_tokens), wl.first_step, wl.layout)


def _assert_same(a, b) -> None:
    for f in ("step_time", "phase_time", "gpu_busy", "moe_time", "bytes_intra", "bytes_inter", "link_bytes",
              "gpu_load"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-12, atol=0, err_msg=f)
    ga, gb = a.extra["gpu_phase_times"], b.extra["gpu_phase_times"]
    for key in ("attention", "gate", "expert", "phase_time"):
        np.testing.assert_allclose(ga[key], gb[key], rtol=1e-12, atol=0, err_msg=key)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["dgx-h100", "dgx-h100:2", "hgx-h800:2"]),
       st.sampled_from(["ep", "ep-tp-attn"]), st.booleans(), st.booleans(), st.integers(0, 1))
def test_broadcast_workloads_price_like_plain_arrays(seed, topo, layout, dedup, overlap, extra) -> None:
    """Load-only workloads hold send_tokens as a source-broadcast view and gpu_tokens broadcast over layers; the
    analytic engine prices those axes once. Same results as on materialised copies (plain [.., G, G] products)."""
    rng = np.random.default_rng(seed)
    model = get_model("mixtral-8x7b").with_(num_layers=3)
    topology = load_topology(topo)
    G, L, E = topology.num_gpus, model.num_layers, model.num_experts
    mapping = ExpertMapping.round_robin(L, E, G, -(-E // G) + extra)
    S = int(rng.integers(1, 5))
    st_ = rng.integers(0, 500, S)
    counts = rng.multinomial(1000, rng.dirichlet(np.ones(E)), size=(S, L)).astype(float) * (st_ > 0)[:, None, None]
    cfg = SimConfig(layout=layout, dedup=dedup, overlap_comm=overlap)
    wl = workload_from_counts(counts, st_, mapping, cfg, top_k=model.top_k)
    if layout == "ep":
        assert wl.send_tokens.strides[-2] == 0  # the fast path is really taken
    cost = CostModel.roofline(model, topology.device)
    _assert_same(run_analytic(wl, topology, cost, model, cfg), run_analytic(_materialised(wl), topology, cost, model,
                                                                             cfg))


def _expert_reference(p: dict, t: np.ndarray) -> np.ndarray:
    """The grouped roofline as first written: totals over the GPU's slots, max(compute, memory) + launch."""
    t = np.maximum(np.asarray(t, dtype=float), 0.0)
    bm = int(p.get("block_m", 1))
    n = t.sum(axis=-1)
    u = np.count_nonzero(t, axis=-1)
    padded = (np.ceil(t / bm) * bm).sum(axis=-1) if bm > 1 else n
    busy = np.maximum(padded * (p["flops_per_choice"] / p["flops_rate"]),
                      u * (p["bytes_per_expert"] / p["byte_rate"]) + n * (p["bytes_per_choice"] / p["byte_rate"]))
    return np.where(n > 0, busy + p["launch"], 0.0)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(5,), (3, 4), (2, 3, 17), (4, 1), (2, 2, 16)]),
       st.sampled_from([1, 16]))
def test_expert_roofline_matches_reference(seed, shape, block_m) -> None:
    rng = np.random.default_rng(seed)
    model = get_model("deepseek-v3")
    cost = CostModel.roofline(model, load_topology("dgx-h100").device, block_m=block_m)
    t = rng.integers(-2, 50, size=shape).astype(float) * (rng.random(shape) < 0.7)
    got = cost.expert_time(t)
    want = _expert_reference(cost.expert, t)
    assert np.shape(got) == np.shape(want)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)


def test_transfer_routes_checked_equals_checked_path() -> None:
    """The DES's unchecked flow start gives the same flows and arrivals as the checked public call."""
    import simpy

    from moesim.sim.network import FlowNetwork

    table = np.array([[0, 1], [0, 2], [3, -1]])
    out = []
    for checked in (False, True):
        env = simpy.Environment()
        net = FlowNetwork(env, [1e9, 2e9, 1e9, 5e8], [1e-6, 1e-6, 2e-6, 0.0])
        net.set_routes(table)
        gid, ev = net.group(3)
        rows, nb, grp = np.array([0, 1, 2]), np.array([1e3, 4e3, 2e3]), np.full(3, gid, dtype=np.int64)
        net.transfer_routes(rows, nb, grp, checked=checked) if checked else net.transfer_routes([0, 1, 2], nb, gid)
        env.run(until=ev)
        out.append((env.now, net.flow_record()))
    assert out[0][0] == out[1][0]
    for key in ("requested", "delivered", "start", "end"):
        np.testing.assert_array_equal(out[0][1][key], out[1][1][key])


def test_des_rejects_negative_send_once() -> None:
    import pytest

    from moesim.errors import MoesimError
    from moesim.sim.des import run_des

    model = get_model("mixtral-8x7b").with_(num_layers=1)
    topology = load_topology("dgx-h100")
    mapping = ExpertMapping.linear(1, model.num_experts, 8)
    wl = _materialised(workload_from_counts(np.full((1, 1, 8), 10.0), np.array([10]), mapping, SimConfig()))
    wl.send_tokens[0, 0, 0, 1] = -1.0
    with pytest.raises(MoesimError, match="non-negative"):
        run_des(wl, topology, CostModel.roofline(model, topology.device), model, SimConfig())
