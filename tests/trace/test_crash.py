"""A writer killed with SIGKILL mid-trace leaves every complete chunk readable, equal to what it wrote.

The child process writes seeded steps forever (small chunks, no fsync); the test kills it once several chunks
are on disk, then reads the file back: every step before the cut equals its regeneration from the seed, the
reader says what was cut, and an appending writer continues the trace from its last complete chunk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moesim.errors import TraceError
from moesim.models import get_model
from moesim.trace import Trace, TraceWriter

MODEL = "small"
SEED = 1234
RANKS = 4

CHILD = f"""
import sys
import time
import numpy as np
from moesim.models import get_model
from moesim.trace import TraceWriter
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from test_crash import make_step

class SlowDisk:  # lands each write in 4 KiB pieces with pauses: a kill mostly finds a chunk half-written

    def __init__(self, f):
        self.f = f

    def write(self, data):
        data = memoryview(data).cast("B")
        for i in range(0, len(data), 4096):
            self.f.write(data[i:i + 4096])
            self.f.flush()
            time.sleep(0.0002)

    def __getattr__(self, name):
        return getattr(self.f, name)


model = get_model({MODEL!r})
with TraceWriter(sys.argv[1], model, weights=True, origin=True, num_ranks={RANKS}, chunk_bytes=1 << 15) as w:
    if sys.argv[2] == "slow":
        w._file = SlowDisk(w._file)
    i = 0
    while True:
        ids, weights, origin, phase = make_step(model, i)
        w.add_step(ids, weights=weights, origin=origin, phase=phase)
        if i % 7 == 0:
            w.add_timing(i, i % model.num_layers, i % {RANKS}, [i, 1, 2, 3, 4], [1, 2], [i, i + 1])
        i += 1
"""


def make_step(model, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Step ``i`` of the crash test, regenerated identically from the seed in the child and in the test."""
    rng = np.random.default_rng([SEED, i])
    T = int(rng.integers(0, 200))
    ids = rng.integers(0, model.num_experts, (model.num_layers, T, model.top_k))
    return ids, rng.random(ids.shape).astype(np.float16), rng.integers(0, RANKS, T), ("prefill" if i % 5 else "decode")


def _kill_when(proc: subprocess.Popen, path: Path, size: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size >= size):
        if proc.poll() is not None:
            raise AssertionError(f"writer exited early: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("writer made no progress")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _check_prefix(path: Path) -> int:
    model = get_model(MODEL)
    with Trace.open(path, allow_truncated=True) as trace:  # what a killed writer left: its complete chunks
        assert trace.truncated is None or "cut short" in trace.truncated
        n = trace.num_steps
        assert n > 0 and trace.num_chunks >= 2
        for step in trace.steps():
            ids, weights, origin, phase = make_step(model, step.index)
            assert np.array_equal(step.ids, ids) and np.array_equal(step.weights, weights)
            assert np.array_equal(step.origin, origin) and step.phase == phase
        t = trace.timings()
        assert len(t) and set(t.index[:, 0] % 7) == {0} and (t.phases[:, 0] == t.index[:, 0]).all()
        assert (t.index[:, 0] < n).all()  # a record travels in the chunk flushed after its step
        expected = np.zeros((n, model.num_layers, model.num_experts), dtype=np.int64)
        for i in range(n):
            ids = make_step(model, i)[0]
            for layer in range(model.num_layers):
                expected[i, layer] = np.bincount(ids[layer].ravel(), minlength=model.num_experts)
        assert np.array_equal(trace.load(), expected)
        assert trace.validate() == ([trace.truncated] if trace.truncated else [])
    return n


@pytest.mark.parametrize("kill_at, disk", [(200_000, "fast"), (333_333, "slow")])
def test_sigkill_mid_write_keeps_every_complete_chunk(tmp_path, kill_at, disk):
    path = tmp_path / "crash.mtrace"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), disk], stderr=subprocess.PIPE, env=env)
    _kill_when(proc, path, kill_at)
    n = _check_prefix(path)

    # a new recorder continues where the complete chunks end
    model = get_model(MODEL)
    with TraceWriter(path, model, weights=True, origin=True, num_ranks=RANKS, append=True) as w:
        assert w.next_step == n
        for i in range(n, n + 5):
            ids, weights, origin, phase = make_step(model, i)
            w.add_step(ids, weights=weights, origin=origin, phase=phase)
    with Trace.open(path) as trace:
        assert trace.truncated is None and trace.num_steps == n + 5
        for step in trace.steps(n):
            ids, weights, origin, phase = make_step(model, step.index)
            assert np.array_equal(step.ids, ids) and np.array_equal(step.weights, weights)


def test_every_cut_point_of_a_file(tmp_path):
    """Cutting a trace at any byte leaves exactly the chunks that end before the cut."""
    model = get_model(MODEL)
    path = tmp_path / "full.mtrace"
    with TraceWriter(path, model, weights=True, origin=True, num_ranks=RANKS, chunk_bytes=1 << 12) as w:
        for i in range(12):
            ids, weights, origin, phase = make_step(model, i)
            w.add_step(ids, weights=weights, origin=origin, phase=phase)
    data = path.read_bytes()
    with Trace.open(path) as trace:
        ends = [c["payload"] + c["payload_len"] for c in trace._chunks]
        firsts = [c["first_step"] + c["num_steps"] for c in trace._chunks]
    cut = tmp_path / "cut.mtrace"
    rng = np.random.default_rng(0)
    for size in sorted(set(rng.integers(ends[0], len(data), 60).tolist()) | set(ends)):
        cut.write_bytes(data[:size])
        complete = sum(e <= size for e in ends)
        if size not in ends:
            with pytest.raises(TraceError, match="cut short"):
                Trace.open(cut)  # refused unless asked for
        with Trace.open(cut, allow_truncated=True) as trace:
            assert trace.num_chunks == complete and trace.num_steps == firsts[complete - 1]
            assert (trace.truncated is None) == (size in ends)
            last = trace.step(trace.num_steps - 1)
            assert np.array_equal(last.ids, make_step(model, trace.num_steps - 1)[0])
