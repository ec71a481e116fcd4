"""Rebalance policies, slot alignment and migration bytes (the replay itself: test_replay_rebalance.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.errors import MoesimError
from moesim.mapping import ExpertMapping
from moesim.placement import place
from moesim.placement.rebalance import align, changed_pairs, migration_matrix, parse_policy, plan


@st.composite
def mapping_pairs(draw):
    G = draw(st.integers(1, 4))
    E = draw(st.integers(1, 8))
    S = -(-E // G) + draw(st.integers(0, 2))
    L = draw(st.integers(1, 3))
    rows = []
    for _ in range(2):
        p = []
        for _ in range(L):
            perm = draw(st.permutations(list(range(E)) + [draw(st.integers(0, E - 1)) for _ in range(G * S - E)]))
            p.append(perm)
        rows.append(np.array(p))
    return ExpertMapping(rows[0], G, E), ExpertMapping(rows[1], G, E)


@settings(max_examples=60, deadline=None)
@given(mapping_pairs())
def test_align_keeps_held_experts_and_bytes_are_changed_pairs(pair):
    old, new = pair
    al = align(old, new)
    S = new.slots_per_gpu
    # same multiset per GPU as new
    for layer in range(new.num_layers):
        for g in range(new.num_gpus):
            a = sorted(al.phy2log[layer, g * S:(g + 1) * S])
            assert a == sorted(new.phy2log[layer, g * S:(g + 1) * S])
    # every slot whose old expert stays on the GPU keeps it
    kept_slots = int((al.phy2log == old.phy2log).sum())
    pairs = changed_pairs(old, new)
    assert kept_slots == old.num_layers * old.num_slots - pairs
    eb = 1000.0
    mat = migration_matrix(old, al, eb, gpus_per_node=2)
    assert mat.sum() == pytest.approx(pairs * eb)
    # the diagonal is a local copy: a GPU adding a replica of an expert it already held
    for g in np.nonzero(np.diag(mat))[0]:
        S = old.slots_per_gpu
        assert np.isin(al.phy2log[:, g * S:(g + 1) * S], old.phy2log[:, g * S:(g + 1) * S]).any()
    assert changed_pairs(old, old) == 0 and migration_matrix(old, old, eb).sum() == 0


def test_migration_prefers_a_source_on_the_same_node():
    # 4 GPUs, 2 per node, 2 slots each; GPU 3 needs expert 0 which GPUs 0 and 2 hold: 2 is on its node
    old = ExpertMapping(np.array([[0, 1, 2, 3, 0, 4, 5, 6]]), 4, 7)
    new = ExpertMapping(np.array([[6, 1, 2, 3, 0, 4, 0, 5]]), 4, 7)
    mat = migration_matrix(old, align(old, new), 10.0, gpus_per_node=2)
    assert mat[2, 3] == 10.0 and mat[1, 0] == 0 and mat.sum() == 20.0  # GPU 0 fetches 6 from GPU 3


def test_parse_policy():
    assert parse_policy("static").kind == "static"
    p = parse_policy("periodic:interval=10,window=5")
    assert (p.kind, p.interval, p.window) == ("periodic", 10, 5)
    p = parse_policy("threshold:balancedness=0.9,window=4")
    assert (p.balancedness, p.window, p.gap) == (0.9, 4, 4)
    for bad, needle in [("sometimes", "unknown rebalance policy"), ("periodic:every=3", "unknown parameter"),
                        ("periodic:interval=x", "must be a number"), ("threshold:balancedness=2", "(0, 1]"),
                        ("periodic:interval=0", "positive"), ("periodic:interval", "key=value"), ("", "must be")]:
        with pytest.raises(MoesimError, match=needle.replace("(", r"\(").replace("]", r"\]")):
            parse_policy(bad)


def _drifting_load(S=40, L=2, E=8, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0, 1, (L, E))
    out = []
    for t in range(S):
        if t == S // 2:
            base = base[:, ::-1].copy()  # the hot experts change half way
        out.append(rng.poisson(base * 100))
    return np.array(out, dtype=np.float64)


def _replace(G, N):
    return lambda w, current: place(w, "greedy", num_gpus=G, num_slots=N).mapping


def test_static_moves_nothing_and_periodic_follows_interval():
    load = _drifting_load()
    init = place(load[:5].sum(0), "greedy", num_gpus=4, num_slots=12).mapping
    assert plan(load, init, parse_policy("static"), _replace(4, 12)) == []
    steps = [t for t, _ in plan(load, init, parse_policy("periodic:interval=10,window=5"), _replace(4, 12))]
    assert set(steps) <= {10, 20, 30} and 20 in steps


def test_threshold_fires_after_the_shift_only():
    load = _drifting_load()
    init = place(load[:20].sum(0), "greedy", num_gpus=4, num_slots=12).mapping
    ch = plan(load, init, parse_policy("threshold:balancedness=0.85,window=5"), _replace(4, 12))
    assert ch and all(t > 20 for t, _ in ch)
    # each change is aligned to the previous mapping
    prev = init
    for _, m in ch:
        assert align(prev, m) == m
        prev = m


@settings(max_examples=40, deadline=None)
@given(mapping_pairs(), st.sampled_from([1, 2]))
def test_match_gpus_is_a_relabelling_that_never_moves_more(pair, gpn):
    from moesim.placement.base import gpu_loads
    from moesim.placement.rebalance import match_gpus

    old, new = pair
    if old.num_gpus % gpn:
        gpn = 1
    m = match_gpus(old, new, gpn)
    load = np.arange(1, old.num_experts + 1, dtype=float)[None].repeat(old.num_layers, 0)
    assert sorted(gpu_loads(load, m).ravel()) == pytest.approx(sorted(gpu_loads(load, new).ravel()))
    assert np.array_equal(m.logcnt, new.logcnt)
    assert changed_pairs(old, m) <= changed_pairs(old, new)
    assert changed_pairs(new, match_gpus(new, new, gpn)) == 0


def test_match_gpus_undoes_a_gpu_permutation():
    from moesim.placement.rebalance import match_gpus

    old = place(np.random.default_rng(0).random((2, 16)), "greedy", num_gpus=4, num_slots=20).mapping
    perm = np.array([3, 2, 0, 1])  # nodes swapped, and GPUs within node 1
    shuffled = ExpertMapping(old.phy2log.reshape(2, 4, 5)[:, perm].reshape(2, 20), 4, 16)
    assert changed_pairs(old, match_gpus(old, shuffled, 2)) == 0


def test_incremental_moves_few_experts():
    load = _drifting_load(S=40, L=2, E=16)
    init = place(load[:20].sum(0), "greedy", num_gpus=4, num_slots=24).mapping
    fresh = plan(load, init, parse_policy("periodic:interval=25,window=5"), _replace(4, 24))
    inc = plan(load, init, parse_policy("periodic:interval=25,window=5"),
               lambda w, cur: place(w, "incremental", num_gpus=4, num_slots=24, previous=cur, max_swaps=4).mapping)
    assert len(fresh) == len(inc) == 1
    assert changed_pairs(init, inc[0][1]) <= 2 * 4 * 2  # ≤ 2 experts per swap, 4 swaps, 2 layers
    assert changed_pairs(init, inc[0][1]) <= changed_pairs(init, fresh[0][1])
    w = load[20:25].sum(0)
    from moesim.placement import gpu_loads
    assert gpu_loads(w, inc[0][1]).max() <= gpu_loads(w, init).max() + 1e-9
