"""``moesim trace synth`` side by side: this tree against another checkout (the original generator), same command.

    git worktree add --detach /tmp/synth-old a1e0cb9      # the generator before the speed work
    python benchmarks/bench_synth.py --old /tmp/synth-old --tokens 65536 --repeat 3
    python benchmarks/bench_synth.py --old /tmp/synth-old --tokens 524288 --repeat 1   # the acceptance step

Each variant runs as its own process (``python -m moesim.cli ...`` with PYTHONPATH set to its tree), in turn
(old, new, new without numba, old, ...); CPU seconds (user + system, from the kernel's accounting of the finished
child) are the main figure on a shared machine, wall seconds beside them; medians and the old/new ratios.
Then the statistics of the traces each wrote, read back with this tree's reader, to show that the routing means
the same: per-layer load CV across experts and busiest/mean (medians over layers), tokens whose experts repeat,
and tokens routed to more groups than ``topk_groups``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moesim.trace import Trace

HERE = Path(__file__).resolve().parents[1]
ENTRY = "import sys; from moesim.cli import run; sys.argv[0] = 'moesim'; run()"


def run_synth(tree: Path, args: list[str], env_extra: dict[str, str]) -> tuple[float, float, float]:
    """Run ``moesim trace synth ARGS`` with PYTHONPATH=tree; return (user s, system s, wall s) of the child."""
    env = {**os.environ, "PYTHONPATH": str(tree), "MOESIM_MEMORY_BUDGET": "1T", **env_extra}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", ENTRY, "trace", "synth", *args], env=env, capture_output=True,
                          text=True, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"{tree}: moesim trace synth failed: {proc.stderr.strip()[-500:]}")
    return after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, wall


def trace_stats(path: Path) -> dict[str, float]:
    """Summary statistics of a synthetic trace's first step (see the module docstring)."""
    with Trace.open(path) as trace:
        m = trace.model
        ids = trace.step(0).ids.astype(np.int64)  # [L, T, k]
    L = ids.shape[0]
    load = np.stack([np.bincount(ids[layer].ravel(), minlength=m.num_experts) for layer in range(L)])
    s = np.sort(ids, axis=2)
    repeats = int((s[:, :, 1:] == s[:, :, :-1]).any(axis=2).sum())
    over = 0
    if m.num_groups > 1:
        g = np.sort(s // (m.num_experts // m.num_groups), axis=2)
        over = int(((1 + (g[:, :, 1:] != g[:, :, :-1]).sum(axis=2)) > m.topk_groups).sum())
    return {"load CV": float(np.median(load.std(axis=1) / load.mean(axis=1))),
            "busiest/mean": float(np.median(load.max(axis=1) / load.mean(axis=1))),
            "tokens with repeated experts": repeats, "tokens over the group limit": over}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, required=True, help="checkout of the generator to compare with")
    ap.add_argument("--model", default="deepseek-v3")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each variant (the median is reported)")
    ap.add_argument("--no-numpy", action="store_true", help="skip this tree's numpy path (MOESIM_NO_JIT=1)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the traces go (removed afterwards)")
    a = ap.parse_args()
    variants = {"old": (a.old.resolve(), {}), "new": (HERE, {})}
    if not a.no_numpy:
        variants["new numpy"] = (HERE, {"MOESIM_NO_JIT": "1"})
    out = {name: Path(a.dir) / f"bench-synth-{name.replace(' ', '-')}-{os.getpid()}.mtrace" for name in variants}
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    try:
        run_synth(HERE, ["--model", a.model, "--steps", "1", "--tokens", "64", "--out", str(out["new"])], {})
        for _ in range(a.repeat):  # in turn, so a drift of the machine's speed hits every variant alike
            for name, (tree, env) in variants.items():
                times[name].append(run_synth(tree, ["--model", a.model, "--steps", str(a.steps), "--tokens",
                                                    str(a.tokens), "--out", str(out[name])], env))
        print(f"moesim trace synth --model {a.model} --steps {a.steps} --tokens {a.tokens}: median of {a.repeat}")
        med = {name: [statistics.median(x[i] for x in t) for i in range(3)] for name, t in times.items()}
        for name, (user, sys_, wall) in med.items():
            ratio = (med["old"][0] + med["old"][1]) / (user + sys_)
            print(f"  {name:10s} user {user:8.2f} s  sys {sys_:7.2f} s  cpu {user + sys_:8.2f} s  wall {wall:8.2f} s"
                  f"   old/this: cpu {ratio:5.1f}x  wall {med['old'][2] / wall:5.1f}x")
        for name, path in out.items():
            print(f"  {name:10s} " + "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in trace_stats(path).items()))
    finally:
        for path in out.values():
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
