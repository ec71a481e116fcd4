"""All-to-all backends (moesim.sim.comm): bytes, per-node de-duplication, hand-derived 2-node goldens per backend
in both engines, DeepEP's counts, `moesim comm` and `--comm` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.cli import main
from moesim.cost import CostModel
from moesim.mapping import ExpertMapping
from moesim.models import ModelSpec
from moesim.replica import ReplicaPolicy
from moesim.sim import SimConfig, simulate, workload_from_ids
from moesim.sim.comm import (
    BACKEND_PRESETS,
    deepep_counts,
    draw_routing,
    exchange_bytes,
    hierarchical_tokens,
    wire_bytes,
)
from moesim.sim.commbench import prepare_comm, price_comm
from moesim.topo import load_topology
from moesim.topo.presets import (
    H800_NVLINK_BW,
    IB_EDGE_LATENCY,
    IB_NDR_BW,
    NVLINK_EDGE_LATENCY,
    PCIE5_X16_BW,
    PCIE_EDGE_LATENCY,
)

H = 7168
FP8 = H + H // 128 * 4  # 7392: one fp32 scale per 128 values
BF16 = 2 * H


def _model(E: int, k: int) -> ModelSpec:
    return ModelSpec("t", num_layers=1, num_experts=E, top_k=k, hidden_size=H, ffn_size=64)


def _one_token(ids: list[int], E: int, comm: str, topo: str = "hgx-h800:2", dispatch: str | None = "fp8",
               combine: str | None = "bf16", engine: str = "analytic"):
    """One token on GPU 0 (T=1: origin 0) with the given choices; the exchange alone (no compute)."""
    topology = load_topology(topo)
    G = topology.num_gpus
    model = _model(E, len(ids))
    cfg = SimConfig(policy=ReplicaPolicy(gpus_per_node=topology.gpus_per_node), include_dense=False,
                    dense_layers=False, comm=comm, dispatch_dtype=dispatch, combine_dtype=combine)
    wl = workload_from_ids(np.array([[ids]]), np.array([1]), ExpertMapping.linear(1, E, G), cfg)
    wl.slot_tokens[...] = 0.0
    res = simulate(wl, topology, None, CostModel.roofline(model, topology.device), model, cfg, engine=engine)
    return res, wl, cfg, model


# -- precisions -----------------------------------------------------------------------------------------------
def test_wire_bytes_per_dtype() -> None:
    assert wire_bytes(7168, "bf16") == 14336
    assert wire_bytes(7168, "fp32") == 28672
    assert wire_bytes(7168, "fp8") == 7168 + 56 * 4  # 56 blocks of 128, one 4-byte scale each
    assert wire_bytes(100, "fp8") == 104  # a partial block still carries a scale
    assert wire_bytes(7168, "fp8") / wire_bytes(7168, "bf16") == pytest.approx((1 + 4 / 128) / 2)  # DeepEP's factor
    with pytest.raises(Exception, match="unknown dtype"):
        wire_bytes(8, "int4")


def test_exchange_bytes_are_messages_times_element_size() -> None:
    """Per-choice messages (low-latency) × (fp8 bytes + 16-byte header); combine the transpose in bf16."""
    _, wl, cfg, model = _one_token([18, 19, 2], 32, "low-latency")
    d, c = exchange_bytes(wl, model, cfg, 8)
    assert d[0, 0, 0, 9] == 2 * (FP8 + 16) and d[0, 0, 0, 1] == FP8 + 16
    assert c[0, 0, 9, 0] == 2 * BF16 and c[0, 0, 1, 0] == BF16
    assert d.sum() == 3 * (FP8 + 16) and c.sum() == 3 * BF16


def test_own_gpu_copies_are_free() -> None:
    """Choices on the token's own GPU move no byte and take no link time, in every backend."""
    for comm in ("flat", "hierarchical", "low-latency"):
        res, wl, cfg, model = _one_token([0, 1], 32, comm)  # experts 0 and 1 both live on GPU 0
        d, c = exchange_bytes(wl, model, cfg, 8)
        assert d.sum() == 0 and c.sum() == 0, comm
        assert res.bytes_intra.sum() == 0 and res.bytes_inter.sum() == 0
        lat = BACKEND_PRESETS[comm].dispatch_latency + BACKEND_PRESETS[comm].combine_latency
        assert res.step_time[0] == pytest.approx(lat, abs=1e-12), comm


