"""``robust`` placement: its objective over windows, the fitted-balance constraint, the replica cap, windows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from moesim.placement import gpu_loads, imbalance, place
from moesim.placement.base import cap_violations
from moesim.placement.robust import split_windows


def _per_layer_imbalance(load: np.ndarray, mapping) -> np.ndarray:
    gl = gpu_loads(load, mapping)
    mean = gl.mean(axis=1)
    return np.where(mean > 0, gl.max(axis=1) / np.where(mean > 0, mean, 1), 1.0)


def test_replicas_go_where_load_is_uncertain():
    """Pooled, all four experts are equal and greedy replicates experts 0 and 1 (ties: lowest id); but experts 2
    and 3 are the ones whose load swings between the windows. robust replicates those: both windows balanced."""
    w = np.array([[[6.0, 6, 12, 0]], [[6.0, 6, 0, 12]]])  # [2 windows, 1 layer, 4 experts]
    pooled = w.sum(axis=0)
    g = place(pooled, "greedy", num_gpus=2, num_slots=6).mapping
    r = place(pooled, "robust", num_gpus=2, num_slots=6, windows=w)
    assert [imbalance(w[k], g) for k in range(2)] == [1.5, 1.5]
    assert [imbalance(w[k], r.mapping) for k in range(2)] == [1.0, 1.0]
    assert r.mapping.logcnt[0].tolist() == [1, 1, 2, 2] and r.info["imbalance"] == 1.0


@st.composite
def window_sets(draw):
    G = draw(st.sampled_from([2, 4, 8]))
    E = draw(st.integers(2, 12))
    S = -(-E // G) + draw(st.integers(0, 2))
    assume(G * S <= E * G)
    L = draw(st.integers(1, 2))
    W = draw(st.integers(2, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["drift", "one-hot", "zero-layer"]))
    base = rng.integers(1, 100, (L, E)).astype(float)
    wins = np.stack([np.round(base * rng.lognormal(0, 0.8, (L, E))) for _ in range(W)])
    if kind == "one-hot":
        wins = np.zeros((W, L, E))
        wins[:, :, rng.integers(0, E)] = 100.0
    elif kind == "zero-layer":
        wins[:, rng.integers(0, L)] = 0.0
    return wins, G, G * S


@settings(max_examples=30, deadline=None)
@given(window_sets())
def test_robust_keeps_cap_and_fitted_constraint_and_never_loses_to_greedy_on_its_objective(inst):
    wins, G, N = inst
    pooled = wins.sum(axis=0)
    r = place(pooled, "robust", num_gpus=G, num_slots=N, windows=wins, delta=0.05)
    g = place(pooled, "greedy", num_gpus=G, num_slots=N).mapping
    assert cap_violations(r.mapping) == 0 and r.mapping.logcnt.max() <= G and r.info["cap_repaired_layers"] == 0
    # fitted (pooled) busiest/mean within δ of greedy's, layer by layer
    assert np.all(_per_layer_imbalance(pooled, r.mapping) <= _per_layer_imbalance(pooled, g) + 0.05 + 1e-6)
    if r.info["objective"] is not None:  # the blend over windows: robust starts from greedy and only improves
        assert r.info["objective"] <= r.info["objective_greedy"] + 1e-9
    assert place(pooled, "robust", num_gpus=G, num_slots=N, windows=wins, delta=0.05).mapping == r.mapping


def test_without_windows_robust_is_greedy():
    load = np.random.default_rng(1).integers(0, 100, (3, 16)).astype(float)
    r = place(load, "robust", num_gpus=4, num_slots=24)
    assert r.mapping == place(load, "greedy", num_gpus=4, num_slots=24).mapping and r.info["windows"] == 0


@given(st.integers(1, 12), st.integers(1, 9), st.integers(0, 2**16))
def test_split_windows_conserves_load(T, W, seed):
    steps = np.random.default_rng(seed).integers(0, 5, (T, 2, 3)).astype(float)
    out = split_windows(steps, W)
    assert out.shape[1:] == (2, 3) and 1 <= len(out) <= min(T, W)
    assert np.allclose(out.sum(axis=0), steps.sum(axis=0))


def test_bad_robust_requests():
    from moesim.placement import PlacementError

    load = np.ones((1, 4))
    with pytest.raises(PlacementError, match="windows have shape"):
        place(load, "robust", num_gpus=2, num_slots=4, windows=np.ones((2, 1, 5)))
    with pytest.raises(PlacementError, match="beta"):
        place(load, "robust", num_gpus=2, num_slots=4, windows=np.ones((2, 1, 4)), beta=2.0)
    with pytest.raises(PlacementError, match="non-negative"):
        place(load, "robust", num_gpus=2, num_slots=4, windows=-np.ones((2, 1, 4)))


def test_rebalance_default_is_robust_on_the_window_steps(tmp_path):
    """replay_with_rebalance's default algorithm is robust, given the window's steps (not only their sum)."""
    from moesim.cost import CostModel
    from moesim.mapping import ExpertMapping
    from moesim.models import get_model
    from moesim.placement.rebalance import replay_with_rebalance
    from moesim.topo import load_topology
    from moesim.trace.synth import SynthConfig, synthesize

    model = get_model("tiny-deepseek")
    trace = synthesize(model, SynthConfig(steps=8, tokens=64, prefill_steps=1, num_ranks=8, seed=1, drift=0.3),
                       tmp_path / "t.mtrace")
    from moesim.trace import Trace

    tr = Trace.open(trace)
    topo = load_topology("dgx-h100")
    init = ExpertMapping.linear(model.num_layers, model.num_experts, 8, -(-model.num_experts // 8) + 1)
    res, sched = replay_with_rebalance(tr, topo, CostModel.roofline(model, topo.device), model, init,
                                       "periodic:interval=4,window=4")
    assert res.extra["rebalance"]["algo"] == "robust" and sched
    assert all(cap_violations(s.mapping) == 0 for s in sched)
