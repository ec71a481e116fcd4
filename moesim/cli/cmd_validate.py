"""``moesim validate``: live run → fit → place → live remap → measured vs predicted."""

from __future__ import annotations

import argparse
from typing import Any

ORDER = 70


def register(sub: Any) -> None:
    p = sub.add_parser(
        "validate", help="check the simulator against the live runtime, before and after a live remap",
        description="One live run with linear placement, recorded; it pauses before the remap step while moesim "
                    "fits the cost model, network and per-step overhead on the first (calibration) steps and "
                    "computes a new mapping with --algo from the recorded load; the run applies it live and goes on. "
                    "Then the simulator predicts every step and the held-out ones are compared with what was "
                    "measured. Writes DIR/report.json, DIR/report.md, DIR/step_time.png and the run in DIR/run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="ranks (processes) on this node")
    p.add_argument("--preset", default="small", help="model preset the runtime supports (tiny, small, ...)")
    p.add_argument("--algo", default="eplb", help="placement algorithm for the new mapping")
    p.add_argument("--steps", type=int, default=96, help="steps of the live run (one prefill, then decode)")
    p.add_argument("--remap-at", type=int, help="step before which the new mapping goes live (default: half-way)")
    p.add_argument("--calibrate-steps", type=int,
                   help="fit on steps 0..N-1 only (default: half of the steps before the remap)")
    p.add_argument("--batch", type=int, default=64,
                   help="sequences per rank (enough tokens that compute, not gloo latency jitter, dominates)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per sequence")
    p.add_argument("--slots-per-gpu", type=int, help="expert slots per rank (more than experts/nproc: redundant)")
    p.add_argument("--backend", default="all2all", choices=("all2all", "allgather"))
    p.add_argument("--engine", default="analytic", choices=("analytic", "des"))
    from moesim.cli.cmd_comm import add_comm_argument

    add_comm_argument(p)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--roofline-device", help="datasheet of the uncalibrated roofline reported beside the calibrated "
                   "prediction (h100, h200, ...; default: cpu, or this machine's GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--quiet", action="store_true", help="hide the runs' per-step output")
    p.add_argument("--out", default="moesim-validate", help="output directory")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from moesim.cli.cmd_comm import check_comm_args
    from moesim.errors import MoesimError
    from moesim.validate import ValidateConfig, print_summary, run_validation

    check_comm_args(args)
    if args.nproc < 1:
        raise MoesimError(f"--nproc must be positive, got {args.nproc}")
    cfg = ValidateConfig(nproc=args.nproc, preset=args.preset, algo=args.algo, steps=args.steps,
                         remap_at=args.remap_at, calibrate_steps=args.calibrate_steps, batch=args.batch,
                         prompt_len=args.prompt_len, seed=args.seed,
                         backend=args.backend, slots_per_gpu=args.slots_per_gpu, engine=args.engine,
                         device=args.device, roofline_device=args.roofline_device, threads=args.threads,
                         out=args.out, quiet=args.quiet,
                         comm=args.comm, dispatch_dtype=args.dispatch_dtype, combine_dtype=args.combine_dtype)
    report = run_validation(cfg)
    print_summary(report)
    print(f"report: {args.out}/report.md, {args.out}/report.json")
    return 0
