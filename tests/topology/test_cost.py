"""Cost model: roofline shape, grouped execution, fits to synthetic and real timings, calibration files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moesim.cost import CostModel, _dense_tokens_from_timings, dense_tokens_from_trace
from moesim.errors import MoesimError
from moesim.models import PRESETS, get_model
from moesim.topo import DEVICES
from moesim.trace.reader import Timings

MIXTRAL = get_model("mixtral-8x7b")
H100 = DEVICES["h100"]


def test_zero_tokens_cost_nothing() -> None:
    c = CostModel.roofline(MIXTRAL, H100)
    assert c.expert_time(np.zeros(8)) == 0.0
    np.testing.assert_array_equal(c.expert_time(np.zeros((5, 3, 4))), np.zeros((5, 3)))
    assert c.dense_time(np.array(0)) == 0.0 and c.gate_time(np.array(0)) == 0.0


@given(a=st.integers(0, 20000), b=st.integers(0, 20000), w=st.integers(1, 8),
       model=st.sampled_from(["mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b", "tiny"]),
       device=st.sampled_from(["h100", "h200", "h800", "cpu"]))
def test_roofline_monotone_in_tokens(a: int, b: int, w: int, model: str, device: str) -> None:
    c = CostModel.roofline(get_model(model), DEVICES[device])
    lo, hi = min(a, b), max(a, b)
    t_lo = np.zeros(w)
    t_hi = np.zeros(w)
    t_lo[0], t_hi[0] = lo, hi
    assert c.expert_time(t_lo) <= c.expert_time(t_hi)
    assert c.dense_time(np.array(lo)) <= c.dense_time(np.array(hi))
    for ph in (0, 1):
        assert c.attention_time(np.array(lo), np.array(ph)) <= c.attention_time(np.array(hi), np.array(ph))


def test_memory_bound_then_compute_bound_mixtral_h100() -> None:
    """One Mixtral expert on an H100 (mfu = mbu = 1): time is flat (weights read) at small n and linear in n at
    large n; the knee sits at the ridge intensity peak_flops / hbm_bw ≈ 295 FLOP/byte ≈ 295 tokens per expert,
    because a SwiGLU expert does 2·3·H·F FLOPs per token on 3·H·F·2 bytes of weights: intensity ≈ n."""
    c = CostModel.roofline(MIXTRAL, H100, mfu=1.0, mbu=1.0)
    launch = H100.kernel_launch
    weights_s = MIXTRAL.expert_bytes / H100.hbm_bw  # 352 MB / 3.35 TB/s ≈ 105 µs
    t = lambda n: float(c.expert_time(np.array([n]))) - launch  # noqa: E731
    assert t(1) == pytest.approx(weights_s, rel=1e-3)  # memory-bound: a token costs the weight read
    assert t(16) == pytest.approx(weights_s, rel=0.01)
    flop_s = 2 * 3 * 4096 * 14336 / H100.peak_flops
    assert t(8192) == pytest.approx(8192 * flop_s, rel=1e-6)  # compute-bound: linear in tokens
    assert t(8192) / t(4096) == pytest.approx(2.0, rel=1e-6)
    ns = np.arange(1, 2000)
    times = np.array([t(n) for n in ns])
    knee = ns[np.argmax(ns * flop_s >= times - 1e-15)]
    ridge = H100.peak_flops / H100.hbm_bw
    assert 0.9 * ridge <= knee <= 1.1 * ridge, (knee, ridge)
    # default efficiencies move the knee to ridge * mfu / mbu
    d = CostModel.roofline(MIXTRAL, H100)
    e = d.expert
    assert 200 < e["bytes_per_expert"] / e["byte_rate"] / (e["flops_per_choice"] / e["flops_rate"]) < 240


def test_grouped_kernel_reads_each_used_expert_once_and_launches_once() -> None:
    c = CostModel.roofline(MIXTRAL, H100, mfu=1.0, mbu=1.0)
    one = float(c.expert_time(np.array([4, 0, 0, 0])))
    two = float(c.expert_time(np.array([2, 2, 0, 0])))
    w = MIXTRAL.expert_bytes / H100.hbm_bw
    assert two - one == pytest.approx(w, rel=1e-6)  # a second used expert adds its weight read, no launch
    sep = CostModel.roofline(MIXTRAL, H100, mfu=1.0, mbu=1.0, grouped=False)
    assert float(sep.expert_time(np.array([2, 2, 0, 0]))) == pytest.approx(two + H100.kernel_launch, rel=1e-9)
    # padding to BLOCK_M only adds compute
    pad = CostModel.roofline(MIXTRAL, H100, block_m=64)
    assert pad.expert_time(np.array([8000, 1])) >= CostModel.roofline(MIXTRAL, H100).expert_time(np.array([8000, 1]))


def test_dense_part_decode_reads_kv_prefill_amortises_it() -> None:
    c = CostModel.roofline(MIXTRAL, H100, context_len=4096)
    dec = float(c.attention_time(np.array(2048), np.array(0)))
    pre = float(c.attention_time(np.array(2048), np.array(1)))
    assert dec > pre  # decode reads each token's KV cache, prefill once per query tile
    assert c.dense_time(np.array(64)) == pytest.approx(c.attention_time(np.array(64)) + c.gate_time(np.array(64)))
    # sliding window caps the context (Mixtral 4096)
    assert CostModel.roofline(MIXTRAL, H100, context_len=100_000).info["context_len"] == 4096
    # DeepSeek-V3 MLA: the compressed KV cache (576 elements per token) keeps decode attention cheap
    ds = CostModel.roofline(get_model("deepseek-v3"), DEVICES["h800"])
    assert float(ds.attention_time(np.array(1))) < 1e-3


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip_every_model(name: str) -> None:
    c = CostModel.roofline(get_model(name), H100)
    d = json.loads(json.dumps(c.to_dict()))
    back = CostModel.from_dict(d)
    t = np.array([[0, 3, 100, 7], [5, 0, 0, 0]])
    np.testing.assert_array_equal(back.expert_time(t), c.expert_time(t))
    np.testing.assert_array_equal(back.dense_time(np.arange(5)), c.dense_time(np.arange(5)))


@pytest.mark.parametrize("bad", [None, {}, {"format": "moesim.cost-model", "version": 1},
                                 {"format": "moesim.cost-model", "version": 1, "expert": {"kind": "magic"},
                                  "attention": {"kind": "affine", "a": 0, "b": 0},
                                  "gate": {"kind": "affine", "a": 0, "b": 0}},
                                 {"format": "moesim.cost-model", "version": 1, "expert": {"kind": "table", "x": [2, 1],
                                                                                          "y": [1, 2]},
                                  "attention": {"kind": "affine", "a": 0, "b": 0},
                                  "gate": {"kind": "affine", "a": 0, "b": 0}}])
def test_from_dict_rejects(bad) -> None:
    with pytest.raises(MoesimError):
        CostModel.from_dict(bad)


@given(kv=st.lists(st.floats(0, 50_000), min_size=2, max_size=6), tokens=st.integers(1, 4096),
       model=st.sampled_from(["mixtral-8x7b", "deepseek-v3", "small"]))
def test_decode_attention_grows_with_the_kv_it_reads(kv, tokens, model) -> None:
    spec = get_model(model)
    c = CostModel.roofline(spec, H100, context_len=1024)
    kv_sorted = np.sort(np.array(kv))
    t = c.attention_time(np.full(len(kv), tokens), np.zeros(len(kv)), kv_sorted)
    assert np.all(np.diff(t) >= -1e-15)  # monotone in the KV length
    # the fixed context_len is what an unknown (NaN) kv_len means; a sliding window caps it
    same = c.attention_time(np.array([tokens, tokens]), np.array([0, 0]), np.array([np.nan, 1024.0]))
    assert same[0] == pytest.approx(same[1]) == pytest.approx(float(c.attention_time(np.array(tokens),
                                                                                      np.array(0))))
    if spec.sliding_window:
        at_window = c.attention_time(np.array(tokens), np.array(0), np.array(float(spec.sliding_window)))
        assert float(c.attention_time(np.array(tokens), np.array(0), np.array(1e9))) == pytest.approx(
            float(at_window))


def test_fit_learns_the_kv_term_where_kv_varies() -> None:
    rng = np.random.default_rng(3)
    n_rec = 80
    tm = _timings(n_rec, 3, 1e-4, 2e-6, 1e-5, 2e-4, 1e-7)
    kv = rng.integers(16, 400, n_rec).astype(float)
    attn = 2e-4 + 1e-7 * tm.dense_tok + 3e-9 * tm.dense_tok * kv
    tm.phases[:, 0] = attn
    model, report = CostModel.fit(tm, get_model("tiny"), dense_tokens=tm.dense_tok, kv_len=kv, piecewise=False)
    assert model.attention["d"] == pytest.approx(3e-9, rel=1e-3)
    assert "kv_len" in report["phases"]["attention"]["model"]
    np.testing.assert_allclose(model.attention_time(tm.dense_tok, None, kv), attn, rtol=1e-3)
    # prediction at an unknown kv uses the fit's typical kv; a constant kv is not identifiable: no d term
    assert model.attention_time(np.array(100.0), None, np.array(np.nan)) == pytest.approx(
        float(model.attention_time(np.array(100.0), None, np.array(model.attention["kv_ref"]))))
    flat, _ = CostModel.fit(tm, get_model("tiny"), dense_tokens=tm.dense_tok, kv_len=np.full(n_rec, 64.0))
    assert not flat.attention.get("d")
    with pytest.raises(MoesimError, match="one value per timing record"):
        CostModel.fit(tm, get_model("tiny"), dense_tokens=tm.dense_tok, kv_len=kv[:3])


def _timings(n_rec: int, seed: int, a: float, b: float, c: float, da: float, db: float, noise: float = 0.0
             ) -> Timings:
    rng = np.random.default_rng(seed)
    W = 4
    tokens = rng.integers(0, 40, size=(n_rec, W))
    tokens[rng.random((n_rec, W)) < 0.3] = 0
    tokens[0] = 0  # one idle record: left out of the fit
    index = np.stack([np.arange(n_rec) // 2, np.zeros(n_rec, int), np.arange(n_rec) % 2], axis=1)
    n, u = tokens.sum(1), (tokens > 0).sum(1)
    expert = np.where(n > 0, a + b * n + c * u, 0.0)
    dense_tok = rng.integers(1, 500, size=n_rec).astype(float)
    attn = da + db * dense_tok
    gate = 0.5 * da + 0.1 * db * dense_tok
    if noise:
        expert, attn, gate = (x * (1 + noise * rng.standard_normal(n_rec)) for x in (expert, attn, gate))
    phases = np.stack([attn, gate, np.full(n_rec, 1e-4), expert, np.full(n_rec, 1e-4)], axis=1)
    tm = Timings(("attention", "gate", "dispatch", "expert", "combine"), index, phases,
                 np.tile(np.arange(W), (n_rec, 1)), tokens)
    tm.dense_tok = dense_tok  # type: ignore[attr-defined]
    return tm


@given(a=st.floats(1e-6, 1e-3), b=st.floats(1e-8, 1e-5), c=st.floats(0.0, 1e-4), da=st.floats(1e-6, 1e-3),
       db=st.floats(1e-9, 1e-6), seed=st.integers(0, 1000))
def test_fit_recovers_known_coefficients(a, b, c, da, db, seed) -> None:
    tm = _timings(60, seed, a, b, c, da, db)
    model, report = CostModel.fit(tm, get_model("tiny"), dense_tokens=tm.dense_tok)
    e = model.expert
    assert e["a"] == pytest.approx(a, rel=1e-4, abs=1e-10)
    assert e["b"] == pytest.approx(b, rel=1e-4, abs=1e-12)
    assert e["c"] == pytest.approx(c, rel=1e-4, abs=1e-9)
    assert model.attention["a"] == pytest.approx(da, rel=1e-4) and model.attention["b"] == pytest.approx(db, rel=1e-4)
    assert model.gate["b"] == pytest.approx(0.1 * db, rel=1e-4)
    assert report["phases"]["expert"]["median_rel_error"] < 1e-6
    assert report["phases"]["expert"]["n"] == int((tm.tokens.sum(1) > 0).sum()) < 60  # idle records are left out
    np.testing.assert_allclose(model.expert_time(tm.tokens), tm.phase("expert"), rtol=1e-4, atol=1e-9)


def test_fit_with_noise_reports_its_error() -> None:
    tm = _timings(400, 1, 2e-4, 3e-6, 5e-5, 1e-4, 2e-7, noise=0.05)
    model, report = CostModel.fit(tm, get_model("tiny"), DEVICES["cpu"], dense_tokens=tm.dense_tok)
    for ph in ("expert", "attention", "gate"):
        r = report["phases"][ph]
        assert 0.01 < r["median_rel_error"] < 0.06 and r["p90_rel_error"] >= r["median_rel_error"]
    assert model.expert["b"] == pytest.approx(3e-6, rel=0.1)
    assert CostModel.from_dict(model.to_dict()).to_dict() == model.to_dict()


def test_fit_rejects_empty_timings() -> None:
    empty = Timings(("attention", "gate", "dispatch", "expert", "combine"), np.zeros((0, 3), int), np.zeros((0, 5)),
                    np.zeros((0, 0), int), np.zeros((0, 0), int))
    with pytest.raises(MoesimError, match="no timing records"):
        CostModel.fit(empty, get_model("tiny"))
    tm = _timings(10, 0, 1e-4, 1e-6, 0, 1e-4, 1e-7)
    tm.phase_names = ("a", "b", "c", "d", "e")
    with pytest.raises(MoesimError, match="attention"):
        CostModel.fit(tm, get_model("tiny"))


@pytest.mark.dist
@pytest.mark.slow
def test_fit_a_real_runtime_trace(tmp_path: Path) -> None:
    """Record 6 steps of the tiny model on 2 gloo ranks, fit the cost model to its timings."""
    pytest.importorskip("torch")
    if shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists():
        pytest.skip("torchrun is not installed")
    out = tmp_path / "rec"
    proc = subprocess.run([sys.executable, "-m", "moesim", "run", "--nproc", "2", "--preset", "tiny", "--steps", "6",
                           "--record", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from moesim.trace import Trace

    with Trace.open(out / "trace.mtrace") as trace:
        tm = trace.timings()
        model = trace.model
        exact = dense_tokens_from_trace(trace, tm)
        _, rep_trace = CostModel.fit_trace(trace, DEVICES["cpu"])
    # the runtime gives every rank the same batch: origins agree with the even split the plain fit assumes
    np.testing.assert_array_equal(exact, _dense_tokens_from_timings(tm, model))
    assert rep_trace["phases"]["attention"]["n"] == len(tm)
    assert len(tm) == 6 * model.num_layers * 2
    cost, report = CostModel.fit(tm, model, DEVICES["cpu"])
    for ph in ("expert", "attention", "gate"):
        r = report["phases"][ph]
        assert r["n"] > 0 and np.isfinite(r["median_rel_error"]) and r["p90_rel_error"] >= r["median_rel_error"]
    pred = cost.expert_time(tm.tokens)
    assert (pred[tm.tokens.sum(1) > 0] > 0).all()
    t = tm.phase("expert")
    ok = (tm.tokens.sum(1) > 0) & (t > 0)  # the records the fit scores (a choice and a positive time)
    assert report["phases"]["expert"]["n"] == int(ok.sum())
    assert np.median(np.abs(pred[ok] - t[ok]) / t[ok]) == pytest.approx(
        report["phases"]["expert"]["median_rel_error"], rel=1e-9)
    assert CostModel.from_dict(json.loads(json.dumps(cost.to_dict()))).to_dict() == cost.to_dict()


def _calibration(tmp_path: Path, entries: list[dict]) -> Path:
    f = tmp_path / "cal.json"
    f.write_text(json.dumps({"format": "moesim.kernel-calibration", "version": 1, "device": "NVIDIA H100 80GB HBM3",
                             "dtype": "bfloat16", "entries": entries}))
    return f


def test_from_calibration_interpolates_per_expert(tmp_path: Path) -> None:
    base = {"hidden_size": 4096, "ffn_size": 14336, "num_experts": 8, "top_k": 2}
    # 8 active experts; per-expert time 100 µs + 0.5 µs per choice
    entries = [{**base, "tokens": T, "seconds": 8 * (100e-6 + 0.5e-6 * T * 2 / 8), "active_experts": 8}
               for T in (16, 64, 256, 1024)]
    entries.append({**base, "hidden_size": 7168, "ffn_size": 2048, "tokens": 4, "seconds": 1e-4})  # other model
    c = CostModel.from_calibration(_calibration(tmp_path, entries), MIXTRAL, H100)
    assert c.expert["kind"] == "table" and c.info["points"] == 4
    assert float(c.expert_time(np.array([40, 0]))) == pytest.approx(100e-6 + 0.5e-6 * 40)
    assert float(c.expert_time(np.array([40, 40]))) == pytest.approx(2 * (100e-6 + 0.5e-6 * 40))
    assert float(c.expert_time(np.array([1000, 0]))) == pytest.approx(100e-6 + 0.5e-6 * 1000)  # extrapolated
    assert c.expert_time(np.zeros(3)) == 0
    assert c.attention["kind"] == "roofline"  # dense part from the device roofline
    np.testing.assert_allclose(CostModel.from_dict(c.to_dict()).expert_time(np.array([[3, 9]])),
                               c.expert_time(np.array([[3, 9]])))


def test_from_calibration_errors(tmp_path: Path) -> None:
    other = [{"hidden_size": 7168, "ffn_size": 2048, "num_experts": 256, "top_k": 8, "tokens": 4, "seconds": 1e-4}]
    # no entries for the model's shape: the expert kernel from the roofline at the file's efficiency curve
    c = CostModel.from_calibration(_calibration(tmp_path, other), MIXTRAL, H100)
    assert c.expert["kind"] == "roofline" and "eff_x" in c.expert and "no entries" in c.info["expert"]
    with pytest.raises(MoesimError, match="needs"):
        CostModel.from_calibration(_calibration(tmp_path, [{"tokens": 3}]), MIXTRAL, H100)
    bad = tmp_path / "x.json"
    bad.write_text('{"format": "other"}')
    with pytest.raises(MoesimError, match="kernel-calibration"):
        CostModel.from_calibration(bad, MIXTRAL, H100)
    with pytest.raises(MoesimError, match="does not exist"):
        CostModel.from_calibration(tmp_path / "nope.json", MIXTRAL, H100)


def test_piecewise_fit_finds_a_knee() -> None:
    """Memory-bound (flat) below 256 choices, compute-bound (linear) above: the hinge fit finds the knee and
    beats the plain affine fit; on affine data it stays affine."""
    rng = np.random.default_rng(3)
    N = 200
    tokens = np.zeros((N, 2), dtype=int)
    tokens[:, 0] = rng.integers(1, 2000, size=N)
    n = tokens.sum(1)
    t = 1e-4 + np.maximum(0, n - 256) * 2e-7
    dense = rng.integers(1, 2000, size=N).astype(float)
    phases = np.stack([1e-4 + 1e-7 * dense, 1e-5 + 1e-9 * dense, np.ones(N), t, np.ones(N)], axis=1)
    tm = Timings(("attention", "gate", "dispatch", "expert", "combine"), np.zeros((N, 3), int), phases,
                 np.zeros((N, 2), int), tokens)
    model, rep = CostModel.fit(tm, get_model("tiny"), dense_tokens=dense)
    r = rep["phases"]["expert"]
    assert r["form"] == "piecewise" and 150 <= r["coef"]["knot"] <= 400 and r["median_rel_error"] < 0.05
    _, aff = CostModel.fit(tm, get_model("tiny"), dense_tokens=dense, piecewise=False)
    assert aff["phases"]["expert"]["form"] == "affine"
    assert aff["phases"]["expert"]["p90_rel_error"] > 2 * r["p90_rel_error"]
    assert rep["phases"]["attention"]["form"] == "affine"  # affine data: no hinge
    assert CostModel.from_dict(model.to_dict()).expert_time(np.array([[1000, 0]])) == pytest.approx(
        model.expert_time(np.array([[1000, 0]])))
