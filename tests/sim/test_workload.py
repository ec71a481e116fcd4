"""Workload building: conservation of tokens, layouts, origins, and the runtime's replica choice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.errors import MappingError, MoesimError
from moesim.mapping import ExpertMapping
from moesim.models import get_model
from moesim.replica import ReplicaPolicy, choose_slots
from moesim.sim.config import SimConfig
from moesim.sim.workload import _LayerChooser, build_workload, policy_tables, workload_from_counts, workload_from_ids
from moesim.trace import Trace, TraceWriter


def random_mapping(rng: np.random.Generator, L: int, E: int, G: int, extra: int) -> ExpertMapping:
    """Every expert at least once, ``extra`` more slots per GPU holding random replicas, shuffled."""
    spg = -(-E // G) + extra
    rows = []
    for _ in range(L):
        row = np.concatenate([rng.permutation(E), rng.integers(0, E, spg * G - E)])
        rows.append(rng.permutation(row))
    return ExpertMapping(np.array(rows), G, E)


def random_ids(rng: np.random.Generator, L: int, T: int, E: int, k: int, skew: float = 1.0) -> np.ndarray:
    """[L, T, k] distinct experts per token, skewed popularity."""
    p = rng.random(E) ** (1 + 4 * skew)
    p /= p.sum()
    keys = -np.log(rng.random((L, T, E))) / p  # exponential race: top-k without replacement ~ p
    return np.argsort(keys, axis=2)[:, :, :k].astype(np.int64)


def write_random_trace(path: Path, model: Any, step_tokens: tuple[int, ...], seed: int) -> Path:
    """A token trace of ``model`` with one step of random_ids per entry of ``step_tokens``."""
    rng = np.random.default_rng(seed)
    with TraceWriter(path, model) as w:
        for T in step_tokens:
            w.add_step(random_ids(rng, model.num_layers, T, model.num_experts, model.top_k))
    return path


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    G = draw(st.sampled_from([1, 2, 3, 4]))
    E = draw(st.integers(2, 9))
    k = draw(st.integers(1, min(E, 4)))
    L = draw(st.integers(1, 3))
    extra = draw(st.integers(0, 2))
    steps = draw(st.lists(st.integers(0, 23), min_size=1, max_size=4))
    mapping = random_mapping(rng, L, E, G, extra)
    st_ = np.array(steps, dtype=np.int64)
    ids = random_ids(rng, L, int(st_.sum()), E, k)
    origin = rng.integers(0, G, int(st_.sum())) if draw(st.booleans()) else None
    policy = ReplicaPolicy(draw(st.sampled_from(["vllm", "position", "local", "round_robin"])),
                           gpus_per_node=draw(st.sampled_from([1, 2])))
    return mapping, ids, st_, origin, policy


@settings(max_examples=60, deadline=None)
@given(cases(), st.sampled_from(["ep", "ep-tp-attn", "tp"]), st.booleans())
def test_tokens_conserved(case, layout, dedup) -> None:
    mapping, ids, st_, origin, policy = case
    L, _T, k = ids.shape
    G, E = mapping.num_gpus, mapping.num_experts
    wl = workload_from_ids(ids, st_, mapping, SimConfig(layout=layout, policy=policy, dedup=dedup), origin)
    S = len(st_)
    # every token-choice computed exactly once (in tp: G shards of 1/G each)
    np.testing.assert_allclose(wl.slot_tokens.sum(axis=2), st_[:, None] * k * np.ones((1, L)))
    # every token's dense part computed once
    np.testing.assert_allclose(wl.gpu_tokens.sum(axis=2), st_[:, None] * np.ones((1, L)))
    choices = wl.gpu_choices()  # [S, L, G]
    nd = workload_from_ids(ids, st_, mapping, SimConfig(layout=layout, policy=policy, dedup=False), origin)
    assert np.all(wl.send_tokens <= nd.send_tokens + 1e-9)
    if layout == "ep":
        # without dedup: origin o sends k choices per token, GPU d receives what its slots compute
        np.testing.assert_allclose(nd.send_tokens.sum(axis=3), nd.gpu_tokens * k)
        np.testing.assert_allclose(nd.send_tokens.sum(axis=2), choices)
        # with dedup: each token goes at least once, at most k times
        assert np.all(wl.send_tokens.sum(axis=3) >= wl.gpu_tokens - 1e-9)
        np.testing.assert_allclose(nd.gpu_tokens, wl.gpu_tokens)
    elif layout == "ep-tp-attn":
        off = ~np.eye(G, dtype=bool)
        assert not wl.send_tokens[..., off].any()  # nothing dispatched: every GPU holds every token
        np.testing.assert_allclose(np.diagonal(nd.send_tokens, axis1=2, axis2=3), choices)
    else:
        assert wl.slot_tokens.shape == (S, L, G * E)
    if layout != "tp":
        # the slots computing expert e add up to e's load: the policy only ever picks replicas of e
        load = np.zeros((S, L, E))
        step_of = np.repeat(np.arange(S), st_)
        for layer in range(L):
            np.add.at(load[:, layer], (step_of[:, None], ids[layer]), 1)
        by_expert = np.zeros((S, L, E))
        for layer in range(L):
            for s_ in range(mapping.phy2log.shape[1]):
                by_expert[:, layer, mapping.phy2log[layer, s_]] += wl.slot_tokens[:, layer, s_]
        np.testing.assert_allclose(by_expert, load)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_replica_choice_is_the_runtime_policy(case) -> None:
    """The fast paths pick exactly the slots moesim.replica.choose_slots picks (the runtime calls it)."""
    mapping, ids, _st, origin, policy = case
    L, T, _k = ids.shape
    G = mapping.num_gpus
    o = origin if origin is not None else np.arange(T) % G
    key = np.arange(T)
    tables, counts = policy_tables(policy, mapping)
    ref_t, ref_c = policy.all_tables(mapping)
    np.testing.assert_array_equal(tables, ref_t)
    np.testing.assert_array_equal(counts, ref_c)
    for layer in range(L):
        want = choose_slots(ref_t[layer], ref_c[layer], ids[layer], o, key)
        got = _LayerChooser(tables[layer], counts[layer], policy.shared)(ids[layer].T, o, key).T
        np.testing.assert_array_equal(got, want)


def test_replica_position_policy() -> None:
    """``position`` (old name round_robin): a token's choice goes to replica position % replica_count."""
    mapping = ExpertMapping(np.array([[0, 1, 0, 2]]), 2, 3)  # expert 0 in slots 0 and 2
    ids = np.zeros((1, 4, 1), dtype=np.int64)
    wl = workload_from_ids(ids, np.array([4]), mapping, SimConfig(dedup=False))
    np.testing.assert_array_equal(wl.slot_tokens[0, 0], [2, 0, 2, 0])
    # origins: contiguous halves; tokens 0,1 on GPU 0 (positions 0,1 -> slots 0,2), tokens 2,3 on GPU 1
    np.testing.assert_array_equal(wl.send_tokens[0, 0], [[1, 1], [1, 1]])
    local = workload_from_ids(ids, np.array([4]), mapping, SimConfig(policy=ReplicaPolicy("local", 1)))
    np.testing.assert_array_equal(local.send_tokens[0, 0], [[2, 0], [0, 2]])  # each origin has its replica


