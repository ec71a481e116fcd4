"""Round-trip properties of the trace format: what a TraceWriter writes, the Trace reader gives back exactly.

Covers ids (u2 and i4), router weights (f16/f32), origins, phases, timing records of varying widths, chunk
boundaries (tiny chunk_bytes, empty steps, timing-only chunks), load-only traces, append and atomic modes, and
every reader API: steps(start, stop), step(i), chunks(), load(start, stop) against a numpy recomputation, timings().
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moesim.errors import MoesimError, TraceError
from moesim.models import ModelSpec, get_model
from moesim.trace import Trace, TraceWriter
from moesim.trace import format as fmt

PHASES = [None, "decode", "prefill"]


@dataclass
class Plan:
    """What a test writes: the model, the writer's options and the steps / timing records in order."""

    model: ModelSpec
    kind: str
    weights: str | None
    origin: bool
    num_ranks: int | None
    chunk_bytes: int
    steps: list[dict] = field(default_factory=list)  # ids/weights/origin/phase or counts/phase
    timings: list[tuple] = field(default_factory=list)  # (step, layer, rank, phases, experts, tokens)
    order: list[tuple[str, int]] = field(default_factory=list)  # ("step", i) / ("timing", j) interleaving

    def writer_kwargs(self) -> dict:
        return {"kind": self.kind, "weights": self.weights is not None, "weights_dtype": self.weights or "float16",
                "origin": self.origin, "num_ranks": self.num_ranks, "chunk_bytes": self.chunk_bytes}


def _model(layers: int, experts: int, top_k: int) -> ModelSpec:
    return ModelSpec("prop", num_layers=layers, num_experts=experts, top_k=top_k, hidden_size=8, ffn_size=8)


