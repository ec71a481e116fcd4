"""``moesim run``: the live EP runtime on this node (wraps torchrun; torch is imported only by the workers)."""

from __future__ import annotations

import argparse
from typing import Any

ORDER = 60


def register(sub: Any) -> None:
    from moesim.runtime.config import add_arguments

    p = sub.add_parser(
        "run", help="run the live expert-parallel runtime (torch.distributed) and record a trace",
        description="Run a Mixtral-architecture MoE model with expert parallelism on N local processes "
                    "(NCCL on GPUs, gloo on CPU): one prefill step then decode steps on random prompts. "
                    "Everything is validated before any process starts.",
        epilog="Multi-node: run 'torchrun ... -m moesim.runtime.worker' with the same options on every node "
               "(see 'python -m moesim.runtime.worker --help').",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) on this node")
    add_arguments(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per rank (0: torchrun's default, 1)")
    p.add_argument("--force", action="store_true", help="replace a recording already in --record DIR")
    p.add_argument("--check-only", action="store_true", help="validate the inputs and exit without running")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from moesim.errors import MoesimError
    from moesim.runtime.config import config_from_args
    from moesim.runtime.launch import launch

    cfg = config_from_args(args, args.nproc)
    rc = launch(cfg, threads=args.threads, check_only=args.check_only, force=args.force)
    if rc != 0:
        raise MoesimError(f"the run failed (torchrun exit code {rc}); see the rank errors above")
    if cfg.record and not args.check_only:
        from moesim.timeline import write_run_timeline

        path = write_run_timeline(cfg.record)  # from the recorded timings, after the run (Perfetto)
        if path is not None:
            print(f"timeline: {path} (open in https://ui.perfetto.dev)")
    return 0
