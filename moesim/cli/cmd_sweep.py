"""``moesim sweep SPEC.toml --out DIR``: a grid of replay / place / compare runs, on local cores or on Ray."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

ORDER = 47


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sweep", help="run a grid of replay / place / compare cells from a TOML spec (process pool or Ray)",
        description="Run every cell of the grid a TOML spec declares (command, fixed options, axes; see "
                    "moesim/sweep/spec.py) with moesim's library code, and write DIR/results.csv and "
                    "DIR/results.parquet (one row per cell: axis values and every figure of the report), each "
                    "cell's report folder under DIR/cells/ and the spec's plots under DIR/plots/. Resumable: "
                    "finished cells (keyed by a hash of their inputs) are not run again. Exit 1 if a cell failed "
                    "(its error is in the table).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("spec", metavar="SPEC.toml", help="the sweep spec")
    p.add_argument("--out", required=True, metavar="DIR", help="folder of the results (reused to resume)")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (default: all cores; "
                                                              "1: run the cells in this process)")
    p.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                   help="run the cells as Ray tasks: on the cluster at ADDRESS (e.g. auto, ray://host:10001), or on "
                        "a new local one without ADDRESS (needs the 'ray' extra)")
    p.add_argument("--retry-failed", action="store_true", help="run failed cells again (default: keep their error)")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is no terminal")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from moesim.sweep import load_spec, run_sweep

    spec = load_spec(args.spec)
    show = args.progress or (sys.stderr.isatty() and not os.environ.get("MOESIM_NO_PROGRESS"))
    res = run_sweep(spec, args.out, workers=args.workers, ray=args.ray, retry_failed=args.retry_failed,
                    progress=show)
    total = len(res.rows)
    print(f"sweep: {total} cells ({res.ran} run, {res.cached} cached, {res.failed} failed) -> "
          f"{args.out}/results.csv" + ("" if res.notes else ", results.parquet")
          + (f", plots/ ({len(spec.plots) - len(res.plot_errors)})" if spec.plots else ""))
    for note in res.notes:
        print(f"moesim: note: {note}", file=sys.stderr)
    for err in res.plot_errors:
        print(f"moesim: error: {err}", file=sys.stderr)
    if res.plot_errors:
        return 2
    if res.failed:
        print(f"moesim: {res.failed} of {total} cells failed; see the status and error columns of "
              f"{args.out}/results.csv", file=sys.stderr)
        return 1
    return 0
