"""The synthetic router's layer sampler (moesim.trace.synth_route): the law it draws (Plackett-Luce picks, groups
by mass, the successor bonus, the weights of the Gumbel-top-k it replaced), the invariants on any input, and the
compiled loop equal to numpy bit for bit."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from itertools import permutations
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from moesim.trace import synth_route
from moesim.trace.synth_route import BLOCK, draws, geometry, layer_tables, route_layer

REPO = Path(__file__).resolve().parents[2]


def _compiled() -> bool:
    return synth_route.route_kernel() is not None


def _route(logits: np.ndarray, G: int, kg: int, k: int, domain: np.ndarray, prev: np.ndarray | None,
           succ: np.ndarray, factor: float, seed: int, sigmoid: bool = False, compiled: bool | None = False,
           dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """One layer through route_layer: (ids [T, k] int64, weights [T, k])."""
    T, E = len(domain), logits.shape[1]
    w, sg, mass, shift = layer_tables(logits.astype(np.float32), G)
    bits, exps = draws(np.random.default_rng(seed), T, kg if G > 1 else 0, k)
    ids = np.empty((T, k), dtype=np.uint16)
    weights = np.empty((T, k), dtype=dtype)
    prev = np.empty((0, k), dtype=np.uint16) if prev is None else prev.astype(np.uint16)
    route_layer(w, sg, mass, domain, prev, succ, factor, bits, exps, kg, BLOCK, sigmoid,
                math.exp(-shift) if sigmoid else 0.0, *geometry(E, G, kg), ids, weights, compiled=compiled)
    return ids.astype(np.int64), weights


def test_ordered_picks_follow_plackett_luce() -> None:
    """P(first = i, second = j) = p_i p_j / (1 - p_i): sequential sampling without replacement, the law of
    Gumbel-top-k. A sampler that forgot to remove the first pick, or scanned the wrong block, fails."""
    p = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.05])
    E, T = len(p), 60000
    ids, _ = _route(np.log(p)[None, :], 1, 1, 2, np.zeros(T, dtype=np.int64), None, np.arange(E), 1.0, seed=1)
    pairs = list(permutations(range(E), 2))
    want = np.array([p[i] * p[j] / (1 - p[i]) for i, j in pairs]) * T
    got = np.bincount(ids[:, 0] * E + ids[:, 1], minlength=E * E)[[i * E + j for i, j in pairs]]
    assert stats.chisquare(got, want).pvalue > 1e-4


def test_blocks_and_groups_follow_their_mass() -> None:
    """40 experts in 4 groups of 10 (blocks of 16 inside 2 kept groups: a partial block): the first group drawn
    in proportion to its mass; the first expert in proportion to its weight within the kept groups."""
    rng = np.random.default_rng(3)
    E, G, T = 40, 4, 80000
    logits = rng.normal(0, 1, (1, E))
    ids, _ = _route(logits, G, 2, 3, np.zeros(T, dtype=np.int64), None, np.arange(E), 1.0, seed=2)
    w = np.exp(logits[0] - logits.max())
    mass = w.reshape(G, -1).sum(axis=1)
    # P(expert e first) = sum over kept group pairs containing e's group of P(pair) * w_e / mass(pair)
    want = np.zeros(E)
    for a, b in permutations(range(G), 2):
        pa = mass[a] / mass.sum() * mass[b] / (mass.sum() - mass[a])
        for g in (a, b):
            sl = slice(g * 10, g * 10 + 10)
            want[sl] += pa * w[sl] / (mass[a] + mass[b])
    got = np.bincount(ids[:, 0], minlength=E)
    assert stats.chisquare(got, want * T).pvalue > 1e-4
    assert ((ids // 10)[:, :, None] != (ids // 10)[:, None, :]).sum(axis=(1, 2)).max() <= 2 * 2  # <= 2 groups


def test_successor_bonus_multiplies_the_weight() -> None:
    """A previous expert's successor (inside the kept groups) weighs ``factor`` times more: first-pick frequencies
    follow the boosted weights, and without a previous layer they follow the plain ones."""
    E, T, factor = 6, 60000, 3.0
    p = np.full(E, 1.0 / E)
    succ = np.array([3, 0, 1, 2, 5, 4])
    prev = np.zeros((T, 1), dtype=np.int64)  # every token's previous expert is 0: its successor is 3
    ids, _ = _route(np.log(p)[None, :], 1, 1, 1, np.zeros(T, dtype=np.int64), prev, succ, factor, seed=4)
    want = np.ones(E)
    want[3] = factor
    assert stats.chisquare(np.bincount(ids[:, 0], minlength=E), want / want.sum() * T).pvalue > 1e-4


@pytest.mark.parametrize("sigmoid", [False, True])
def test_weights_have_the_law_of_the_perturbed_logits(sigmoid: bool) -> None:
    """The ring times give the same weights as the Gumbel-top-k they replaced (top-k of logits + Gumbel noise;
    softmax over the k, or normalised sigmoids): two-sample KS on the best expert's weight."""
    rng = np.random.default_rng(5)
    E, k, T = 12, 3, 20000
    logits = rng.normal(0, 1.2, E)
    _, w = _route(logits[None, :], 1, 1, k, np.zeros(T, dtype=np.int64), None, np.arange(E), 1.0, seed=6,
                  sigmoid=sigmoid)
    pert = logits + rng.gumbel(size=(T, E))
    top = -np.sort(-pert, axis=1)[:, :k]
    ref = 1 / (1 + np.exp(-top)) if sigmoid else np.exp(top - top[:, :1])
    ref = ref / ref.sum(axis=1, keepdims=True)
    assert stats.ks_2samp(w[:, 0], ref[:, 0]).pvalue > 1e-4
    assert stats.ks_2samp(w[:, -1], ref[:, -1]).pvalue > 1e-4


