"""The network and overhead fits that let a live run calibrate the simulator."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.calibration import fastest_rank_phase, fit_network, fit_overhead
from moesim.errors import MoesimError
from moesim.trace.reader import Timings


@settings(max_examples=40)
@given(latency=st.floats(1e-6, 1e-2), bandwidth=st.floats(1e8, 1e12), seed=st.integers(0, 2**16))
def test_network_fit_recovers_latency_and_bandwidth(latency: float, bandwidth: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    nbytes = rng.uniform(0, 50 * bandwidth * latency + 1e6, size=64)
    seconds = latency + nbytes / bandwidth
    fit = fit_network(seconds, nbytes)
    assert fit.latency == pytest.approx(latency, rel=1e-3, abs=1e-9)
    assert fit.bandwidth == pytest.approx(bandwidth, rel=1e-3)
    assert fit.median_rel_error < 1e-6
    assert fit.samples == 64


def test_network_fit_ignores_missing_samples_and_refuses_too_few() -> None:
    fit = fit_network(np.array([1.0, np.nan, 3.0]), np.array([0.0, 5.0, 2.0]))
    assert fit.latency == pytest.approx(1.0) and fit.bandwidth == pytest.approx(1.0)
    with pytest.raises(MoesimError, match="too few"):
        fit_network(np.array([1.0]), np.array([1.0]))


def test_fastest_rank_takes_the_minimum_over_ranks() -> None:
    # 1 step, 2 layers, 2 ranks; phases (attention, dispatch)
    index = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]], dtype=np.int32)
    phases = np.array([[0.1, 5.0], [0.1, 1.0], [0.1, 2.0], [0.1, 4.0]])
    tm = Timings(("attention", "dispatch"), index, phases, np.zeros((4, 0), np.int32), np.zeros((4, 0), np.int32))
    got = fastest_rank_phase(tm, "dispatch", 1, 2, 2)
    np.testing.assert_allclose(got, [[2.0, 1.0]])


def test_overhead_is_the_median_residual_per_phase() -> None:
    phases = ["prefill", "decode", "decode", "decode"]
    fit = fit_overhead(phases, np.array([100, 4, 4, 4]), np.array([0.5, 0.1, 0.2, 9.0]))
    np.testing.assert_allclose(fit.predict(["prefill", "decode", None], np.array([1, 1, 1])), [0.5, 0.2, 0.35])