@st.composite
def plans(draw, kind: str | None = None, big_experts: bool = False) -> Plan:
    kind = kind or draw(st.sampled_from(["tokens", "tokens", "counts"]))
    experts = 70_000 if big_experts else draw(st.integers(1, 24))
    model = _model(draw(st.integers(1, 3)), experts, draw(st.integers(1, min(4, experts))))
    tokens_kind = kind == "tokens"
    weights = draw(st.sampled_from([None, "float16", "float32"])) if tokens_kind else None
    origin = tokens_kind and draw(st.booleans())
    num_ranks = draw(st.sampled_from([None, 1, 3, 70_000])) if origin else None
    plan = Plan(model, kind, weights, origin, num_ranks, draw(st.sampled_from([1, 64, 700, 5000, 1 << 20])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    L, E, k = model.num_layers, model.num_experts, model.top_k
    for _ in range(draw(st.integers(0, 9))):
        phase = PHASES[int(rng.integers(3))]
        if tokens_kind:
            T = int(rng.choice([0, 1, 2, 5, 17]))
            step = {"ids": rng.integers(0, E, (L, T, k)), "phase": phase}
            if weights:
                step["weights"] = rng.random((L, T, k)).astype(weights)
            if origin:
                step["origin"] = rng.integers(0, num_ranks or 65_536, T)
        else:
            step = {"counts": rng.integers(0, 50, (L, E)) * int(rng.integers(0, 2)), "phase": phase}
        step["kv_len"] = float(rng.choice([0, 1.5, 17, 4096])) if rng.random() < 0.5 else None
        plan.order.append(("step", len(plan.steps)))
        plan.steps.append(step)
        for _ in range(int(rng.choice([0, 0, 1, 3]))):
            width = int(rng.integers(0, 6))
            rec = (len(plan.steps) - 1, int(rng.integers(L)), int(rng.integers(4)), rng.random(5).tolist(),
                   rng.integers(-1, E, width).tolist(), rng.integers(0, 100, width).tolist())
            plan.order.append(("timing", len(plan.timings)))
            plan.timings.append(rec)
    return plan


def _feed(writer: TraceWriter, plan: Plan, items: list[tuple[str, int]]) -> None:
    for what, i in items:
        if what == "timing":
            writer.add_timing(*plan.timings[i])
            continue
        s = plan.steps[i]
        if plan.kind == "counts":
            assert writer.add_counts(s["counts"], phase=s["phase"], kv_len=s["kv_len"]) == i
        else:
            assert writer.add_step(s["ids"], weights=s.get("weights"), origin=s.get("origin"), phase=s["phase"],
                                   kv_len=s["kv_len"]) == i


def _write(path: Path, plan: Plan, **kw) -> Path:
    with TraceWriter(path, plan.model, **plan.writer_kwargs(), **kw) as w:
        _feed(w, plan, plan.order)
    return path


def _expected_load(plan: Plan) -> np.ndarray:
    L, E = plan.model.num_layers, plan.model.num_experts
    out = np.zeros((len(plan.steps), L, E), dtype=np.int64)
    for i, s in enumerate(plan.steps):
        if plan.kind == "counts":
            out[i] = s["counts"]
            continue
        for layer in range(L):
            np.add.at(out[i, layer], s["ids"][layer].ravel(), 1)
    return out


def _tokens(plan: Plan, s: dict) -> int:
    return s["ids"].shape[1] if plan.kind == "tokens" else int(s["counts"][0].sum()) // plan.model.top_k


def _check_step(plan: Plan, got, i: int) -> None:
    s = plan.steps[i]
    assert got.index == i and got.phase == s["phase"]
    if plan.kind == "counts":
        assert got.ids is None and np.array_equal(got.counts, s["counts"])
        assert got.num_tokens == _tokens(plan, s)
        return
    assert got.counts is None and got.num_tokens == s["ids"].shape[1]
    assert got.ids.dtype == fmt.id_dtype(plan.model.num_experts) and np.array_equal(got.ids, s["ids"])
    if plan.weights:
        assert got.weights.dtype == np.dtype(plan.weights)
        assert np.array_equal(got.weights, s["weights"])
    else:
        assert got.weights is None
    if plan.origin:
        assert np.array_equal(got.origin, s["origin"])
    else:
        assert got.origin is None


def _check_trace(path: Path, plan: Plan, start: int, stop: int) -> None:
    n = len(plan.steps)
    with Trace.open(path, require_steps=False) as trace:
        assert trace.truncated is None and trace.validate() == []
        assert trace.model == plan.model and trace.kind == plan.kind and trace.num_steps == n
        assert trace.has_weights == (plan.weights is not None) and trace.has_origin == plan.origin
        assert trace.num_ranks == plan.num_ranks and trace.nbytes == path.stat().st_size
        if plan.kind == "tokens":
            assert trace.num_tokens == sum(_tokens(plan, s) for s in plan.steps)
        # steps(): all of them, and an arbitrary window
        got = list(trace.steps())
        assert [s.index for s in got] == list(range(n))
        for i, s in enumerate(got):
            _check_step(plan, s, i)
        window = list(trace.steps(start, stop))
        assert [s.index for s in window] == list(range(min(start, n), min(stop, n)))
        for s in window:
            _check_step(plan, s, s.index)
        for i in range(n):
            _check_step(plan, trace.step(i), i)
        with pytest.raises(MoesimError):
            trace.step(n)
        # chunks(): consecutive, covering every step once, arrays consistent with the steps
        first = 0
        for chunk in trace.chunks():
            assert chunk.first_step == first and chunk.num_steps > 0
            want = plan.steps[first:first + chunk.num_steps]
            assert chunk.step_tokens.tolist() == [_tokens(plan, s) for s in want]
            assert [fmt.PHASE_NAMES[int(p)] for p in chunk.phase] == [s["phase"] for s in want]
            if plan.kind == "tokens":
                assert np.array_equal(chunk.ids, np.concatenate([s["ids"] for s in want], axis=1))
                assert chunk.step_offsets[-1] == chunk.ids.shape[1]
            else:
                assert np.array_equal(chunk.counts, np.stack([s["counts"] for s in want]))
            first += chunk.num_steps
        assert first == n
        # load(): per-step token-choices per expert, equal to a numpy recomputation
        load = _expected_load(plan)
        assert np.array_equal(trace.load(), load)
        assert np.array_equal(trace.load(start, stop), load[start:stop])
        if plan.kind == "tokens":
            assert np.array_equal(load.sum(axis=2), np.array([[s["ids"].shape[1] * plan.model.top_k]
                                                              * plan.model.num_layers for s in plan.steps])
                                  .reshape(n, plan.model.num_layers))
        # timings(): every record in order, experts padded with -1 and tokens with 0 to the widest
        t = trace.timings()
        assert len(t) == len(plan.timings) and t.phase_names == fmt.DEFAULT_TIMING_PHASES
        assert t.index.shape == (len(plan.timings), 3) and t.phases.shape == (len(plan.timings), 5)
        width = max((len(r[4]) for r in plan.timings), default=0)
        assert t.experts.shape == t.tokens.shape == (len(plan.timings), width)
        for j, (step, layer, rank, phases, experts, tokens) in enumerate(plan.timings):
            assert t.index[j].tolist() == [step, layer, rank]
            assert t.phases[j].tolist() == phases
            assert t.experts[j].tolist() == experts + [-1] * (width - len(experts))
            assert t.tokens[j].tolist() == tokens + [0] * (width - len(tokens))
        if plan.timings:
            assert np.array_equal(t.phase("expert"), t.phases[:, 3])
        with pytest.raises(MoesimError, match="no phase"):
            t.phase("nope")
        w = t.in_steps(start, stop)
        assert sorted(map(tuple, w.index.tolist())) == sorted(r[:3] for r in plan.timings if start <= r[0] < stop)
        # kv_len(): the recorded values, NaN where a step had none, None when no step had one
        kv = [np.nan if s["kv_len"] is None else s["kv_len"] for s in plan.steps]
        if all(s["kv_len"] is None for s in plan.steps):
            assert trace.kv_len() is None
        else:
            np.testing.assert_array_equal(trace.kv_len(), np.array(kv, dtype=np.float32))
            got_kv = trace.kv_len(start, stop)
            want_kv = np.array(kv[start:stop], dtype=np.float32)
            assert (got_kv is None and np.isnan(want_kv).all()) or np.array_equal(got_kv, want_kv, equal_nan=True)


@given(plan=plans(), start=st.integers(0, 10), length=st.integers(0, 10))
def test_round_trip(tmp_path_factory, plan, start, length):
    path = _write(tmp_path_factory.mktemp("rt") / "t.mtrace", plan)
    _check_trace(path, plan, start, start + length)


@given(plan=plans(kind="tokens", big_experts=True))
def test_round_trip_wide_ids(tmp_path_factory, plan):
    """More than 65535 experts: ids (and origins of > 65535 ranks) are stored as int32."""
    path = _write(tmp_path_factory.mktemp("wide") / "t.mtrace", plan)
    with Trace.open(path, require_steps=False) as trace:
        assert trace.header["ids_dtype"] == "<i4"
    _check_trace(path, plan, 0, len(plan.steps))


@given(plan=plans(), cut=st.integers(0, 10), split_timing=st.booleans())
def test_append_continues_a_trace(tmp_path_factory, plan, cut, split_timing):
    """Writing in two sessions (close, reopen with append=True, continue) gives the same trace as one session."""
    path = tmp_path_factory.mktemp("app") / "t.mtrace"
    cut = min(cut, len(plan.order))
    with TraceWriter(path, plan.model, **plan.writer_kwargs()) as w:
        _feed(w, plan, plan.order[:cut])
    with TraceWriter(path, plan.model, **plan.writer_kwargs(), append=True) as w:
        assert w.next_step == sum(1 for what, _ in plan.order[:cut] if what == "step")
        _feed(w, plan, plan.order[cut:])
    _check_trace(path, plan, 0, len(plan.steps))


@given(plan=plans(kind="tokens"), keep=st.integers(1, 200))
def test_append_after_a_cut_drops_the_partial_chunk(tmp_path_factory, plan, keep):
    """A trace whose last chunk was cut short is continued from its last complete chunk."""
    path = tmp_path_factory.mktemp("cut") / "t.mtrace"
    plan.chunk_bytes = 1  # a chunk per step (steps of zero tokens join the next one)
    plan.timings, plan.order = [], [o for o in plan.order if o[0] == "step"]
    _write(path, plan)
    with Trace.open(path, require_steps=False) as trace:
        bounds = [c["dir_start"] - fmt.CHUNK_HEAD.size for c in trace._chunks] + [trace.end_offset]
        in_last = trace._chunks[-1]["num_steps"] if trace._chunks else 0
    if len(bounds) < 2:
        return
    # cut inside the last chunk: the complete chunks before it stay
    last = bounds[-2]
    data = path.read_bytes()
    path.write_bytes(data[:last + min(keep, bounds[-1] - last - 1)])
    kept = len(plan.steps) - in_last
    with Trace.open(path, require_steps=False, allow_truncated=True) as trace:
        assert trace.truncated and "cut short" in trace.truncated
        assert trace.num_steps == kept
    with TraceWriter(path, plan.model, **plan.writer_kwargs(), append=True) as w:
        assert w.next_step == kept
        _feed(w, plan, plan.order[kept:])
    _check_trace(path, plan, 0, len(plan.steps))


def test_append_to_a_missing_file_creates_it(tmp_path):
    model = get_model("tiny")
    path = tmp_path / "new.mtrace"
    with TraceWriter(path, model, append=True) as w:
        w.add_step(np.zeros((2, 3, 2), dtype=np.int64))
    with Trace.open(path) as trace:
        assert trace.num_steps == 1 and trace.num_tokens == 3


@pytest.mark.parametrize("change", [
    {"model": "small"}, {"kind": "counts"}, {"weights": True}, {"origin": True, "num_ranks": 4},
    {"timing_phases": ("a", "b")},
])
def test_append_refuses_a_different_trace(tmp_path, change):
    """Appending with another model, kind or record set would mix chunks the header does not describe."""
    path = tmp_path / "t.mtrace"
    with TraceWriter(path, get_model("tiny")) as w:
        w.add_step(np.zeros((2, 3, 2), dtype=np.int64))
    before = path.read_bytes()
    change = dict(change)
    model = get_model(change.pop("model", "tiny"))
    with pytest.raises(TraceError, match="cannot append"):
        TraceWriter(path, model, append=True, **change)
    assert path.read_bytes() == before


@given(plan=plans())
def test_atomic_writer(tmp_path_factory, plan):
    """atomic=True: nothing at the path until close; then the same trace as a streaming writer gives."""
    d = tmp_path_factory.mktemp("atomic")
    path = d / "t.mtrace"
    w = TraceWriter(path, plan.model, **plan.writer_kwargs(), atomic=True)
    _feed(w, plan, plan.order)
    w.flush()
    assert not path.exists()
    w.close()
    assert sorted(p.name for p in d.iterdir()) == ["t.mtrace"]
    _check_trace(path, plan, 0, len(plan.steps))
    streamed = _write(d / "s.mtrace", plan)
    assert streamed.read_bytes() == path.read_bytes()


def test_atomic_writer_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "t.mtrace"
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError), TraceWriter(path, get_model("tiny"), atomic=True, chunk_bytes=1) as w:
        w.add_step(np.zeros((2, 3, 2), dtype=np.int64))
        raise RuntimeError("boom")
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["t.mtrace"]
    with pytest.raises(TraceError, match="atomic and appended"):
        TraceWriter(path, get_model("tiny"), atomic=True, append=True)


def test_streaming_writer_abort_keeps_complete_steps(tmp_path):
    path = tmp_path / "t.mtrace"
    with pytest.raises(RuntimeError), TraceWriter(path, get_model("tiny")) as w:
        for _ in range(3):
            w.add_step(np.ones((2, 4, 2), dtype=np.int64))
        raise RuntimeError("boom")
    with Trace.open(path) as trace:
        assert trace.num_steps == 3 and trace.truncated is None


def test_layout_is_aligned_and_compact(tmp_path):
    """Every array starts 64-byte aligned (memory-mappable in place); ids take 2 bytes when experts < 65536."""
    model = get_model("tiny")
    path = tmp_path / "t.mtrace"
    rng = np.random.default_rng(0)
    with TraceWriter(path, model, weights=True, origin=True, num_ranks=3, chunk_bytes=300) as w:
        for T in (5, 0, 9, 33, 1):
            w.add_step(rng.integers(0, 8, (2, T, 2)), weights=rng.random((2, T, 2)), origin=rng.integers(0, 3, T))
            w.add_timing(0, 1, 2, [1, 2, 3, 4, 5], [1, 2, 3], [4, 5, 6])
    data = path.read_bytes()
    assert data[:8] == fmt.MAGIC
    with Trace.open(path) as trace:
        assert trace.num_chunks > 1
        for c in trace._chunks:
            assert c["payload"] % fmt.ALIGN == 0
            for _dtype, _shape, off in c["arrays"].values():
                assert (c["payload"] + off) % fmt.ALIGN == 0
            if "ids" in c["arrays"]:
                assert c["arrays"]["ids"][0] == "<u2"
        for chunk in trace.chunks():
            assert chunk.ids.base is not None  # a view of the map, not a copy


@given(experts=st.sampled_from([8, 3000, 70_000]), sizes=st.lists(st.sampled_from([0, 1, 3, 700, 1100]), max_size=8),
       chunk_bytes=st.sampled_from([1, 20_000, 1 << 22]), start=st.integers(0, 8), seed=st.integers(0, 99))
def test_load_of_big_and_small_steps(tmp_path_factory, experts, sizes, chunk_bytes, start, seed):
    """load() counts big steps one by one and groups of small steps together: both equal numpy's count."""
    model = _model(2, experts, 4)
    rng = np.random.default_rng(seed)
    steps = [rng.integers(0, experts, (2, T, 4)) for T in sizes]
    path = tmp_path_factory.mktemp("load") / "t.mtrace"
    with TraceWriter(path, model, chunk_bytes=chunk_bytes) as w:
        for ids in steps:
            w.add_step(ids)
    want = np.zeros((len(steps), 2, experts), dtype=np.int64)
    for i, ids in enumerate(steps):
        for layer in range(2):
            np.add.at(want[i, layer], ids[layer].ravel(), 1)
    with Trace.open(path, require_steps=False) as trace:
        assert np.array_equal(trace.load(), want)
        assert np.array_equal(trace.load(start, start + 3), want[start:start + 3])


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_writer_refuses_a_kv_len_no_cost_model_could_use(tmp_path, bad):
    model = _model(1, 4, 2)
    with TraceWriter(tmp_path / "t.mtrace", model) as w, pytest.raises(MoesimError, match="kv_len"):
        w.add_step(np.zeros((1, 2, 2), np.int64), kv_len=bad)


def test_add_step_copies_unless_handed_over(tmp_path):
    """A caller may reuse its buffer after add_step (the step is copied); one that hands it over (the synthesizer's
    ~1 GB steps) is not copied, and a one-step chunk is written from it as it is."""
    model = get_model("tiny")
    L, k = model.num_layers, model.top_k
    ids = np.arange(L * 5 * k, dtype=np.uint16).reshape(L, 5, k) % model.num_experts
    want = ids.copy()
    for handed in (False, True):
        path = tmp_path / f"h{handed}.mtrace"
        buf = ids.copy()
        with TraceWriter(path, model) as w:
            w.add_step(buf, handed_over=handed)
            assert (w._steps[0][0] is buf) == handed
            if not handed:
                buf[:] = 0  # reused by the caller: the buffered step must not change
        with Trace.open(path) as t:
            assert np.array_equal(t.step(0).ids, want)