@st.composite
def layer_inputs(draw: st.DrawFn) -> dict:
    G = draw(st.sampled_from([1, 1, 2, 3, 4, 8]))
    per = draw(st.integers(1, 40))
    E = G * per
    kg = draw(st.integers(1, G)) if G > 1 else 1
    k = draw(st.integers(1, min(kg * per if G > 1 else E, 9)))
    C = draw(st.integers(1, 3))
    T = draw(st.integers(1, 40))
    scale = draw(st.sampled_from([0.0, 1.0, 5.0, 40.0]))  # 40: weights down to exp(-80), sums that round off
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    prev = np.stack([rng.permutation(E)[:k] for _ in range(T)]) if draw(st.booleans()) else None
    return dict(logits=rng.normal(0, 1, (C, E)) * scale, G=G, kg=kg, k=k, domain=rng.integers(0, C, T), prev=prev,
                succ=rng.permutation(E), factor=math.exp(draw(st.sampled_from([0.0, 1.0, 30.0]))),
                seed=int(rng.integers(2**32)), sigmoid=draw(st.booleans()))


@given(inp=layer_inputs())
@settings(max_examples=150, deadline=None)
def test_every_token_gets_k_distinct_experts_in_its_groups(inp: dict) -> None:
    """Whatever the weights (down to exp(-80) beside 1 and bonuses of e^30): k distinct valid experts in at most
    ``topk_groups`` groups, weights finite, non-negative, summing to 1 and falling with the pick order; the
    compiled loop (where numba is installed) gives the same bits."""
    ids, w = _route(**inp)
    E = inp["logits"].shape[1]
    per = E // inp["G"]
    assert ids.min() >= 0 and ids.max() < E
    s = np.sort(ids, axis=1)
    assert (s[:, 1:] != s[:, :-1]).all()
    if inp["G"] > 1:
        g = np.sort(ids // per, axis=1)
        assert (1 + (g[:, 1:] != g[:, :-1]).sum(axis=1)).max() <= inp["kg"]
    assert np.isfinite(w).all() and (w >= 0).all()
    assert np.allclose(w.sum(axis=1), 1, atol=1e-5) and (np.diff(w, axis=1) <= 1e-6).all()
    if _compiled():
        for dtype in (np.float32, np.float16):
            want = _route(**inp, dtype=dtype)
            got = _route(**inp, dtype=dtype, compiled=True)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_half_bits_round_as_numpy() -> None:
    """float32 -> float16 in the compiled loop: zero, subnormals and normals in [0, 1] (and negatives) as numpy."""
    if not _compiled():
        pytest.skip("numba not installed (or MOESIM_NO_JIT set)")
    import numba

    from moesim.trace._synth_kernels import half_bits

    @numba.njit
    def convert(src: np.ndarray, dst: np.ndarray) -> None:
        for i in range(src.shape[0]):
            dst[i] = half_bits(src[i])

    rng = np.random.default_rng(0)
    b = np.concatenate([rng.integers(0, 0x3F800001, 400_000, dtype=np.uint32),  # [0, 1]
                        np.arange(0x32F00000, 0x38900000, 7, dtype=np.uint32),  # around the subnormals
                        np.arange(0x3F7F0000, 0x3F800001, dtype=np.uint32)])  # just below 1
    b = np.concatenate([b, b | np.uint32(0x80000000)])
    out = np.empty(len(b), dtype=np.uint16)
    convert(b, out)
    assert np.array_equal(out, b.view(np.float32).astype(np.float16).view(np.uint16))


def test_no_jit_switch_and_lazy_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    """MOESIM_NO_JIT=1 keeps the numpy path; importing the generator does not import numba."""
    monkeypatch.setattr(synth_route, "_KERNEL", None)
    monkeypatch.setenv("MOESIM_NO_JIT", "1")
    assert synth_route.route_kernel() is None
    monkeypatch.setattr(synth_route, "_KERNEL", None)
    code = "import sys, moesim.cli, moesim.trace.synth; assert 'numba' not in sys.modules, 'numba imported'"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]

