"""SendCells: per-token ep workloads of many GPUs carry send_tokens summed per (GPU, node-local rank, same/other
node); the analytic engine prices the flat all-to-all from them where the topology's links split so."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.cost import CostModel
from moesim.mapping import ExpertMapping
from moesim.models import get_model
from moesim.replica import ReplicaPolicy
from moesim.sim import SimConfig
from moesim.sim import cells as cmod
from moesim.sim import workload as wmod
from moesim.sim.analytic import _cell_split, _tables, run_analytic
from moesim.sim.workload import LazySend, Workload, policy_tables, workload_from_ids
from moesim.topo import load_topology


def _ids(rng: np.random.Generator, L: int, T: int, E: int, k: int) -> np.ndarray:
    """[L, T, k] distinct experts per token, skewed towards low ids."""
    p = 1.0 / np.arange(1, E + 1)
    p /= p.sum()
    return np.stack([np.stack([rng.choice(E, k, replace=False, p=p) for _ in range(T)]) for _ in range(L)])


def _cells_of(send: np.ndarray, P: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference SendCells of send [S, L, G, G], pair by pair (the definition in SendCells' docstring)."""
    S, L, G, _ = send.shape
    src, dst = np.zeros((S, L, G, 2 * P)), np.zeros((S, L, G, 2 * P))
    for s in range(G):
        for d in range(G):
            inter = int(s // P != d // P)
            src[:, :, s, inter * P + d % P] += send[:, :, s, d]
            dst[:, :, d, inter * P + s % P] += send[:, :, s, d]
    return src, dst


def _pair(ids, st_, mapping, config, origin=None):
    a = workload_from_ids(ids, st_, mapping, config, origin, cells=True)
    b = workload_from_ids(ids, st_, mapping, config, origin, cells=False)
    return a, b


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), nodes=st.sampled_from([2, 3]), spg=st.integers(1, 3), k=st.integers(1, 4),
       dedup=st.booleans(), policy=st.sampled_from(["position", "vllm", "local"]), jit=st.booleans())
def test_cells_equal_the_pairs_summed(seed, nodes, spg, k, dedup, policy, jit):
    """Cells = the dense per-pair counts summed per cell; slot_tokens and the lazy send_tokens = the dense path's;
    the compiled and the numpy counts agree (every choice counted once; de-duplicated ones once per GPU)."""
    before = cmod.cells_kernel()
    cmod._CELLS_KERNEL = before if jit else False
    try:
        _check_cells(seed, nodes, spg, k, dedup, policy)
    finally:
        cmod._CELLS_KERNEL = before


def _check_cells(seed: int, nodes: int, spg: int, k: int, dedup: bool, policy: str) -> None:
    rng = np.random.default_rng(seed)
    P, G, L, E = 8, 8 * nodes, 2, 8 * nodes
    steps = np.array([int(x) for x in rng.integers(0, 40, size=3)])
    ids = _ids(rng, L, int(steps.sum()), E, k)
    origin = rng.integers(0, G, size=int(steps.sum()))
    mapping = ExpertMapping.linear(L, E, G, spg)
    config = SimConfig(dedup=dedup, policy=ReplicaPolicy(policy, P))
    a, b = _pair(ids, steps, mapping, config, origin)
    assert a.cells is not None and b.cells is None and isinstance(a._send, LazySend)
    np.testing.assert_array_equal(a.slot_tokens, b.slot_tokens)
    src, dst = _cells_of(b.send_tokens, P)
    np.testing.assert_array_equal(a.cells.src, src)
    np.testing.assert_array_equal(a.cells.dst, dst)
    assert a.cells.src.sum() == b.send_tokens.sum()
    np.testing.assert_array_equal(a.send_tokens, b.send_tokens)  # computed on first access


def test_cells_by_default_only_when_pairs_outnumber_choices():
    rng = np.random.default_rng(0)
    G, L, E, k = 32, 2, 32, 4
    mapping = ExpertMapping.linear(L, E, G, 1)
    few = workload_from_ids(_ids(rng, L, 64, E, k), np.array([64]), mapping)  # 1024 pairs > 256 choices
    many = workload_from_ids(_ids(rng, L, 2048, E, k), np.array([2048]), mapping)  # 1024 pairs, 8192 choices
    assert few.cells is not None and many.cells is None
    assert wmod._CELLS_PAIRS_FACTOR_NUMPY <= wmod._CELLS_PAIRS_FACTOR < 8
    one_node = ExpertMapping.linear(L, 8, 8, 1)  # cells of one node are the pairs themselves
    assert workload_from_ids(_ids(rng, L, 4, 8, k), np.array([4]), one_node).cells is None
    tp = workload_from_ids(_ids(rng, L, 64, E, k), np.array([64]), mapping, SimConfig(layout="ep-tp-attn"))
    ll = workload_from_ids(_ids(rng, L, 64, E, k), np.array([64]), mapping, SimConfig(comm="low-latency"))
    assert tp.cells is None and ll.cells is None


