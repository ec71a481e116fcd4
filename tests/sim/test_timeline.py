"""Perfetto timelines: integer microseconds, touching slices touch exactly, the live run's record drawn per rank."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.models import get_model
from moesim.timeline import chrome_trace, run_timeline, us, write_run_timeline
from moesim.trace import Trace, TraceWriter


def _tracks(doc):
    by = defaultdict(list)
    for e in doc["traceEvents"]:
        if e["ph"] == "X":
            by[e["tid"]].append((e["ts"], e["dur"], e["name"]))
    return {k: sorted(v) for k, v in by.items()}


@given(st.lists(st.floats(1e-9, 5e-3, allow_nan=False), min_size=1, max_size=40), st.floats(0, 10))
@settings(max_examples=60, deadline=None)
def test_back_to_back_slices_never_overlap(durations, start):
    """Slices laid end to end in seconds: integer ts/dur, each ends exactly where the next begins."""
    edges = start + np.concatenate([[0.0], np.cumsum(durations)])
    doc = chrome_trace([(0, f"s{i}", float(a), float(b)) for i, (a, b) in enumerate(itertools.pairwise(edges))],
                       ["GPU 0"], "t")
    sl = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert all(isinstance(e["ts"], int) and isinstance(e["dur"], int) and e["dur"] >= 0 for e in sl)
    for a, b in itertools.pairwise(sl):
        assert a["ts"] + a["dur"] == b["ts"]
    assert sl[-1]["ts"] + sl[-1]["dur"] == us(edges[-1])


def test_replay_timeline_has_no_overlaps(tmp_path, capsys):
    from moesim.cli import main

    src = tmp_path / "t.mtrace"
    assert main(["trace", "synth", "--model", "tiny", "--steps", "3", "--tokens", "64", "--decode-tokens", "8",
                 "--ranks", "8", "--out", str(src)]) == 0
    for engine in ("analytic", "des"):
        out = tmp_path / engine
        assert main(["replay", "--trace", str(src), "--topology", "dgx-h100", "--engine", engine, "--out", str(out),
                     "--quiet"]) == 0
        tracks = _tracks(json.loads((out / "timeline.json").read_text()))
        touching = 0
        for slices in tracks.values():
            for (ts, dur, _), (nts, _, _) in itertools.pairwise(slices):
                assert ts + dur <= nts
                touching += ts + dur == nts
        assert touching > 0  # e.g. attention then gate on each GPU


def _run_trace(path):
    """A run-like trace: 2 steps, tiny (2 layers), 2 ranks, timings in whole microseconds."""
    spec = get_model("tiny")
    rng = np.random.default_rng(0)
    sec = rng.integers(1, 50, (2, 2, 2, 5)) * 1e-6  # [step, layer, rank, phase]
    with TraceWriter(path, spec, origin=True, num_ranks=2) as w:
        for s in range(2):
            ids = np.array([[rng.choice(8, 2, replace=False) for _ in range(4)] for _ in range(2)])
            w.add_step(ids, origin=np.array([0, 0, 1, 1]), phase="prefill" if s == 0 else "decode")
            for layer in range(2):
                for r in range(2):
                    w.add_timing(s, layer, r, sec[s, layer, r].tolist())
    return sec


def test_run_timeline_lays_each_ranks_phases_end_to_end(tmp_path):
    sec = _run_trace(tmp_path / "trace.mtrace")
    walls = [0.01, 0.02]
    with Trace.open(tmp_path / "trace.mtrace") as trace:
        doc = run_timeline(trace, walls)
    tracks = _tracks(doc)
    assert set(tracks) == {0, 1}
    names = [e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"]
    assert names == ["rank 0", "rank 1"]
    markers = [(e["name"], e["ts"]) for e in doc["traceEvents"] if e["ph"] == "i"]
    assert markers == [("step 0 (prefill)", 0), ("step 1 (decode)", 10_000)]
    for r in (0, 1):
        slices = tracks[r]
        assert [n for _, _, n in slices[:5]] == ["attention", "gate", "dispatch", "expert", "combine"]
        for s, t0 in ((0, 0), (1, 10_000)):
            mine = [x for x in slices if t0 <= x[0] < t0 + 10_000]
            assert mine[0][0] == t0  # the step starts with this rank's first phase
            for a, b in itertools.pairwise(mine):
                assert a[0] + a[1] == b[0]  # end to end, no gap, no overlap
            assert sum(d for _, d, _ in mine) == round(sec[s, :, r].sum() * 1e6)
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert {(e["args"]["step"], e["args"]["layer"]) for e in xs} == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_write_run_timeline_uses_run_json_walls(tmp_path):
    _run_trace(tmp_path / "trace.mtrace")
    (tmp_path / "run.json").write_text(json.dumps({"steps": [{"wall_s": 0.5}, {"wall_s": 0.25}]}))
    path = write_run_timeline(tmp_path)
    doc = json.loads(path.read_text())
    assert [e["ts"] for e in doc["traceEvents"] if e["ph"] == "i"] == [0, 500_000]
    assert write_run_timeline(tmp_path / "nothing") is None


@pytest.mark.dist
def test_moesim_run_record_writes_a_timeline(tmp_path):
    """`moesim run --record` (no --profile): timeline.json from the recorded timings, one track per rank."""
    import subprocess
    import sys

    from tests.runtime.test_cli import ENV

    out = tmp_path / "rec"
    proc = subprocess.run([sys.executable, "-m", "moesim", "run", "--nproc", "2", "--preset", "tiny", "--steps", "2",
                           "--record", str(out)], env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "timeline:" in proc.stdout
    doc = json.loads((out / "timeline.json").read_text())
    tracks = _tracks(doc)
    assert set(tracks) == {0, 1}
    assert len([e for e in doc["traceEvents"] if e["ph"] == "i"]) == 2
    for slices in tracks.values():
        for (ts, dur, _), (nts, _, _) in itertools.pairwise(slices):
            assert ts + dur <= nts
