"""Analytic engine: a 2-GPU case computed by hand, EP vs TP byte formulas, contention, bytes conservation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.cost import CostModel
from moesim.errors import MoesimError
from moesim.mapping import ExpertMapping
from moesim.models import ModelSpec
from moesim.sim import simulate
from moesim.sim.analytic import comm_time, layout_cost, pairwise_half, run_analytic
from moesim.sim.config import SimConfig
from moesim.sim.workload import workload_from_ids
from moesim.topo import Topology, load_topology
from tests.sim.test_workload import cases

# Golden model: 1 MoE layer, 2 experts, top-1, hidden 500 in 2-byte params -> 1000 bytes per token on the wire.
GOLD = ModelSpec("golden", num_layers=1, num_experts=2, top_k=1, hidden_size=500, ffn_size=100,
                 num_attention_heads=4, num_kv_heads=4, head_dim=8)
US = 1e-6


def golden_cost() -> CostModel:
    """Round affine costs: expert kernel 10 µs + 1 µs per token-choice; attention 5 µs + 0.1 µs per token;
    gate 1 µs flat."""
    return CostModel({"kind": "affine", "a": 10 * US, "b": 1 * US, "c": 0.0},
                     {"kind": "affine", "a": 5 * US, "b": 0.1 * US}, {"kind": "affine", "a": 1 * US, "b": 0.0})


def golden_topology() -> Topology:
    """Two GPUs on one switch, 1 GB/s per link each way, 1 µs GPU -> GPU (0.5 µs per hop)."""
    return Topology.flat(2, 1e9, 1 * US, "cpu")


# One step of 4 tokens; linear mapping: expert 0 on GPU 0, expert 1 on GPU 1.
# Origins: contiguous halves, tokens 0,1 on GPU 0 and 2,3 on GPU 1. Choices: t0->e0, t1->e1, t2->e1, t3->e1.
GOLD_IDS = np.array([[[0], [1], [1], [1]]])
GOLD_STEP = np.array([4])


def test_golden_two_gpus_ep() -> None:
    """By hand (layout ep):
    slot tokens: GPU 0 computes 1 choice (t0), GPU 1 computes 3 (t1, t2, t3).
    send [src, dst] = [[1, 1], [0, 2]]: only t1 crosses, GPU 0 -> GPU 1, 1000 bytes.
    dense: each GPU has 2 tokens: attention 5 + 0.1·2 = 5.2 µs, gate 1 µs            -> 6.2 µs
    dispatch: 1000 B over the gpu0->switch link at 1 GB/s = 1 µs, + 1 µs latency      -> 2 µs
    expert: max(10 + 1·1, 10 + 1·3) = 13 µs
    combine: t1's output back, GPU 1 -> GPU 0, same as the dispatch                   -> 2 µs
    step = 6.2 + 2 + 13 + 2 = 23.2 µs; bytes intra-node 2000 (1000 each way), inter 0.
    busy: GPU 0 = 6.2 + 11 = 17.2 µs, GPU 1 = 6.2 + 13 = 19.2 µs; busiest/mean load = 3 / 2 = 1.5;
    tokens/s = 4 / 23.2 µs; MoE share = (2 + 13 + 2) / 23.2.
    """
    mapping = ExpertMapping.linear(1, 2, 2)
    cfg = SimConfig()
    wl = workload_from_ids(GOLD_IDS, GOLD_STEP, mapping, cfg)
    np.testing.assert_array_equal(wl.send_tokens[0, 0], [[1, 1], [0, 2]])
    topo = golden_topology()
    r = run_analytic(wl, topo, golden_cost(), GOLD, cfg)
    np.testing.assert_allclose(r.phase_time[0, 0], [5.2 * US, 1 * US, 2 * US, 13 * US, 2 * US], rtol=1e-12)
    np.testing.assert_allclose(r.step_time, [23.2 * US], rtol=1e-12)
    np.testing.assert_allclose(r.gpu_busy[0], [17.2 * US, 19.2 * US], rtol=1e-12)
    np.testing.assert_allclose(r.moe_time[0], [11 * US, 13 * US], rtol=1e-12)
    np.testing.assert_allclose([r.bytes_intra[0], r.bytes_inter[0]], [2000, 0])
    np.testing.assert_array_equal(r.gpu_load, [[1, 3]])
    s = r.summary(topo)
    assert s["busiest_gpu_over_mean_load"] == pytest.approx(1.5)
    assert s["tokens_per_s"] == pytest.approx(4 / (23.2 * US))
    assert s["moe_share"] == pytest.approx(17 / 23.2)
    assert s["bytes_intra_node_per_token"] == pytest.approx(500)
    # each link carries 1000 bytes (gpu0->switch and switch->gpu1 one way, the reverse pair the other)
    assert s["busiest_link_bytes"] == pytest.approx(1000)
    assert s["busiest_link_utilisation"] == pytest.approx(1000 / (1e9 * 23.2 * US))


def test_golden_two_gpus_tp() -> None:
    """By hand (layout tp): each GPU holds half of both experts and computes half of every choice.
    expert (affine a + b·n + c·used, n = 4 choices / 2 = 2 shard-choices): 10 + 1·2 = 12 µs on each GPU.
    dense: attention sharded, fed 4/2 = 2 token-equivalents: 5.2 µs; gate replicated (flat 1 µs) -> 6.2 µs.
    all-reduce of 4 tokens × 1000 B = 4000 B: two halves, each GPU sends 2000 B to the other:
    2000 B / 1 GB/s + 1 µs = 3 µs per half, 6 µs per all-reduce; one after attention, one after the experts.
    step = (6.2 + 6) + 12 + 6 = 30.2 µs. Bytes: 4 halves × 2 GPUs × 2000 B = 16000 B
    (= 2 all-reduces × G GPUs × 2·(G-1)/G·T·H·bytes).
    """
    mapping = ExpertMapping.linear(1, 2, 2)
    cfg = SimConfig(layout="tp")
    wl = workload_from_ids(GOLD_IDS, GOLD_STEP, mapping, cfg)
    np.testing.assert_allclose(wl.slot_tokens[0, 0], [0.5, 1.5, 0.5, 1.5])
    r = simulate(wl, golden_topology(), mapping, golden_cost(), GOLD, cfg)
    np.testing.assert_allclose(r.phase_time[0, 0], [11.2 * US, 1 * US, 0, 12 * US, 6 * US], rtol=1e-12)
    np.testing.assert_allclose(r.step_time, [30.2 * US], rtol=1e-12)
    assert r.bytes_intra[0] == pytest.approx(16000)


def test_golden_ep_tp_attn() -> None:
    """ep-tp-attn: experts as in ep (13 µs busiest), no dispatch, attention all-reduce 6 µs, combine 6 µs:
    step = 6.2 + 6 + 0 + 13 + 6 = 31.2 µs."""
    mapping = ExpertMapping.linear(1, 2, 2)
    cfg = SimConfig(layout="ep-tp-attn")
    wl = workload_from_ids(GOLD_IDS, GOLD_STEP, mapping, cfg)
    r = simulate(wl, golden_topology(), mapping, golden_cost(), GOLD, cfg)
    np.testing.assert_allclose(r.step_time, [31.2 * US], rtol=1e-12)
    np.testing.assert_allclose(r.phase_time[0, 0, 2], 0.0)


def test_overlap_and_no_dense() -> None:
    mapping = ExpertMapping.linear(1, 2, 2)
    wl = workload_from_ids(GOLD_IDS, GOLD_STEP, mapping, SimConfig())
    r = run_analytic(wl, golden_topology(), golden_cost(), GOLD, SimConfig(overlap_comm=True))
    np.testing.assert_allclose(r.step_time, [19.2 * US])  # max(6.2 + 13, 2 + 2)
    np.testing.assert_allclose(r.phase_time.sum(), r.step_time.sum())
    r = run_analytic(wl, golden_topology(), golden_cost(), GOLD, SimConfig(include_dense=False))
    np.testing.assert_allclose(r.step_time, [17 * US])


def test_dense_layers_charged() -> None:
    model = GOLD.with_(num_dense_layers=3, dense_ffn_size=200)
    mapping = ExpertMapping.linear(1, 2, 2)
    wl = workload_from_ids(GOLD_IDS, GOLD_STEP, mapping, SimConfig())
    r = run_analytic(wl, golden_topology(), golden_cost(), model, SimConfig())
    # per dense layer: 6.2 µs attention + gate, FFN = (10 + 1·2 tokens) µs × 200/100 = 24 µs -> 30.2 µs
    np.testing.assert_allclose(r.step_time, [23.2 * US + 3 * 30.2 * US], rtol=1e-12)
    r0 = run_analytic(wl, golden_topology(), golden_cost(), model, SimConfig(dense_layers=False))
    np.testing.assert_allclose(r0.step_time, [23.2 * US])


def test_comm_time_busiest_link() -> None:
    """Two flows into one GPU share its downlink: time = their bytes / bandwidth (+ latency)."""
    topo = Topology.flat(3, 1e9, 1 * US, "cpu")
    b = np.zeros((3, 3))
    b[0, 2] = b[1, 2] = 1e6
    assert comm_time(topo, b) == pytest.approx(2e6 / 1e9 + US)
    b2 = np.zeros((3, 3))
    b2[0, 1] = b2[1, 2] = 1e6  # disjoint links: no contention
    assert comm_time(topo, b2) == pytest.approx(1e6 / 1e9 + US)
    assert comm_time(topo, np.eye(3) * 5) == 0.0  # the diagonal stays local
    np.testing.assert_allclose(comm_time(topo, np.stack([b, b2])), [2e-3 + US, 1e-3 + US])


def test_ep_vs_tp_bytes_formulas() -> None:
    """ep moves 2 × (off-GPU token-choices) × token bytes; tp moves 2 all-reduces × G × 2(G-1)/G × T × tb."""
    rng = np.random.default_rng(3)
    model = GOLD.with_(num_layers=2, num_experts=8, top_k=2)
    G, T = 4, 64
    ids = np.argsort(rng.random((2, T, 8)), axis=2)[:, :, :2]
    mapping = ExpertMapping.linear(2, 8, G)
    topo = Topology.flat(G, 1e9, US, "cpu")
    cost = golden_cost()
    ep = SimConfig(dedup=False)
    wl = workload_from_ids(ids, np.array([T]), mapping, ep)
    r = run_analytic(wl, topo, cost, model, ep)
    off = wl.send_tokens * (1 - np.eye(G))
    assert r.bytes_intra[0] == pytest.approx(2 * off.sum() * model.token_bytes)
    tp = SimConfig(layout="tp")
    r = simulate(workload_from_ids(ids, np.array([T]), mapping, tp), topo, mapping, cost, model, tp)
    assert r.bytes_intra[0] == pytest.approx(2 * 2 * G * 2 * (G - 1) / G * T * model.token_bytes)
    tp_no_dense = SimConfig(layout="tp", include_dense=False)
    r = simulate(workload_from_ids(ids, np.array([T]), mapping, tp_no_dense), topo, mapping, cost, model,
                 tp_no_dense)
    assert r.bytes_intra[0] == pytest.approx(2 * G * 2 * (G - 1) / G * T * model.token_bytes)
    np.testing.assert_allclose(pairwise_half(np.array(8.0), 4).sum(), 8.0 * 3 / 4 * 4)


@settings(max_examples=25, deadline=None)
@given(cases(), st.sampled_from(["ep", "ep-tp-attn", "tp"]))
def test_bytes_conserved(case, layout) -> None:
    """Bytes leaving GPUs = intra + inter node bytes; every byte crosses each link of its route once."""
    mapping, ids, st_, origin, policy = case
    G = mapping.num_gpus
    model = GOLD.with_(num_layers=ids.shape[0], num_experts=mapping.num_experts, top_k=ids.shape[2])
    topo = Topology.flat(G, 1e9, US, "cpu")
    cfg = SimConfig(layout=layout, policy=policy)
    wl = workload_from_ids(ids, st_, mapping, cfg, origin)
    r = simulate(wl, topo, mapping, golden_cost(), model, cfg)
    tb = model.token_bytes
    off = (wl.send_tokens * (1 - np.eye(G))).sum(axis=(1, 2, 3)) * tb
    if layout == "ep":
        expected = 2 * off
    else:
        # 4 pairwise halves per layer (attention and MoE all-reduce): each GPU sends T·tb/G to G-1 others
        expected = off + 4 * wl.num_layers * st_ * tb * (G - 1) if G > 1 else off
    np.testing.assert_allclose(r.bytes_intra + r.bytes_inter, expected, rtol=1e-9, atol=1e-6)
    # on the flat topology every GPU pair's route is 2 links (up to the switch, down to the destination)
    assert r.link_bytes.sum() == pytest.approx(2 * float(np.sum(expected)) if G > 1 else 0.0)
    assert np.all(r.step_time >= 0) and np.all(np.isfinite(r.step_time))
    np.testing.assert_allclose(r.phase_time.sum(axis=(1, 2)), r.step_time, rtol=1e-12)


def test_layout_cost_idempotent_and_ep_unchanged() -> None:
    c = CostModel.roofline(GOLD, load_topology("dgx-h100").device)
    assert layout_cost(c, "ep", 8) is c
    t = layout_cost(c, "tp", 8)
    assert layout_cost(t, "tp", 8) is t
    with pytest.raises(MoesimError):
        layout_cost(t, "ep-tp-attn", 8)
    # a TP shard of every expert on 8 GPUs, fed 1/8 of the choices, is faster than the whole expert
    x = np.array([[64.0, 0.0]])
    assert t.expert_time(x / 8)[0] < c.expert_time(x)[0]


def test_mismatches() -> None:
    mapping = ExpertMapping.linear(1, 2, 2)
    wl = workload_from_ids(GOLD_IDS, GOLD_STEP, mapping, SimConfig())
    with pytest.raises(MoesimError, match="GPUs"):
        run_analytic(wl, Topology.flat(4, 1e9, US, "cpu"), golden_cost(), GOLD, SimConfig())
    with pytest.raises(MoesimError, match="layout"):
        run_analytic(wl, golden_topology(), golden_cost(), GOLD, SimConfig(layout="tp"))
    with pytest.raises(MoesimError, match="engine"):
        simulate(wl, golden_topology(), mapping, golden_cost(), GOLD, engine="warp")


def test_transposed_exchange_and_link_bytes() -> None:
    """The combine's reverse pricing equals pricing the transposed matrix; link bytes follow the routes."""
    from moesim.sim.analytic import _comm

    topo = load_topology("dgx-h100:2")
    G = topo.num_gpus
    b = np.random.default_rng(0).random((3, G, G)) * 1e6
    b[0, :, 5] = 0.0  # an asymmetric pattern
    t, link, intra, inter = _comm(topo, b, transpose=True)
    t2, link2, intra2, inter2 = _comm(topo, np.swapaxes(b, 1, 2).copy())
    np.testing.assert_allclose(t, t2)
    np.testing.assert_allclose(link, link2)
    np.testing.assert_allclose(intra + inter, intra2 + inter2)
    np.testing.assert_allclose(link2, topo.link_load(b.swapaxes(1, 2)).sum(axis=0))
    off = b * (1 - np.eye(G))
    np.testing.assert_allclose(intra2 + inter2, off.sum(axis=(1, 2)))
    plat = topo.path_latency()
    bw = topo.edge_bw
    want = [(topo.link_load(m.T) / bw).max() + plat[m.T > 0].max() for m in off]
    np.testing.assert_allclose(t, want)
