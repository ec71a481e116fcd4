"""What a live run teaches the simulator beyond the kernel cost model: its network and its per-step overhead.

The cost model (:mod:`moesim.cost`) fits expert and dense compute from the recorded timings. Two more things
must come from the run for the simulator to predict a step of *this* cluster:

- **the network**: dispatch and combine times against the bytes on the busiest link, fitted as
  ``t = latency + bytes / bandwidth`` (non-negative least squares) and turned into a flat topology (one
  switch, one link each way per rank). On CPU gloo this is mostly latency; on NCCL it is mostly bandwidth.
  Each (step, layer) contributes the *fastest* rank's time: ranks that arrive early at a collective also
  measure their wait for the slowest one, which is imbalance, not network.
- **the per-step overhead** outside the MoE layers (embedding, LM head, sampling, Python): the median of
  measured step time minus the simulated layer time, per phase (prefill / decode), affine in tokens.

Both are fitted on one run and then used to *predict* another; that is what ``moesim validate`` measures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import nnls

from moesim.errors import MoesimError
from moesim.trace.reader import Timings


@dataclass(frozen=True)
class NetworkFit:
    latency: float  # seconds per collective (both directions of the path)
    bandwidth: float  # bytes/s of a rank's link
    median_rel_error: float
    samples: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def fastest_rank_phase(timings: Timings, phase: str, num_steps: int, num_layers: int, world: int) -> np.ndarray:
    """[S, L] the smallest time over ranks of ``phase`` (NaN where a record is missing)."""
    out = np.full((num_steps, num_layers, world), np.nan)
    idx = timings.index
    keep = (idx[:, 0] < num_steps) & (idx[:, 1] < num_layers) & (idx[:, 2] < world)
    out[idx[keep, 0], idx[keep, 1], idx[keep, 2]] = timings.phase(phase)[keep]
    with np.errstate(all="ignore"):
        return np.nanmin(out, axis=2)


def fit_network(seconds: np.ndarray, link_bytes: np.ndarray) -> NetworkFit:
    """Fit ``seconds ≈ latency + link_bytes / bandwidth`` over matching samples (any shape)."""
    t = np.asarray(seconds, dtype=float).ravel()
    b = np.asarray(link_bytes, dtype=float).ravel()
    ok = np.isfinite(t) & np.isfinite(b)
    t, b = t[ok], b[ok]
    if t.size < 2:
        raise MoesimError("too few dispatch/combine timings to fit the network (need 2 or more)")
    a = np.column_stack([np.ones_like(b), b])
    coef, _ = nnls(a, t)
    latency, per_byte = float(coef[0]), float(coef[1])
    if per_byte <= 0:  # all samples moved about the same bytes: bandwidth is not identifiable; make it harmless
        per_byte = 1e-15
    pred = latency + b * per_byte
    err = np.abs(pred - t) / np.maximum(t, 1e-12)
    return NetworkFit(latency=max(latency, 1e-9), bandwidth=1.0 / per_byte, median_rel_error=float(np.median(err)),
                      samples=int(t.size))


@dataclass(frozen=True)
class OverheadFit:
    """Per-step time outside the simulated layers: ``intercept + per_token * tokens``, per phase name."""

    coef: dict[str, tuple[float, float]]

    def predict(self, phases: list[str | None], tokens: np.ndarray) -> np.ndarray:
        out = np.zeros(len(phases))
        for i, (ph, n) in enumerate(zip(phases, np.asarray(tokens, dtype=float), strict=True)):
            a, b = self.coef.get(str(ph), self.coef.get("all", (0.0, 0.0)))
            out[i] = a + b * n
        return out

    def to_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.coef.items()}


def fit_overhead(phases: list[str | None], tokens: np.ndarray, residual: np.ndarray) -> OverheadFit:
    """Median residual per phase (robust to the noisy steps of a shared machine); slope only with spread."""
    tokens = np.asarray(tokens, dtype=float)
    residual = np.asarray(residual, dtype=float)
    coef: dict[str, tuple[float, float]] = {}
    names = [str(p) for p in phases]
    for name in sorted(set(names)):
        m = np.array([n == name for n in names])
        coef[name] = (float(np.median(residual[m])), 0.0)
    coef["all"] = (float(np.median(residual)), 0.0)
    return OverheadFit(coef)