def test_dedup_counts_tokens_per_destination_gpu() -> None:
    mapping = ExpertMapping.linear(1, 4, 2)  # GPU 0: experts 0,1; GPU 1: experts 2,3
    ids = np.array([[[0, 1], [0, 2], [2, 3], [3, 1]]])  # origins 0,0,1,1
    wl = workload_from_ids(ids, np.array([4]), mapping, SimConfig(dedup=True))
    np.testing.assert_array_equal(wl.send_tokens[0, 0], [[2, 1], [1, 2]])
    nd = workload_from_ids(ids, np.array([4]), mapping, SimConfig(dedup=False))
    np.testing.assert_array_equal(nd.send_tokens[0, 0], [[3, 1], [1, 3]])


def test_origin_from_trace_or_blocks(tmp_path) -> None:
    model = get_model("tiny")
    rng = np.random.default_rng(1)
    ids = random_ids(rng, model.num_layers, 6, model.num_experts, model.top_k)
    origin = np.array([1, 1, 1, 0, 0, 0])
    with TraceWriter(tmp_path / "t.mtrace", model, origin=True, num_ranks=2) as w:
        w.add_step(ids, origin=origin, phase="decode")
    m2 = ExpertMapping.linear(model.num_layers, model.num_experts, 2)
    m4 = ExpertMapping.linear(model.num_layers, model.num_experts, 4)
    with Trace.open(tmp_path / "t.mtrace") as tr:
        wl2 = build_workload(tr, m2, SimConfig())
        wl4 = build_workload(tr, m4, SimConfig())
        with pytest.raises(MoesimError, match="step range"):
            build_workload(tr, m2, SimConfig(), 1, 3)
    np.testing.assert_array_equal(wl2.gpu_tokens[0, 0], [3, 3])
    assert wl2.send_tokens[0, 0, 1].sum() >= 3  # GPU 1's tokens leave from GPU 1 (recorded origin)
    np.testing.assert_array_equal(wl4.gpu_tokens[0, 0], [2, 1, 2, 1])  # floor(i*4/6): 0,0,1,2,2,3
    assert wl2.phase[0] == 0