# -- hand-derived goldens on two H800 nodes ---------------------------------------------------------------------
RAIL_LAT = 2 * PCIE_EDGE_LATENCY + 2 * IB_EDGE_LATENCY  # gpu -> nic -> leaf -> nic -> gpu, same rail: 2.2 µs
PXN_LAT = 2 * NVLINK_EDGE_LATENCY + RAIL_LAT  # NVLink hop to the destination's rail first: 3.2 µs


@pytest.mark.parametrize("engine", ["analytic", "des"])
def test_golden_flat_two_nodes(engine) -> None:
    """bf16 token on GPU 0 -> GPUs 9 and 10 (node 1): two copies, each over its own rail's NIC (rail-pxn)."""
    res, *_ = _one_token([9, 10], 16, "flat", dispatch=None, combine=None, engine=engine)
    b = 2 * H  # model bytes_per_param 2
    per = max(2 * b / H800_NVLINK_BW, b / PCIE5_X16_BW, b / IB_NDR_BW) + PXN_LAT
    # back: 9 -> 0 and 10 -> 0 both move to rail 0 (GPU 8) first and share its NIC
    back = max(2 * b / H800_NVLINK_BW, 2 * b / PCIE5_X16_BW, 2 * b / IB_NDR_BW) + PXN_LAT
    assert res.phase_time[0, 0, 2] == pytest.approx(per, rel=1e-3)
    assert res.step_time[0] == pytest.approx(per + back, rel=1e-3)
    assert res.bytes_inter.sum() == 4 * b  # two copies there, two back


@pytest.mark.parametrize("engine", ["analytic", "des"])
def test_golden_hierarchical_two_nodes(engine) -> None:
    """fp8 token on GPU 0 -> GPUs 9, 10: once over RDMA to GPU 8 (rail 0 of node 1), which forwards to 9 and 10
    over NVLink; streamed, so the slowest stage decides: RDMA 7392 B at 50 GB/s × rdma_eff, or GPU 8's NVLink
    out-link carrying 2 × 7392 B at 160 GB/s × nvlink_eff. Combine: the same in bf16, reversed."""
    spec = BACKEND_PRESETS["hierarchical"]
    res, wl, _, _ = _one_token([9, 10], 16, "hierarchical", engine=engine)
    assert wl.node_tokens[0, 0, 0].tolist() == [0.0, 1.0]  # one token for node 1, none for its own node

    def t(b: float) -> float:
        return max(b / (IB_NDR_BW * spec.rdma_eff), b / PCIE5_X16_BW, 2 * b / (H800_NVLINK_BW * spec.nvlink_eff))

    disp, comb = t(FP8) + RAIL_LAT, t(BF16) + RAIL_LAT
    assert res.step_time[0] == pytest.approx(disp + comb, rel=1e-3)
    if engine == "analytic":
        assert res.phase_time[0, 0, 2] == pytest.approx(disp, rel=1e-9)
        assert res.phase_time[0, 0, 4] == pytest.approx(comb, rel=1e-9)
    assert res.bytes_inter.sum() == FP8 + BF16  # once per node, each way
    assert res.bytes_intra.sum() == 2 * (FP8 + BF16)  # forwarded to 9 and 10, and reduced back


@pytest.mark.parametrize("engine", ["analytic", "des"])
def test_golden_low_latency_two_nodes(engine) -> None:
    """Experts 18, 19 on GPU 9 and 2 on GPU 1: three messages (no de-duplication), kernel latency on top."""
    spec = BACKEND_PRESETS["low-latency"]
    res, *_ = _one_token([18, 19, 2], 32, "low-latency", engine=engine)
    m = FP8 + 16
    # GPU 0's NVLink out-link carries all three; GPU 1 relays the two for GPU 9 to its NIC (rail-pxn)
    disp = spec.dispatch_latency + max(3 * m / H800_NVLINK_BW, 2 * m / PCIE5_X16_BW,
                                       2 * m / (IB_NDR_BW * spec.rdma_eff)) + PXN_LAT
    comb = spec.combine_latency + max(3 * BF16 / H800_NVLINK_BW, 2 * BF16 / PCIE5_X16_BW,
                                      2 * BF16 / (IB_NDR_BW * spec.rdma_eff)) + PXN_LAT
    assert res.step_time[0] == pytest.approx(disp + comb, rel=1e-3)
    assert res.phase_time[0, 0, 2] == pytest.approx(disp, rel=1e-3)
    assert res.bytes_inter.sum() == 2 * m + 2 * BF16


