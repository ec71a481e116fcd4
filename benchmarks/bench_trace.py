"""Trace I/O at scale: write a >= 1 GB routing trace, read it back through moesim's reader, compare with numpy.

    python benchmarks/bench_trace.py                  # 1 GB of DeepSeek-V3 routing in /tmp, then removed
    python benchmarks/bench_trace.py --size-gb 4 --dir /scratch --weights

Shapes are DeepSeek-V3's (58 MoE layers, 256 experts, top-8: 928 bytes of ids per token); the ids are random
(the I/O path does not care how skewed they are), drawn from a small pool of pre-generated steps so that
generation does not dominate the write time. Figures, all with the file in the page cache (it was just written):

- write: TraceWriter throughput (32 MiB chunks, no fsync).
- read: iterate every step with ``Trace.steps()`` and touch its ids and weights (a sum), against the same bytes read raw
  with numpy (the faster of ``np.memmap(...).sum()`` and ``np.fromfile(...).sum()``); the ratio raw/reader
  time is the reader's read speed relative to numpy (goal >= 0.5). Best of --repeat runs; the ratio of
  process CPU times is printed beside it (steadier on a shared machine).
- load: ``Trace.load()`` (token-choices per step, layer and expert: a bincount over every id).
- ``moesim trace info``: wall time of the command (a fresh interpreter) on the file.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moesim.models import get_model
from moesim.trace import Trace, TraceWriter


def write_trace(path: Path, size: float, tokens: int, weights: bool, seed: int) -> tuple[int, float]:
    """Write steps of ``tokens`` random tokens until the file holds ``size`` bytes; return (steps, seconds)."""
    model = get_model("deepseek-v3")
    rng = np.random.default_rng(seed)
    L, E, k = model.num_layers, model.num_experts, model.top_k
    pool = [rng.integers(0, E, (L, tokens, k), dtype=np.uint16) for _ in range(8)]
    wpool = [rng.random((L, tokens, k), dtype=np.float32).astype(np.float16) for _ in range(2)] if weights else None
    per_step = pool[0].nbytes * (2 if weights else 1)
    steps = max(1, int(np.ceil(size / per_step)))
    t0 = time.perf_counter()
    with TraceWriter(path, model, weights=weights, meta={"source": "bench_trace (random ids)"}) as w:
        for i in range(steps):
            w.add_step(pool[i % len(pool)], weights=None if wpool is None else wpool[i % 2],
                       phase="prefill" if i == 0 else "decode")
    return steps, time.perf_counter() - t0


def read_steps(path: Path) -> tuple[int, float, float]:
    """Iterate every step through the reader and sum its ids (and weights); return (checksum, wall s, CPU s)."""
    c0, t0 = time.process_time(), time.perf_counter()
    total = 0
    with Trace.open(path) as trace:
        for step in trace.steps():
            total += int(step.ids.sum(dtype=np.uint64))
            if step.weights is not None:  # the same bytes as the raw side reads: sum the f16 bits
                total += int(step.weights.view(np.uint16).sum(dtype=np.uint64))
            del step
    return total, time.perf_counter() - t0, time.process_time() - c0


def read_raw(path: Path) -> tuple[float, float, float]:
    """The same bytes read raw by numpy: (memmap + sum wall s, its CPU s, fromfile + sum wall s)."""
    nbytes = path.stat().st_size // 2 * 2
    c0, t0 = time.process_time(), time.perf_counter()
    mm = np.memmap(path, dtype=np.uint16, mode="r", shape=(nbytes // 2,))
    int(mm.sum(dtype=np.uint64))
    del mm
    t_map, c_map = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    int(np.fromfile(path, dtype=np.uint16).sum(dtype=np.uint64))
    return t_map, c_map, time.perf_counter() - t0


def load_all(path: Path) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    with Trace.open(path) as trace:
        load = trace.load()
    return load, time.perf_counter() - t0


def trace_info(path: Path) -> tuple[dict, float, float]:
    """Run `moesim trace info PATH --json` in a fresh interpreter: (its JSON, wall s, the child's CPU s)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moesim", "trace", "info", str(path), "--json"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"moesim trace info failed: {proc.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(proc.stdout), seconds, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0, help="trace size in GB (10^9 bytes)")
    ap.add_argument("--dir", default="/tmp", help="where to write the trace (removed afterwards)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step")
    ap.add_argument("--weights", action="store_true", help="also record float16 router weights")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions of each read (best is reported)")
    ap.add_argument("--keep", action="store_true", help="keep the trace file")
    args = ap.parse_args()
    if args.size_gb <= 0 or args.tokens < 1 or args.repeat < 1:
        raise SystemExit("--size-gb, --tokens and --repeat must be positive")
    if not Path(args.dir).is_dir():
        raise SystemExit(f"--dir {args.dir} is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix="moesim-bench-trace-", dir=args.dir))
    path = tmp / "deepseek-v3.mtrace"
    try:
        steps, t_write = write_trace(path, args.size_gb * 1e9, args.tokens, args.weights, seed=0)
        size = path.stat().st_size
        gb = size / 1e9
        print(f"trace      {path}: DeepSeek-V3 shapes, {steps} steps x {args.tokens} tokens, {gb:.2f} GB"
              f"{' (ids + f16 weights)' if args.weights else ' (ids)'}")
        print(f"write      {t_write:.2f} s  ({gb / t_write:.2f} GB/s)")
        read_raw(path)  # warm the page cache the same way for both sides
        raws = [read_raw(path) for _ in range(args.repeat)]
        t_raw = min(min(r[0], r[2]) for r in raws)
        c_raw = min(r[1] for r in raws)
        reads = [read_steps(path) for _ in range(args.repeat)]
        t_read = min(r[1] for r in reads)
        c_read = min(r[2] for r in reads)
        print(f"raw numpy  {t_raw:.2f} s  ({gb / t_raw:.2f} GB/s; memmap+sum {min(r[0] for r in raws):.2f} s, "
              f"fromfile+sum {min(r[2] for r in raws):.2f} s; CPU {c_raw:.2f} s)")
        print(f"reader     {t_read:.2f} s  ({gb / t_read:.2f} GB/s; CPU {c_read:.2f} s) iterating {steps} steps and "
              f"summing their ids{' and weights' if args.weights else ''}")
        print(f"ratio      {t_raw / t_read:.2f} of numpy's raw read speed (goal >= 0.5); by CPU time "
              f"{c_raw / c_read:.2f}")
        load, t_load = min((load_all(path) for _ in range(args.repeat)), key=lambda r: r[1])
        assert load.shape[0] == steps and int(load.sum()) == steps * args.tokens * 58 * 8
        print(f"load()     {t_load:.2f} s  ({gb / t_load:.2f} GB/s, {t_raw / t_load:.2f} of raw) -> "
              f"[{' x '.join(map(str, load.shape))}] token-choices per step, layer and expert")
        info, t_info, c_info = trace_info(path)
        assert info["steps"] == steps and info["layers"] == 58 and info["experts"] == 256 and info["top_k"] == 8
        print(f"trace info {t_info:.2f} s  (CPU {c_info:.2f} s; `moesim trace info PATH --json`, a fresh process; "
              f"{info['tokens']:,} tokens, busiest/mean expert load {max(info['imbalance']):.2f})")
    finally:
        if args.keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
