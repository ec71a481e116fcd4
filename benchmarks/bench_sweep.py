"""``moesim sweep`` throughput side by side: one process, a local process pool on all cores, Ray on this machine.

    python benchmarks/bench_sweep.py                # 16 replay cells; writes benchmarks/results/bench_sweep.md
    python benchmarks/bench_sweep.py --quick        # 4 small cells (a smoke run), prints only
    python benchmarks/bench_sweep.py --wide         # 64 cells (replica policy and dedup axes too): many cores

The grid is a real study's: a synthetic Mixtral-8x7B trace replayed on 1 and 2 DGX H100 nodes × 1-2 slots per GPU
× analytic/discrete-event engine × ep/ep-tp-attn layout, every cell from scratch into a fresh folder. For each
executor: wall time of the whole sweep (process start-up included; Ray's cluster start-up measured apart),
cells/s, and efficiency vs ideal = speed-up over one process ÷ workers. The tables of all executors are checked
equal (wall-time columns aside). On a shared machine the efficiency also measures the neighbours' load: the load
average is printed beside it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from moesim.io import atomic_write_text
from moesim.models import get_model
from moesim.sweep import load_spec, run_sweep, table
from moesim.trace.synth import SynthConfig, synthesize

SPEC = """\
command = "replay"
description = "bench_sweep: Mixtral-8x7B decode trace on 1-2 DGX H100 nodes"
[options]
trace = "{trace}"
no-plots = true
[axes]
topology = ["dgx-h100", "dgx-h100:2"]
slots-per-gpu = [1, 2]
engine = ["analytic", "des"]
layout = {layouts}
"""


def _run(spec_path: Path, out: Path, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    res = run_sweep(load_spec(spec_path), out, **kw)
    return time.perf_counter() - t0, res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 small cells, no Markdown written")
    ap.add_argument("--wide", action="store_true", help="64 cells: also the replica policy and dedup as axes")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray executor")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_sweep.md")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    steps, tokens = (4, 256) if args.quick else (16, 2048)
    layouts = '["ep"]' if args.quick else '["ep", "ep-tp-attn"]'
    rows, tables = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        tmp = Path(tmp)
        synthesize(get_model("mixtral-8x7b"), SynthConfig(steps=steps, tokens=tokens, decode_tokens=tokens,
                                                          prefill_steps=0, num_ranks=16, seed=0),
                   tmp / "mix.mtrace")
        spec = tmp / "spec.toml"
        text = SPEC.format(trace=tmp / "mix.mtrace", layouts=layouts)
        if args.quick:
            text = text.replace('engine = ["analytic", "des"]', 'engine = ["analytic"]')
        elif args.wide:
            text += 'policy = ["round_robin", "local"]\nno-dedup = [false, true]\n'
        spec.write_text(text)
        n = len(load_spec(spec).cells)
        print(f"{n} cells; {cores} cores; load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
        wall1, res1 = _run(spec, tmp / "one", workers=1)
        cell_sum = sum(r.get("wall.cell_s") or 0 for r in res1.rows)
        rows.append(("1 process (in the sweep's process)", 1, wall1, None, res1))
        tables["one"] = table.deterministic(res1.columns, res1.rows)
        wallp, resp = _run(spec, tmp / "pool", workers=cores)
        rows.append((f"process pool, {cores} workers (spawned)", cores, wallp, None, resp))
        tables["pool"] = table.deterministic(resp.columns, resp.rows)
        if not args.no_ray:
            try:
                import logging

                import ray
            except ImportError:
                print("Ray not installed: its row is skipped", file=sys.stderr)
            else:
                t0 = time.perf_counter()
                ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
                t_init = time.perf_counter() - t0
                try:
                    workers = int(ray.cluster_resources().get("CPU", cores))
                    wallr, resr = _run(spec, tmp / "ray", ray=True)
                finally:
                    ray.shutdown()
                rows.append((f"Ray, local cluster ({workers} CPUs)", workers, wallr, t_init, resr))
                tables["ray"] = table.deterministic(resr.columns, resr.rows)
    same = all(t == tables["one"] for t in tables.values())
    base = n / wall1
    lines = [f"# moesim sweep throughput ({'quick' if args.quick else 'full'} run)", "",
             f"`python benchmarks/bench_sweep.py{' --quick' if args.quick else ''}` on {platform.machine()}, "
             f"{cores} cores (shared with other jobs; load average {os.getloadavg()[0]:.1f} at the end), "
             f"Python {platform.python_version()}. Grid: {n} `replay` cells (Mixtral-8x7B, {steps} decode steps × "
             f"{tokens} tokens; 1-2 DGX H100 nodes × 1-2 slots/GPU × analytic/DES × layouts {layouts}"
             f"{' × replica policy × dedup' if args.wide else ''}). "
             f"Sum of the cells' own times in one process: {cell_sum:.1f} s.", "",
             "| executor | workers | wall (s) | cells/s | speed-up vs 1 process | efficiency vs ideal | start-up (s) |",
             "|---|---|---|---|---|---|---|"]
    for label, workers, wall, init, _res in rows:
        rate = n / wall
        lines.append(f"| {label} | {workers} | {wall:.1f} | {rate:.2f} | {rate / base:.2f}× | "
                     f"{rate / base / workers:.0%} | {'-' if init is None else f'{init:.1f} (ray.init, apart)'} |")
    lines += ["", f"Tables equal across executors (wall-time columns aside): {'yes' if same else 'NO'}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
