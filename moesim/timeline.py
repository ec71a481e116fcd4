"""Perfetto (Chrome trace-event JSON) timelines: one writer for the simulator's replay and the live run's record.

Why one writer: both draw phases as slices on one track per GPU/rank, and both must not let rounding make slices
overlap. Every instant is rounded once to an integer microsecond; a slice from ``a`` to ``b`` seconds gets
``ts = us(a)`` and ``dur = us(b) - us(a)``, so a slice that ends where the next begins ends exactly at the next
one's ``ts`` (rounding ``ts`` and ``dur`` separately let them overlap by up to a microsecond). Open the files in
https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Slice = tuple[int, str, float, float]  # (track, name, start s, end s)


def us(t: float) -> int:
    """Seconds → integer microseconds (the one rounding every instant goes through)."""
    return round(float(t) * 1e6)


def chrome_trace(slices: Iterable[Slice], tracks: Sequence[str], label: str, *,
                 markers: Iterable[tuple[str, float]] = (), args: Iterable[dict[str, Any] | None] | None = None,
                 other: dict[str, Any] | None = None, order: Sequence[int] | None = None) -> dict[str, Any]:
    """Trace-event JSON: pid 0, track ``i`` named ``tracks[i]`` (drawn in ``order[i]`` position, default ``i``),
    complete events ("X") for ``slices``, global instant events ("i") for ``markers`` (name, time s); ``args``
    (one per slice, optional) go on the slices."""
    out: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": label}}]
    for i, name in enumerate(tracks):
        out.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": i, "args": {"name": name}})
        out.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": i,
                    "args": {"sort_index": i if order is None else int(order[i])}})
    arg_iter = iter(args) if args is not None else None
    for tid, name, a, b in slices:
        ts = us(a)
        ev = {"name": str(name), "cat": "phase", "ph": "X", "pid": 0, "tid": int(tid), "ts": ts,
              "dur": max(us(b) - ts, 0)}
        extra = next(arg_iter) if arg_iter is not None else None
        if extra:
            ev["args"] = extra
        out.append(ev)
    for name, t in markers:
        out.append({"name": str(name), "cat": "step", "ph": "i", "s": "g", "pid": 0, "tid": 0, "ts": us(t)})
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": dict(other or {})}


def run_timeline(trace: Any, step_wall: Sequence[float] | None = None) -> dict[str, Any]:
    """The timeline of a recorded live run: one track per rank, each (layer, phase) timing record a slice, laid
    end to end in phase order from the step's start; a marker at each step's start.

    ``trace``: the run's :class:`moesim.trace.Trace` (timings [step, layer, rank] x phases, seconds).
    ``step_wall``: each step's measured wall time (run.json); a step starts where the previous one's wall time
    ended (without it: where the previous step's busiest rank finished). The gap between a rank's last slice and
    the next step is time the timers did not cover (synchronisation, sampling, recording).
    """
    tm = trace.timings()
    S, L = trace.num_steps, trace.model.num_layers
    R = int(trace.num_ranks or (int(tm.index[:, 2].max()) + 1 if len(tm) else 1))
    P = len(tm.phase_names)
    sec = np.zeros((S, L, R, P))
    if len(tm):
        s, layer, r = (tm.index[:, i].astype(np.int64) for i in range(3))
        ok = (s < S) & (layer < L) & (r < R)
        np.add.at(sec, (s[ok], layer[ok], r[ok]), tm.phases[ok])
    busy = sec.sum(axis=(1, 3))  # [S, R]
    if step_wall is not None and len(step_wall) < S:
        step_wall = None
    slices: list[Slice] = []
    args: list[dict[str, Any]] = []
    markers: list[tuple[str, float]] = []
    t0 = 0.0
    phases = [st.phase for st in trace.steps()]
    for step in range(S):
        markers.append((f"step {step}" + (f" ({phases[step]})" if phases[step] else ""), t0))
        for rank in range(R):
            t = t0
            for layer in range(L):
                for p in range(P):
                    d = float(sec[step, layer, rank, p])
                    if d > 0:
                        slices.append((rank, tm.phase_names[p], t, t + d))
                        args.append({"step": step, "layer": layer})
                        t += d
        t0 += float(step_wall[step]) if step_wall is not None else float(busy[step].max(initial=0.0))
    tracks = [f"rank {r}" for r in range(R)]
    return chrome_trace(slices, tracks, "moesim run", markers=markers, args=args,
                        other={"source": "moesim run (recorded timings)", "steps": S, "slices": len(slices)})


def write_run_timeline(record_dir: str | Path) -> Path | None:
    """Write ``record_dir/timeline.json`` from ``trace.mtrace`` and ``run.json``; None when there is no trace
    with timings there."""
    import json

    from moesim.io import atomic_write_text, read_json
    from moesim.trace import Trace

    record = Path(record_dir)
    if not (record / "trace.mtrace").is_file():
        return None
    walls = None
    if (record / "run.json").is_file():
        steps = read_json(record / "run.json", "run record").get("steps") or []
        walls = [float(s.get("wall_s") or 0.0) for s in steps]
    with Trace.open(record / "trace.mtrace") as trace:
        if not len(trace.timings()):
            return None
        doc = run_timeline(trace, walls)
    out = record / "timeline.json"
    atomic_write_text(out, json.dumps(doc, separators=(",", ":")) + "\n")
    return out
