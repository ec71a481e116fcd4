"""Discrete-event engine: a 2-GPU case checked by hand, agreement with the analytic engine where nothing
contends, stragglers from imbalance, determinism, conservation of bytes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.cost import CostModel
from moesim.errors import MoesimError
from moesim.mapping import ExpertMapping
from moesim.models import get_model
from moesim.sim.analytic import run_analytic
from moesim.sim.config import SimConfig
from moesim.sim.des import PHASES, run_des
from moesim.sim.workload import Workload, workload_from_counts
from moesim.topo import DEVICES, Topology, load_topology

# 4096 hidden, bf16: 8192 bytes per token on the wire
MODEL = get_model("tiny").with_(hidden_size=4096)
TB = MODEL.token_bytes
BW = 100e9  # bytes/s per GPU link, each way
LAT = 1e-6  # s, GPU -> GPU


def affine_cost(attn=10e-6, gate=1e-6, a=5e-6, b=1e-7, c=0.0) -> CostModel:
    """attention = attn, gate = gate (per layer, any token count > 0); experts = a + b·choices + c·experts used."""
    return CostModel({"kind": "affine", "a": a, "b": b, "c": c}, {"kind": "affine", "a": attn, "b": 0.0},
                     {"kind": "affine", "a": gate, "b": 0.0})


def workload(slot_tokens, send_tokens, gpu_tokens, step_tokens=None) -> Workload:
    slot = np.asarray(slot_tokens, dtype=float)
    S = slot.shape[0]
    gpu = np.asarray(gpu_tokens, dtype=float)
    st_ = np.asarray(step_tokens if step_tokens is not None else gpu.sum(axis=-1)[:, 0], dtype=float)
    return Workload(step_tokens=st_, phase=np.zeros(S, dtype=np.uint8), slot_tokens=slot,
                    send_tokens=np.asarray(send_tokens, dtype=float), gpu_tokens=gpu, first_step=0)


def flat(G: int) -> Topology:
    return Topology.flat(G, BW, LAT, device="h100")


def two_gpu_case(load1: float):
    """1 step, 1 layer, 2 GPUs, one slot each. Each GPU holds 100 tokens, keeps 50 and sends 50 to the other."""
    return workload(slot_tokens=[[[100.0, load1]]], send_tokens=[[[[50.0, 50.0], [50.0, 50.0]]]],
                    gpu_tokens=[[[100.0, 100.0]]])


def test_two_gpus_by_hand():
    topo = flat(2)
    lat = float(topo.path_latency()[0, 1])
    comm = 50 * TB / BW + lat  # 409600 B at 100 GB/s = 4.096 us, plus the path latency
    # attention 10 + gate 1 + dispatch comm + experts (5 + 100·0.1 = 15) + combine comm
    expect = 11e-6 + comm + 15e-6 + comm
    res = run_des(two_gpu_case(100.0), topo, affine_cost(), MODEL, SimConfig(), quantum=0.0)
    assert res.step_time[0] == pytest.approx(expect, rel=1e-9)
    assert res.phase_time[0, 0].sum() == pytest.approx(expect, rel=1e-9)
    assert res.phase_time[0, 0, PHASES.index("expert")] == pytest.approx(15e-6, rel=1e-9)
    assert res.phase_time[0, 0, PHASES.index("dispatch")] == pytest.approx(comm, rel=1e-9)
    assert res.gpu_busy[0] == pytest.approx([26e-6, 26e-6])
    assert res.moe_time[0] == pytest.approx([15e-6, 15e-6])
    # 50 tokens each way, dispatch and combine: 4 · 50 · 8192 bytes, all inside the node
    assert res.bytes_intra[0] == pytest.approx(4 * 50 * TB)
    assert res.bytes_inter[0] == 0
    assert res.link_bytes.sum() == pytest.approx(4 * 50 * TB * len(topo.route(0, 1)))
    assert res.gpu_load.tolist() == [[100.0, 100.0]]
    names = {e[1] for e in res.extra["events"]}
    assert {"attention", "gate", "dispatch", "expert", "combine"} <= names


def test_straggler_decides_the_layer():
    # GPU1's slot gets 300 choices: its experts take 5 + 30 = 35 us. GPU0 must wait for GPU1's combine;
    # GPU1 finishes when its experts end (GPU0's combine bytes arrived long before).
    topo = flat(2)
    comm = 50 * TB / BW + float(topo.path_latency()[0, 1])
    res = run_des(two_gpu_case(300.0), topo, affine_cost(), MODEL, SimConfig(), quantum=0.0)
    finish = res.extra["gpu_finish"][0]
    assert finish[0] == pytest.approx(11e-6 + comm + 35e-6 + comm, rel=1e-9)
    assert finish[1] == pytest.approx(11e-6 + comm + 35e-6, rel=1e-9)
    assert res.step_time[0] == pytest.approx(finish.max(), rel=1e-9)
    gpu1 = [e for e in res.extra["events"] if e[0] == 1 and e[1] == "expert"]
    assert gpu1[0][3] - gpu1[0][2] == pytest.approx(35e-6)
    # the straggler's expert phase shows in the layer's critical path
    assert res.phase_time[0, 0, PHASES.index("expert")] > 30e-6


def _balanced(G: int, L: int, S: int, per: np.ndarray, send: np.ndarray, W: int) -> Workload:
    """Every GPU alike: per [S, L, W] choices per local slot, send [S, L] tokens to each other GPU."""
    slot = np.tile(per, (1, 1, G))
    eye = np.eye(G, dtype=bool)
    sm = np.where(eye, 0.0, 1.0)[None, None] * send[:, :, None, None]
    tokens = send * (G - 1) + 10.0
    sm = sm + eye[None, None] * 10.0
    return workload(slot, sm, np.broadcast_to(tokens[:, :, None], (S, L, G)), step_tokens=tokens[:, 0] * G)


@given(G=st.sampled_from([1, 2]), L=st.integers(1, 3), S=st.integers(1, 2), W=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_agrees_with_analytic_without_contention(G, L, S, W, seed):
    rng = np.random.default_rng(seed)
    per = rng.integers(0, 400, size=(S, L, W)).astype(float)
    send = rng.integers(0, 300, size=(S, L)).astype(float) if G > 1 else np.zeros((S, L))
    wl = _balanced(G, L, S, per, send, W)
    topo, cost, config = flat(G), CostModel.roofline(MODEL, flat(G).device), SimConfig()
    a = run_analytic(wl, topo, cost, MODEL, config)
    d = run_des(wl, topo, cost, MODEL, config)
    np.testing.assert_allclose(d.step_time, a.step_time, rtol=0.03)
    np.testing.assert_allclose(d.bytes_intra, a.bytes_intra, rtol=1e-9)
    np.testing.assert_allclose(d.link_bytes, a.link_bytes, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(d.moe_time, a.moe_time, rtol=1e-9)
    np.testing.assert_allclose(d.gpu_load, a.gpu_load)


def _random_wl(G: int, L: int, S: int, W: int, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    send = rng.integers(0, 50, size=(S, L, G, G)).astype(float)
    slot = rng.integers(0, 200, size=(S, L, G * W)).astype(float)
    return workload(slot, send, send.sum(axis=-1))


def test_deterministic_and_conserves_bytes():
    G = 8
    wl = _random_wl(G, 3, 2, 2, 1)
    topo = flat(G)
    cost = CostModel.roofline(MODEL, topo.device)
    r1 = run_des(wl, topo, cost, MODEL, SimConfig())
    r2 = run_des(wl, topo, cost, MODEL, SimConfig())
    assert np.array_equal(r1.step_time, r2.step_time)
    assert np.array_equal(r1.phase_time, r2.phase_time)
    assert r1.extra["events"] == r2.extra["events"]
    # every dispatched byte (off the diagonal) crosses its route, and comes back on the reverse pair's route
    off = wl.send_tokens * (1 - np.eye(G))
    tot = off.sum(axis=(0, 1)) * TB
    expect = topo.link_load(tot) + topo.link_load(tot.T)
    np.testing.assert_allclose(r1.link_bytes, expect, rtol=1e-9)
    assert r1.bytes_intra.sum() == pytest.approx(2 * off.sum() * TB)
    # phases add up to the step time
    np.testing.assert_allclose(r1.phase_time.sum(axis=(1, 2)), r1.step_time, rtol=1e-9)


def test_contention_makes_the_des_no_faster_than_its_busiest_link():
    # all 7 GPUs send to GPU 0: its downlink carries 7 flows at once
    G = 8
    send = np.zeros((1, 1, G, G))
    send[0, 0, 1:, 0] = 100.0
    wl = workload(np.full((1, 1, G), 10.0), send, np.full((1, 1, G), 100.0))
    topo = flat(G)
    res = run_des(wl, topo, affine_cost(), MODEL, SimConfig(include_dense=False), quantum=0.0)
    disp = 7 * 100 * TB / BW + float(topo.path_latency()[1, 0])
    assert res.phase_time[0, 0, PHASES.index("dispatch")] == pytest.approx(disp, rel=1e-6)


def test_event_cap_and_progress():
    wl = _random_wl(4, 2, 3, 1, 2)
    seen = []
    res = run_des(wl, flat(4), affine_cost(), MODEL, SimConfig(), progress=lambda i, n: seen.append((i, n)),
                  max_events=5)
    assert len(res.extra["events"]) == 5 and res.extra["events_dropped"] > 0
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_mismatched_topology_is_an_error():
    with pytest.raises(MoesimError, match="GPUs"):
        run_des(_random_wl(4, 1, 1, 1, 0), flat(8), affine_cost(), MODEL, SimConfig())


@pytest.mark.parametrize("layout", ["ep", "ep-tp-attn", "tp"])
@pytest.mark.parametrize("include_dense", [True, False])
@pytest.mark.parametrize("dense_layers", [0, 2])
def test_layouts_agree_with_analytic_on_two_gpus(layout, include_dense, dense_layers):
    # balanced load on 2 GPUs: every link carries one flow at a time, so the engines must agree
    model = MODEL.with_(num_dense_layers=dense_layers, dense_ffn_size=512)
    counts = np.full((2, model.num_layers, model.num_experts), 40.0)
    counts[1] *= 3
    mapping = ExpertMapping.linear(model.num_layers, model.num_experts, 2)
    config = SimConfig(layout=layout, include_dense=include_dense)
    wl = workload_from_counts(counts, np.array([160, 480]), mapping, config)
    topo = flat(2)
    cost = CostModel.roofline(model, topo.device)
    a = run_analytic(wl, topo, cost, model, config)
    d = run_des(wl, topo, cost, model, config, quantum=0.0)
    np.testing.assert_allclose(d.step_time, a.step_time, rtol=0.03)
    np.testing.assert_allclose(d.phase_time.sum(axis=(1, 2)) + d.extra["dense_layer_time"], d.step_time, rtol=1e-9)
    np.testing.assert_allclose(d.extra["dense_layer_time"], a.extra["dense_layer_time"], rtol=0.03)
    np.testing.assert_allclose(d.bytes_intra, a.bytes_intra, rtol=1e-9)
    np.testing.assert_allclose(d.link_bytes, a.link_bytes, rtol=1e-9)
    np.testing.assert_allclose(d.gpu_busy, a.gpu_busy, rtol=1e-9)
    np.testing.assert_allclose(d.moe_time, a.moe_time, rtol=1e-9)


def test_overlap_runs_two_micro_batches():
    G = 4
    wl = _random_wl(G, 2, 1, 2, 5)
    topo = flat(G)
    cost = CostModel.roofline(MODEL, topo.device)
    seq = run_des(wl, topo, cost, MODEL, SimConfig())
    ovl = run_des(wl, topo, cost, MODEL, SimConfig(overlap_comm=True))
    assert ovl.extra["micro_batches"] == 2
    assert any(name.endswith("/mb1") for _, name, _, _ in ovl.extra["events"])
    np.testing.assert_allclose(ovl.phase_time.sum(axis=(1, 2)), ovl.step_time, rtol=1e-9)
    # the same bytes move and the same compute is done; each GPU's compute stream runs one micro-batch at a time
    np.testing.assert_allclose(ovl.link_bytes, seq.link_bytes, rtol=1e-9)
    np.testing.assert_allclose(ovl.gpu_busy, seq.gpu_busy, rtol=1e-9)
    assert ovl.step_time[0] <= seq.step_time[0] * 1.001
    for g in range(G):
        spans = sorted((a, b) for gg, n, a, b in ovl.extra["events"]
                       if gg == g and n.split("/")[0] in ("attention", "gate", "expert"))
        assert all(b1 <= a2 + 1e-15 for (_, b1), (a2, _) in itertools.pairwise(spans))


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), layout=st.sampled_from(["ep", "tp"]), overlap=st.booleans())
def test_step_time_bounds_on_a_two_node_cluster(seed, layout, overlap):
    # never faster than the busiest GPU's compute, nor than the busiest link's bytes at full bandwidth
    topo = load_topology("dgx-h100:2")
    G = topo.num_gpus
    rng = np.random.default_rng(seed)
    counts = rng.gamma(0.5, 40.0, size=(1, MODEL.num_layers, MODEL.num_experts))
    mapping = ExpertMapping.linear(MODEL.num_layers, MODEL.num_experts, G, slots_per_gpu=1)
    config = SimConfig(layout=layout, overlap_comm=overlap)
    wl = workload_from_counts(counts, np.array([counts[0, 0].sum() / MODEL.top_k]), mapping, config)
    res = run_des(wl, topo, CostModel.roofline(MODEL, topo.device), MODEL, config)
    assert res.step_time[0] >= res.gpu_busy[0].max() * (1 - 1e-9)
    assert res.step_time[0] >= (res.link_bytes / topo.edge_bw).max() * (1 - 1e-6)
    np.testing.assert_allclose(res.phase_time.sum() + res.extra["dense_layer_time"].sum(), res.step_time.sum(),
                               rtol=1e-9)


def test_both_engines_charge_decode_attention_by_the_kv_length_each_step_reads():
    """A trace's kv_len reaches the cost model in both engines: longer KV, slower step, by the same amount."""
    base = two_gpu_case(100.0)
    wl = Workload.concat([base, base, base])
    wl = Workload(wl.step_tokens, wl.phase, wl.slot_tokens, wl.send_tokens, wl.gpu_tokens, 0, "ep",
                  np.array([100.0, 10_000.0, np.nan]))
    cost = CostModel.roofline(MODEL, DEVICES["h100"], context_len=100)
    topo = flat(2)
    a = run_analytic(wl, topo, cost, MODEL, SimConfig())
    d = run_des(wl, topo, cost, MODEL, SimConfig(), quantum=0.0)
    assert a.step_time[1] > a.step_time[0] == pytest.approx(a.step_time[2])  # NaN: the model's context_len
    np.testing.assert_allclose(d.step_time, a.step_time, rtol=1e-9)
    extra = cost.attention_time(np.array(100.0), np.array(0), np.array(10_000.0)) - cost.attention_time(
        np.array(100.0), np.array(0), np.array(100.0))
    assert a.step_time[1] - a.step_time[0] == pytest.approx(wl.num_layers * float(extra), rel=1e-6)
    assert wl.window(1, 3).kv_len.tolist()[0] == 10_000.0