# -- per-node de-duplication against a brute-force count ---------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), P=st.sampled_from([1, 2, 4]), N=st.sampled_from([1, 2, 3]),
       T=st.integers(1, 60), k=st.integers(1, 4), steps=st.integers(1, 3))
def test_node_dedup_equals_brute_force(seed, P, N, T, k, steps) -> None:
    rng = np.random.default_rng(seed)
    G = P * N
    E = G * int(rng.integers(1, 4))
    k = min(k, E)
    tokens = rng.multinomial(T, np.ones(steps) / steps)
    ids = np.argsort(rng.random((1, T, E)), axis=2)[:, :, :k]
    cfg = SimConfig(policy=ReplicaPolicy(gpus_per_node=P), comm="hierarchical")
    wl = workload_from_ids(ids, tokens, ExpertMapping.linear(1, E, G), cfg)
    expect = np.zeros((steps, G, N))
    epg = E // G
    t = 0
    for s, n_tok in enumerate(tokens):
        for i in range(n_tok):
            origin = i * G // n_tok
            for node in {int(e) // epg // P for e in ids[0, t]}:
                expect[s, origin, node] += 1
            t += 1
    np.testing.assert_array_equal(wl.node_tokens[:, 0], expect)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), P=st.sampled_from([1, 2, 3]), N=st.sampled_from([1, 2, 3]))
