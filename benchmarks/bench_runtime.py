"""Live EP runtime: tokens/s of the two dispatch backends side by side, and the per-phase split from the trace.

    python benchmarks/bench_runtime.py --preset small --nproc 2 4 --steps 12 --batch 8
Runs ``moesim run --record`` for each (nproc, backend), then reads run.json and the trace's timings.
On CPU (gloo) the figures show the protocol's overheads, not GPU speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from moesim.trace import Trace


def one(preset: str, nproc: int, backend: str, steps: int, batch: int, prompt: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "moesim", "run", "--nproc", str(nproc), "--preset", preset, "--backend", backend,
           "--steps", str(steps), "--batch", str(batch), "--prompt-len", str(prompt), "--record", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    run = json.loads((out / "run.json").read_text())
    with Trace.open(out / "trace.mtrace") as t:
        tm = t.timings()
        decode = tm.index[:, 0] >= 1
        share = tm.phases[decode].sum(axis=0)
        share = share / share.sum()
    return {"prefill_tps": run["steps"][0]["tokens_per_s"], "decode_tps": run["summary"]["decode_tokens_per_s"],
            "share": {k: round(float(v), 3) for k, v in zip(tm.phase_names, share)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    a = p.parse_args()
    print(f"{'nproc':>5} {'backend':>9} {'prefill tok/s':>14} {'decode tok/s':>13}  decode time share per phase")
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.nproc:
            res = {}
            for backend in ("all2all", "allgather"):
                out = Path(tmp) / f"{n}-{backend}"
                res[backend] = r = one(a.preset, n, backend, a.steps, a.batch, a.prompt_len, out)
                print(f"{n:5d} {backend:>9} {r['prefill_tps']:14.1f} {r['decode_tps']:13.1f}  {r['share']}")
            ratio = res["all2all"]["decode_tps"] / res["allgather"]["decode_tps"]
            print(f"{n:5d} all2all / allgather decode throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