def test_counts_workload() -> None:
    mapping = ExpertMapping(np.array([[0, 1, 0, 2]]), 2, 3)
    counts = np.array([[[6.0, 2.0, 4.0]]])  # 6 tokens × top-2
    wl = workload_from_counts(counts, np.array([6]), mapping, SimConfig(dedup=False))
    np.testing.assert_allclose(wl.slot_tokens[0, 0], [3, 2, 3, 4])  # expert 0 split over its 2 replicas
    np.testing.assert_allclose(wl.gpu_tokens[0, 0], [3, 3])
    np.testing.assert_allclose(wl.send_tokens[0, 0], [[2.5, 3.5], [2.5, 3.5]])
    dd = workload_from_counts(counts, np.array([6]), mapping, SimConfig(dedup=True))
    assert np.all(dd.send_tokens <= wl.send_tokens + 1e-12)
    np.testing.assert_allclose(dd.slot_tokens.sum(), 12)
    tp = workload_from_counts(counts, np.array([6]), mapping, SimConfig(layout="tp"))
    np.testing.assert_allclose(tp.slot_tokens[0, 0], [3, 1, 2, 3, 1, 2])
    with pytest.raises(MappingError):
        workload_from_counts(np.ones((1, 2, 3)), np.array([1]), mapping)
    with pytest.raises(MoesimError):
        workload_from_counts(-counts, np.array([6]), mapping)


def test_bad_inputs() -> None:
    mapping = ExpertMapping.linear(1, 4, 2)
    with pytest.raises(MoesimError, match="add up"):
        workload_from_ids(np.zeros((1, 3, 1), dtype=np.int64), np.array([2]), mapping)
    with pytest.raises(MoesimError, match="out of range"):
        workload_from_ids(np.full((1, 2, 1), 7), np.array([2]), mapping)
    with pytest.raises(MoesimError, match="origin"):
        workload_from_ids(np.zeros((1, 2, 1), dtype=np.int64), np.array([2]), mapping, origin=np.array([0, 5]))
    with pytest.raises(MoesimError, match="layout"):
        SimConfig(layout="zigzag")


def naive_workload(ids, step_tokens, mapping, policy, origin, dedup):
    """Reference: token by token with choose_slots (the runtime's call), for the ep layout."""
    L = ids.shape[0]
    G = mapping.num_gpus
    S = len(step_tokens)
    slots = mapping.phy2log.shape[1]
    slot_gpu = mapping.slot_gpu()
    slot_tokens = np.zeros((S, L, slots))
    send = np.zeros((S, L, G, G))
    offsets = np.concatenate([[0], np.cumsum(step_tokens)])
    for layer in range(L):
        table, count = policy.tables(mapping, layer)
        for s in range(S):
            a, b = offsets[s], offsets[s + 1]
            n = b - a
            o = origin[a:b] if origin is not None else np.arange(n) * G // max(n, 1)
            local = np.array([int(np.sum(o[:t] == o[t])) for t in range(n)], dtype=np.int64)
            chosen = choose_slots(table, count, ids[layer, a:b], o, policy.key(np.arange(n), local))
            for t in range(n):
                dsts = [slot_gpu[x] for x in chosen[t]]
                for x in chosen[t]:
                    slot_tokens[s, layer, x] += 1
                for d in (set(dsts) if dedup else dsts):
                    send[s, layer, o[t], d] += 1
    return slot_tokens, send