def test_hierarchical_stages_equal_loops(seed, P, N) -> None:
    """The vectorised two-stage matrix equals the stage definitions written as loops."""
    rng = np.random.default_rng(seed)
    G = P * N
    send = rng.integers(0, 9, (G, G)).astype(float)
    nodes = rng.integers(0, 9, (G, N)).astype(float)
    expect = np.zeros((G, G))
    for o in range(G):
        for n in range(N):
            if n != o // P:
                expect[o, n * P + o % P] += nodes[o, n]  # RDMA to the same rail of node n
        for d in range(G):
            f = (d // P) * P + o % P  # forwarder: origin's rail in d's node (o itself in its own node)
            if f != d:
                expect[f, d] += send[o, d]
    np.testing.assert_array_equal(hierarchical_tokens(send, nodes, P), expect)


def test_deepep_counts_brute_force() -> None:
    rng = np.random.default_rng(3)
    G, P, E, T = 4, 2, 8, 6
    ids = draw_routing(rng, T * G, E, 3, num_groups=2, topk_groups=1)
    egpu = np.arange(E) // (E // G)
    c = deepep_counts(ids, egpu, P, G)
    recv, rdma = np.zeros(G), np.zeros(G)
    for t in range(T * G):
        gpus = {int(egpu[e]) for e in ids[t]}
        for g in gpus:
            recv[g] += 1
        rdma[t * G // (T * G)] += len({g // P for g in gpus})
        assert len({g // P for g in gpus}) == 1  # topk_groups=1: one node per token
    np.testing.assert_array_equal(c["rank_recv"], recv)
    np.testing.assert_array_equal(c["rdma_send"], rdma)
    np.testing.assert_array_equal(c["selections"], np.full(G, 3 * T))


# -- the engines agree; DeepEP's bandwidth -----------------------------------------------------------------------
@pytest.mark.parametrize("backend,tokens", [("hierarchical", 256), ("low-latency", 64), ("flat", 256)])
def test_engines_agree_on_one_exchange(backend, tokens) -> None:
    case = prepare_comm(load_topology("hgx-h800:2"), backend, tokens=tokens)
    a, d = price_comm(case), price_comm(case, engine="des")
    assert d["dispatch_us"] == pytest.approx(a["dispatch_us"], rel=0.1)
    assert d["combine_us"] == pytest.approx(a["combine_us"], rel=0.1)


def test_deepep_bandwidth_definition() -> None:
    """bandwidth × time = DeepEP's bytes: (token, node) pairs sent per rank × fp8 bytes across nodes."""
    case = prepare_comm(load_topology("hgx-h800:2"), "hierarchical", tokens=128)
    r = price_comm(case)
    assert r["bw_kind"] == "RDMA"
    assert r["dispatch_bw_gbs"] * r["dispatch_us"] * 1e3 == pytest.approx(case.per_rank.mean() * FP8)
    assert r["combine_bw_gbs"] * r["combine_us"] * 1e3 == pytest.approx(case.per_rank.mean() * BF16)
    assert 128 <= case.per_rank.mean() <= 2 * 128  # each token reaches 1 or 2 nodes


# -- command line -------------------------------------------------------------------------------------------------
def run(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_comm_json(capsys) -> None:
    rc, out, err = run(["comm", "--topology", "hgx-h800:2", "--backend", "hierarchical", "--tokens", "256",
                        "--topk-groups", "4", "--dispatch-dtype", "fp8", "--combine-dtype", "bf16", "--json"], capsys)
    assert rc == 0, err
    doc = json.loads(out)
    assert {"dispatch_us", "combine_us", "dispatch_bw_gbs", "combine_bw_gbs", "backend", "ep"} <= set(doc)
    assert doc["ep"] == 16 and doc["backend"] == "hierarchical" and doc["dispatch_message_bytes"] == FP8
    assert math.isfinite(doc["dispatch_us"]) and doc["dispatch_us"] > 0
    rc, out, err = run(["comm", "--topology", "hgx-h800", "--backend", "low-latency", "--tokens", "32",
                        "--engine", "des"], capsys)
    assert rc == 0, err
    assert "dispatch" in out and "GB/s (NVLink)" in out


@pytest.mark.parametrize("args,word", [
    (["--backend", "deepep"], "--backend"),
    (["--dispatch-dtype", "int4"], "--dispatch-dtype"),
    (["--combine-dtype", "e5m2"], "--combine-dtype"),
    (["--engine", "fast"], "--engine"),
    (["--experts", "100"], "--experts"),
    (["--tokens", "0"], "--tokens"),
    (["--topk-groups", "0"], "--topk-groups"),
    (["--top-k", "300"], "--top-k"),
])
def test_cli_comm_bad_flags_one_line(args, word, capsys) -> None:
    rc, _, err = run(["comm", "--topology", "hgx-h800:2", "--tokens", "8", *args], capsys)
    assert rc == 2 and err.count("\n") == 1 and word in err, err


def test_replay_with_comm_backends(tmp_path, capsys) -> None:
    from moesim.models import get_model
    from tests.sim.test_workload import write_random_trace

    path = write_random_trace(tmp_path / "t.mtrace", get_model("tiny"), (64, 16), seed=1)
    times = {}
    for comm in ("flat", "hierarchical", "low-latency"):
        out = tmp_path / comm
        rc, _, err = run(["replay", "--trace", str(path), "--topology", "dgx-h100:2", "--comm", comm,
                          "--dispatch-dtype", "fp8", "--out", str(out), "--quiet", "--no-plots"], capsys)
        assert rc == 0, err
        doc = json.loads((out / "report.json").read_text())
        assert doc["inputs"]["config"]["comm"] == comm and doc["inputs"]["config"]["dispatch_dtype"] == "fp8"
        times[comm] = doc["summary"]
    # low-latency pays its per-kernel latency on every layer: slower than flat on this tiny decode
    assert times["low-latency"]["bytes_inter_node"] > times["hierarchical"]["bytes_inter_node"]
    rc, _, err = run(["replay", "--trace", str(path), "--topology", "dgx-h100:2", "--comm", "nccl",
                      "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--comm" in err


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), P=st.sampled_from([1, 2, 4]), N=st.sampled_from([1, 2, 3]),
       k=st.integers(1, 6))
def test_load_only_node_estimate_between_gpu_bounds(seed, P, N, k) -> None:
    """Load-only workloads: a node receives at least what its busiest GPU does and at most what its GPUs do
    together (per-node de-duplication never sends more than per-GPU, never less than one GPU needs)."""
    from moesim.sim import workload_from_counts

    rng = np.random.default_rng(seed)
    G, E = P * N, P * N * 2
    k = min(k, E)
    tokens = np.array([int(rng.integers(1, 200)), int(rng.integers(1, 200))])
    counts = np.stack([rng.multinomial(t * k, rng.dirichlet(np.ones(E)))[None] for t in tokens]).astype(float)
    mapping = ExpertMapping.linear(1, E, G)
    hier = workload_from_counts(counts, tokens, mapping, SimConfig(policy=ReplicaPolicy(gpus_per_node=P),
                                                                   comm="hierarchical"), top_k=k)
    per_gpu = hier.send_tokens[:, 0, 0, :] * G  # [S, G] tokens each GPU receives from all origins
    per_node = hier.node_tokens[:, 0, 0, :] * G  # [S, N]
    by_node = per_gpu.reshape(2, N, P)
    assert np.all(per_node <= by_node.sum(axis=2) + 1e-9)
    assert np.all(per_node >= by_node.max(axis=2) - 1e-9)
