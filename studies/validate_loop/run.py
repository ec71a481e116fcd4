"""Simulator vs live runtime: how well does moesim predict a live EP run it was calibrated on another run of?

Question: after fitting the cost model, the network and the per-step overhead on one live run, how close does the
simulator come to the step time of a *second* run — whose expert mapping changes live half-way through?

Method: ``moesim validate`` (moesim/validate.py) several times on this machine: 2 gloo ranks on CPU, the ``small``
runtime preset, 24 steps of 32 sequences per rank, a new mapping from ``eplb`` applied live before step 12; seeds
0..N-1 with the analytic engine, seed 0 again with the discrete-event engine. Then the run-to-run spread of the
machine itself: identical ``moesim run`` invocations back to back, their median decode step.

    python studies/validate_loop/run.py [--quick] [--seeds N]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _study as S

from moesim.validate import ValidateConfig, run_validation

NAME = "validate_loop"


def _extra(p) -> None:
    p.add_argument("--seeds", type=int, default=5, help="validate runs with the analytic engine (seeds 0..N-1)")


def spread(runs: int, steps: int, batch: int, work: Path) -> list[float]:
    """Median decode step (s) of ``runs`` identical live runs: the floor any prediction error sits on."""
    out = []
    for i in range(runs):
        rec = work / f"spread{i}"
        cmd = [sys.executable, "-m", "moesim", "run", "--nproc", "2", "--preset", "small", "--steps", str(steps),
               "--batch", str(batch), "--prompt-len", "16", "--record", str(rec)]
        subprocess.run(cmd, check=True, capture_output=True)
        doc = json.loads((rec / "run.json").read_text())
        out.append(float(np.median([s["wall_s"] for s in doc["steps"][1:]])))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = S.parse_args(NAME, __doc__, argv, extra=_extra)
    clock = S.Clock()
    steps, batch, seeds = (8, 4, 1) if args.quick else (24, 32, args.seeds)
    runs = [(seed, "analytic") for seed in range(seeds)] + ([] if args.quick else [(0, "des")])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed, engine in runs:
            cfg = ValidateConfig(nproc=2, preset="small", algo="eplb", steps=steps, batch=batch, prompt_len=16,
                                 seed=seed, engine=engine, out=str(work / f"{engine}{seed}"), quiet=True)
            rep = run_validation(cfg)
            v = rep["validation"]
            rows.append({"seed": seed, "engine": engine,
                         "measured before ms": 1e3 * v["before"]["step_time_measured_median_s"],
                         "measured after ms": 1e3 * v["after"]["step_time_measured_median_s"],
                         "predicted before ms": 1e3 * v["before"]["step_time_predicted_median_s"],
                         "predicted after ms": 1e3 * v["after"]["step_time_predicted_median_s"],
                         "error of median": v["all"]["median_step_time_rel_error"],
                         "median per-step error": v["all"]["step_time_median_rel_error"],
                         "MoE time error (max rank)": max(max(v[w]["moe_time_rel_error"]) for w in ("before", "after")),
                         "load max/mean measured": v["after"]["busiest_over_mean_load_measured"],
                         "load max/mean predicted": v["after"]["busiest_over_mean_load_predicted"]})
            if seed == 0 and engine == "analytic":
                shutil.copy(work / "analytic0" / "step_time.png", args.out / "step_time_seed0.png")
                S.write_json(args.out / "report_seed0.json", rep)
        floor = spread(2 if args.quick else 4, steps, batch, work)
    S.write_csv(args.out / "validate_loop.csv", rows)
    errs = [r["error of median"] for r in rows]
    text = [f"moesim validate: small on 2 gloo ranks, {steps} steps x {batch} sequences per rank, eplb remap "
            f"before step {steps // 2}", "", S.table(rows), "",
            f"error of the median step time: median {np.median(errs):.1%} over {len(rows)} runs "
            f"(min {min(errs):.1%}, max {max(errs):.1%}); goal <= 15%",
            "identical live runs back to back, median decode step: "
            + ", ".join(f"{1e3 * f:.1f} ms" for f in floor)
            + f" (spread {(max(floor) - min(floor)) / np.median(floor):.0%} of their median)"]
    S.publish(args, NAME, "\n".join(text), clock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