@pytest.mark.parametrize("topo_name", ["dgx-h100:4", "hgx-h800:3,nics=4", "pcie-8gpu:2"])
@pytest.mark.parametrize("overlap", [False, True])
def test_engine_prices_cells_as_the_pairs(topo_name, overlap):
    """The analytic engine gives the same results (to round-off) from the cells as from the G² pairs."""
    topo = load_topology(topo_name)
    G = topo.num_gpus
    assert _tables(topo).cell_t is not None  # rails: these presets split into cells
    model = get_model("deepseek-v3").with_(num_layers=3)
    rng = np.random.default_rng(1)
    steps = np.array([3 * G, 0, G // 2])
    ids = _ids(rng, 3, int(steps.sum()), model.num_experts, model.top_k)
    mapping = ExpertMapping.linear(3, model.num_experts, G, -(-model.num_experts // G) + 1)
    config = SimConfig(overlap_comm=overlap)
    a, b = _pair(ids, steps, mapping, config)
    cost = CostModel.roofline(model, topo.device)
    ra, rb = run_analytic(a, topo, cost, model, config), run_analytic(b, topo, cost, model, config)
    assert isinstance(a._send, LazySend)  # the engine never needed the pairs
    for key in ("step_time", "phase_time", "link_bytes", "bytes_intra", "bytes_inter", "gpu_busy"):
        got, want = np.asarray(getattr(ra, key)), np.asarray(getattr(rb, key))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * max(np.abs(want).max(), 1.0), err_msg=key)
    assert rb.phase_time[..., 2].max() > 0 and rb.bytes_inter.sum() > 0


def test_engine_falls_back_to_pairs_when_node_sizes_differ():
    """Cells of 4-GPU nodes on a topology of 8-GPU nodes: the engine prices send_tokens (computed then)."""
    topo = load_topology("dgx-h100:2")
    model = get_model("mixtral-8x7b").with_(num_layers=2)
    rng = np.random.default_rng(2)
    ids = _ids(rng, 2, 24, model.num_experts, model.top_k)
    mapping = ExpertMapping.linear(2, model.num_experts, 16, 1)
    config = SimConfig(policy=ReplicaPolicy("position", 4))
    a, b = _pair(ids, np.array([24]), mapping, config)
    assert a.cells.gpus_per_node == 4
    cost = CostModel.roofline(model, topo.device)
    ra, rb = run_analytic(a, topo, cost, model, config), run_analytic(b, topo, cost, model, config)
    assert isinstance(a._send, np.ndarray)  # computed for the engine
    np.testing.assert_allclose(ra.step_time, rb.step_time, rtol=1e-12)
    np.testing.assert_allclose(ra.link_bytes, rb.link_bytes, rtol=1e-12)


def test_cell_split_reproduces_the_pair_products():
    """vec(B) @ m == src(B) @ ms + dst(B) @ md for random B (the routing columns and the link columns)."""
    topo = load_topology("dgx-h100:3")
    G, P = topo.num_gpus, 8
    R = topo.routing_matrix().tocsr()
    split = _cell_split(R, G, P)
    assert split is not None
    ms, md = split
    B = np.random.default_rng(3).random((1, 1, G, G))
    src, dst = _cells_of(B, P)
    want = B.reshape(-1) @ R
    got = src.reshape(-1) @ ms + dst.reshape(-1) @ md
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_cell_split_refuses_columns_of_no_side():
    """A column carrying one inter-node pair but not the other pairs of its source or destination cell (3 nodes:
    two pairs per inter-node cell) does not split; with the whole source cell it does, onto the source side."""
    G, P = 24, 8

    def col(pairs):
        return sp.csr_matrix((np.ones(len(pairs)), (np.array([s * G + d for s, d in pairs]), np.zeros(len(pairs),
                                                                                                       int))),
                             shape=(G * G, 1))

    assert _cell_split(col([(1, 9)]), G, P) is None
    ms, md = _cell_split(col([(1, 9), (1, 17)]), G, P)
    assert ms.nnz == 1 and md.nnz == 0 and ms[1 * 2 * P + P + 1, 0] == 1.0
    ms, md = _cell_split(col([(1, 9), (17, 9)]), G, P)  # the destination cell of GPU 9 from local rank 1
    assert ms.nnz == 0 and md.nnz == 1 and md[9 * 2 * P + P + 1, 0] == 1.0


def test_window_and_concat_keep_cells_and_lazy_pairs():
    rng = np.random.default_rng(4)
    G, L, E, k = 16, 2, 16, 2
    mapping = ExpertMapping.linear(L, E, G, 1)
    steps = np.array([10, 6, 9, 7])
    ids = _ids(rng, L, int(steps.sum()), E, k)
    a, b = _pair(ids, steps, mapping, SimConfig())
    w = a.window(1, 3)
    assert isinstance(w._send, LazySend) and w.num_gpus == G and w.num_steps == 2
    np.testing.assert_array_equal(w.cells.src, a.cells.src[1:3])
    np.testing.assert_array_equal(w.send_tokens, b.send_tokens[1:3])
    both = Workload.concat([a.window(0, 2), a.window(2, 4)])
    np.testing.assert_array_equal(both.cells.dst, a.cells.dst)
    np.testing.assert_array_equal(both.send_tokens, b.send_tokens)
    mixed = Workload.concat([a.window(0, 2), b.window(2, 4)])
    assert mixed.cells is None
    np.testing.assert_array_equal(mixed.send_tokens, b.send_tokens)


def test_shared_tables_are_the_policys():
    """policy_tables gives shared policies' tables as broadcast views: the same values as the policy's copies."""
    mapping = ExpertMapping.linear(3, 20, 8, 3)
    for policy in (ReplicaPolicy("position"), ReplicaPolicy("vllm"), ReplicaPolicy("local", 4)):
        t, c = policy_tables(policy, mapping)
        want_t, want_c = policy.all_tables(mapping)
        np.testing.assert_array_equal(t, want_t)
        np.testing.assert_array_equal(c, want_c)


def test_replay_cli_same_report_from_cells_and_pairs(tmp_path, monkeypatch, capsys):
    """`moesim replay` of a 32-GPU DeepSeek-V3 trace with 4 tokens per GPU: the cells path is taken and its
    steps.csv and link bytes equal those of the pairs path (cells switched off)."""
    import json

    from moesim.cli import main
    from moesim.trace import TraceWriter

    model = get_model("deepseek-v3")
    G, T = 32, 128
    rng = np.random.default_rng(5)
    path = tmp_path / "t.mtrace"
    with TraceWriter(path, model, origin=True, num_ranks=G) as w:
        for _ in range(2):
            w.add_step(_ids(rng, model.num_layers, T, model.num_experts, model.top_k),
                       origin=np.arange(T) * G // T, phase="decode")
    built = []

    class Spy(wmod.SendCellCounter):
        def __init__(self, *a, **kw):
            built.append(1)
            super().__init__(*a, **kw)

    monkeypatch.setattr(wmod, "SendCellCounter", Spy)
    outs = {}
    for name, factor in (("cells", wmod._CELLS_PAIRS_FACTOR), ("pairs", 0.0)):
        monkeypatch.setattr(wmod, "_CELLS_PAIRS_FACTOR", factor)
        monkeypatch.setattr(wmod, "_CELLS_PAIRS_FACTOR_NUMPY", factor)
        rc = main(["replay", "--trace", str(path), "--topology", "dgx-h100:4", "--engine", "analytic",
                   "--layout", "ep", "--out", str(tmp_path / name)])
        assert rc == 0, capsys.readouterr().err
        outs[name] = tmp_path / name
        assert len(built) == 1  # the cells run built SendCells once, the pairs run none
    a, b = (json.loads((outs[n] / "report.json").read_text()) for n in ("cells", "pairs"))
    assert a["summary"]["steps"] == 2 and a["summary"].keys() == b["summary"].keys()
    for key, v in a["summary"].items():
        if isinstance(v, float):
            np.testing.assert_allclose(v, b["summary"][key], rtol=1e-9, err_msg=key)
    sa, sb = ((outs[n] / "steps.csv").read_text().splitlines() for n in ("cells", "pairs"))
    assert len(sa) == len(sb) == 3
    for la, lb in zip(sa[1:], sb[1:]):
        fa, fb = la.split(","), lb.split(",")
        for x, y in zip(fa, fb):
            try:
                np.testing.assert_allclose(float(x), float(y), rtol=1e-9)
            except ValueError:
                assert x == y
