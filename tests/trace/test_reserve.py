"""TraceWriter.reserve_step: a step filled in place in the (atomic) trace file's pages writes the same bytes as
add_step of the same arrays; a failure before the step is added leaves no file; the synthetic generator routed
into reserved steps writes the trace it writes without them."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings

from moesim.errors import TraceError
from moesim.models import get_model
from moesim.trace import Trace, TraceWriter
from moesim.trace.synth import CHUNK_TOKENS, SynthConfig, generate_steps
from tests.trace.test_format import Plan, _check_trace, _feed, _write, plans


def _feed_reserving(writer: TraceWriter, plan: Plan) -> int:
    """Feed the plan, taking every step the writer offers room for; returns how many it offered."""
    used = 0
    for what, i in plan.order:
        s = plan.steps[i] if what == "step" else None
        room = writer.reserve_step(s["ids"].shape[1], s["phase"], s["kv_len"]) if s is not None else None
        if room is None:
            _feed(writer, plan, [(what, i)])
            continue
        used += 1
        ids, weights = room
        ids[...] = s["ids"]
        if weights is not None:
            weights[...] = s["weights"]
        assert writer.add_step(ids, weights=s.get("weights") if weights is None else weights,
                               origin=s.get("origin"), phase=s["phase"], kv_len=s["kv_len"]) == i
    return used


@given(plan=plans(kind="tokens"))
@settings(max_examples=60, deadline=None)
def test_reserved_steps_write_the_same_bytes(tmp_path_factory, plan):
    d = tmp_path_factory.mktemp("reserve")
    want = _write(d / "want.mtrace", plan, atomic=True)
    with TraceWriter(d / "got.mtrace", plan.model, **plan.writer_kwargs(), atomic=True) as w:
        _feed_reserving(w, plan)
    assert (d / "got.mtrace").read_bytes() == want.read_bytes()
    _check_trace(d / "got.mtrace", plan, 0, len(plan.steps))


def _steps(T: int, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, 8, (2, T, 2)), "weights": rng.random((2, T, 2)).astype(np.float16),
             "origin": rng.integers(0, 3, T), "phase": "decode", "kv_len": None} for _ in range(n)]


def test_reserve_after_buffered_steps_and_only_where_the_chunk_ends(tmp_path):
    """Buffered steps go first in the reserved chunk; a step too small to close its chunk, a streaming writer or
    an outstanding reservation get no room (or an error)."""
    plan = Plan(get_model("tiny"), "tokens", "float16", True, 3, chunk_bytes=1000)
    plan.steps = _steps(40, 3) + _steps(300, 2, seed=1)  # 320 B steps buffered, then 2400 B steps
    plan.order = [("step", i) for i in range(len(plan.steps))]
    with TraceWriter(tmp_path / "got.mtrace", plan.model, **plan.writer_kwargs(), atomic=True) as w:
        assert _feed_reserving(w, plan) == 3  # the third small step closes its chunk, then the two large ones
    assert (tmp_path / "got.mtrace").read_bytes() == _write(tmp_path / "want.mtrace", plan).read_bytes()
    with TraceWriter(tmp_path / "s.mtrace", plan.model, **plan.writer_kwargs()) as w:
        assert w.reserve_step(300) is None  # streaming: a mapped chunk would be readable before it is complete
    with TraceWriter(tmp_path / "a.mtrace", plan.model, **plan.writer_kwargs(), atomic=True) as w:
        ids, weights = w.reserve_step(300, "decode")
        with pytest.raises(TraceError, match="has not been added"):
            w.reserve_step(300)
        with pytest.raises(TraceError, match="reserved"):
            w.add_step(np.zeros((2, 300, 2), dtype=np.int64), np.zeros((2, 300, 2)), np.zeros(300, np.int64))
        ids[...] = 1
        w.add_step(ids, weights, np.zeros(300, np.int64), "decode")
    with Trace.open(tmp_path / "a.mtrace") as t:
        assert t.num_steps == 1 and (t.step(0).ids == 1).all()


def test_failure_before_the_reserved_step_is_added_leaves_no_file(tmp_path):
    plan = Plan(get_model("tiny"), "tokens", "float16", False, None, chunk_bytes=1)
    path = tmp_path / "t.mtrace"
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError), TraceWriter(path, plan.model, **plan.writer_kwargs(), atomic=True) as w:
        w.add_step(np.zeros((2, 3, 2), dtype=np.int64), np.zeros((2, 3, 2)))
        ids, _ = w.reserve_step(50)
        ids[...] = 1
        raise RuntimeError("boom")  # half-filled
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["t.mtrace"]
    w = TraceWriter(path, plan.model, **plan.writer_kwargs(), atomic=True)
    w.reserve_step(50)
    with pytest.raises(TraceError, match="never added"):
        w.close()  # a reservation never filled is not a trace
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["t.mtrace"]


@pytest.mark.parametrize("threads", [1, 2])
def test_synthetic_steps_routed_into_the_file(tmp_path, threads):
    """generate_steps(room=writer.reserve_step), as synthesize does: large steps (>= 2 * threads chunks) and the
    small ones buffered before them land in reserved chunks; the file equals the one written without room."""
    model = get_model("tiny-deepseek")
    T = 2 * threads * CHUNK_TOKENS
    cfg = SynthConfig(steps=4, tokens=3000, prefill_steps=2, decode_tokens=T, num_ranks=3, seed=5)
    kw = {"weights": True, "origin": True, "num_ranks": 3, "chunk_bytes": 1 << 16, "atomic": True}
    paths = []
    for room in (False, True):
        path = tmp_path / f"room{room}.mtrace"
        with TraceWriter(path, model, **kw) as w:
            offered = []

            def reserve(tokens, phase, w=w, offered=offered):
                got = w.reserve_step(tokens, phase)
                offered.append(got is not None)
                return got
            for ids, weights, origin, phase in generate_steps(model, cfg, threads, compact=True,
                                                              weights_dtype=np.float16,
                                                              room=reserve if room else None):
                w.add_step(ids, weights, origin, phase, handed_over=True)
        assert not room or offered.count(True) >= 2
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