@settings(max_examples=40, deadline=None)
@given(cases(), st.booleans())
def test_matches_token_by_token_reference(case, dedup) -> None:
    mapping, ids, st_, origin, policy = case
    wl = workload_from_ids(ids, st_, mapping, SimConfig(policy=policy, dedup=dedup), origin)
    slot_tokens, send = naive_workload(ids, st_, mapping, policy, origin, dedup)
    np.testing.assert_array_equal(wl.slot_tokens, slot_tokens)
    np.testing.assert_array_equal(wl.send_tokens, send)


@given(kv=st.lists(st.one_of(st.none(), st.floats(0, 1e5)), min_size=1, max_size=9),
       chunk_bytes=st.sampled_from([1, 200, 1 << 20]), start=st.integers(0, 9), length=st.integers(1, 9))
@settings(max_examples=40, deadline=None)
def test_build_workload_carries_each_steps_kv_len(tmp_path_factory, kv, chunk_bytes, start, length) -> None:
    """Per-step KV lengths reach the workload across chunk boundaries; NaN where a step had none; None when the
    steps asked for hold none at all."""
    spec = get_model("tiny")
    path = tmp_path_factory.mktemp("kv") / "t.mtrace"
    rng = np.random.default_rng(0)
    with TraceWriter(path, spec, chunk_bytes=chunk_bytes) as w:
        for value in kv:
            w.add_step(rng.integers(0, spec.num_experts, (spec.num_layers, 3, spec.top_k)), kv_len=value)
    start = min(start, len(kv) - 1)
    stop = min(start + length, len(kv))
    with Trace.open(path) as trace:
        wl = build_workload(trace, ExpertMapping.linear(spec.num_layers, spec.num_experts, 2), None, start, stop)
    want = np.array([np.nan if v is None else v for v in kv[start:stop]], dtype=np.float32)
    if wl.kv_len is None:
        assert np.isnan(want).all()
    else:
        np.testing.assert_array_equal(wl.kv_len, want)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_vllm_policy_is_vllms_hash_of_the_rank_batch_index(case) -> None:
    """Slots written out from vLLM's kernel rule, token by token: replica ((t * 2654435769) & 0xFFFFFFFF) % count,
    t = the token's index among its origin rank's tokens of the step, replicas in slot order."""
    mapping, ids, st_, origin, _ = case
    L = ids.shape[0]
    G = mapping.num_gpus
    wl = workload_from_ids(ids, st_, mapping, SimConfig(policy=ReplicaPolicy("vllm"), dedup=False), origin=origin)
    want = np.zeros((len(st_), L, mapping.phy2log.shape[1]))
    start = 0
    for s, n in enumerate(st_):
        o = origin[start:start + n] if origin is not None else np.arange(n) * G // max(n, 1)
        seen: dict[int, int] = {}
        for t in range(n):
            local = seen.get(int(o[t]), 0)
            seen[int(o[t])] = local + 1
            for layer in range(L):
                for e in ids[layer, start + t]:
                    replicas = np.flatnonzero(mapping.phy2log[layer] == e)  # slot order
                    want[s, layer, replicas[((local * 2654435769) & 0xFFFFFFFF) % len(replicas)]] += 1
        start += n
    np.testing.assert_array_equal(wl.slot_tokens, want)


def test_policy_names() -> None:
    assert ReplicaPolicy("round_robin").name == "position" and ReplicaPolicy("round_robin") == ReplicaPolicy()
    with pytest.raises(MoesimError, match="known: vllm, position, local"):
        ReplicaPolicy("hash")
