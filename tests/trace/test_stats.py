"""trace_stats: the definitions hold on hand-made traces."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.models import get_model
from moesim.trace import Trace, TraceWriter
from moesim.trace.stats import coactivation, cross_layer, entropy, imbalance, jsonable, trace_stats
from moesim.trace.synth import SynthConfig, synthesize

TINY = get_model("tiny")  # 2 layers, 8 experts, top-2


def _trace(tmp_path, steps) -> Trace:
    path = tmp_path / "t.mtrace"
    with TraceWriter(path, TINY) as w:
        for ids in steps:
            w.add_step(np.asarray(ids))
    return Trace.open(path)


@given(load=st.lists(st.integers(0, 1000), min_size=8, max_size=8))
@settings(max_examples=40, deadline=None)
def test_imbalance_and_entropy_bounds(load):
    a = np.array(load)
    r, h = float(imbalance(a)), float(entropy(a))
    if a.sum():
        assert 1 - 1e-12 <= r <= 8 + 1e-9 and -1e-12 <= h <= 1 + 1e-12
    assert imbalance(np.full(8, 5)) == 1 and np.isclose(entropy(np.full(8, 5)), 1)
    assert imbalance(np.eye(8)[0]) == 8 and entropy(np.eye(8)[0]) == 0


def test_stats_on_a_known_trace(tmp_path):
    # step 0: every token picks experts (0, 1) in layer 0 and (2, 3) in layer 1; step 1: (4, 5) / (6, 7)
    s0 = np.broadcast_to(np.array([[0, 1], [2, 3]])[:, None, :], (2, 10, 2))
    s1 = np.broadcast_to(np.array([[4, 5], [6, 7]])[:, None, :], (2, 6, 2))
    with _trace(tmp_path, [s0, s1]) as trace:
        st_ = trace_stats(trace, windows=2)
        assert st_["steps"] == 2 and st_["tokens"] == 16
        assert np.array_equal(st_["choices_per_layer"], [32, 32])
        assert np.array_equal(st_["load"][0], [10, 10, 0, 0, 6, 6, 0, 0])
        assert np.allclose(st_["imbalance"], 10 / 4)
        assert np.allclose(st_["step_imbalance"], 4)  # each step uses 2 of 8 experts
        assert np.array_equal(st_["idle"], [4, 4])
        assert st_["drift"]["tv"] == [1.0] and st_["drift"]["hot_overlap"] == [0.0]
        co = coactivation(trace)
        assert co[0, 0, 1] == 10 and co[0, 4, 5] == 6 and co[0, 0, 4] == 0
        assert np.array_equal(np.diagonal(co, axis1=1, axis2=2), st_["load"])
        cl = cross_layer(trace)
        assert cl.shape == (1, 8, 8) and cl[0, 0, 2] == 10 and cl[0, 4, 7] == 6 and cl[0, 0, 6] == 0
        assert st_["cross_layer_nmi"][0] > 0.9  # layer 1 is a function of layer 0 here
        j = jsonable(st_)
        assert "load" not in j and isinstance(j["imbalance"], list)
        assert trace_stats(trace, 1, 2)["tokens"] == 6


def test_stats_of_counts_traces_and_synthetic_correlation(tmp_path):
    path = tmp_path / "c.mtrace"
    with TraceWriter(path, TINY, kind="counts") as w:
        w.add_counts(np.array([[4, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]))
    with Trace.open(path) as trace:
        s = trace_stats(trace)
        assert s["tokens"] == 2 and np.allclose(s["imbalance"], [8, 2]) and "cross_layer_nmi" not in s
    model = get_model("small")
    nmi = []
    for corr in (0.0, 4.0):
        p = synthesize(model, SynthConfig(steps=2, tokens=2048, layer_corr=corr, domain_strength=0.0),
                       tmp_path / f"s{corr}.mtrace")
        with Trace.open(p) as trace:
            nmi.append(trace_stats(trace)["cross_layer_nmi"].mean())
    assert nmi[1] > nmi[0] + 0.05
