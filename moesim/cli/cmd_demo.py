"""``moesim demo``: the main job on an embedded default, in seconds, with nothing to download.

Today: a synthetic Mixtral-8x7B-shaped routing trace and its summary. Each step of the demo is a function
taking the output directory, so later stages (replay, placement) can be chained after :func:`demo_trace`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

ORDER = 0

DEMO_MODEL = "mixtral-8x7b"
DEMO_STEPS = 16
DEMO_TOKENS = 2048  # prefill tokens (4 sequences of 512)
DEMO_DECODE_TOKENS = 256  # running sequences during decode


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="run the main job on a built-in example (start here)",
        description=f"Synthesise a {DEMO_MODEL} routing trace ({DEMO_STEPS} steps: one prefill of {DEMO_TOKENS} "
                    f"tokens, then decode steps of {DEMO_DECODE_TOKENS}) into DIR and print its summary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="moesim-demo", help="output directory DIR (created if missing)")
    p.set_defaults(func=_run)


def demo_trace(out_dir: str | Path) -> Path:
    """Write the demo's synthetic trace to ``out_dir/trace.mtrace`` (creating the directory); return its path."""
    from moesim.models import get_model
    from moesim.trace.synth import SynthConfig, synthesize

    out_dir = _ensure_dir(out_dir)
    cfg = SynthConfig(steps=DEMO_STEPS, tokens=DEMO_TOKENS, decode_tokens=DEMO_DECODE_TOKENS, seed=0)
    return synthesize(get_model(DEMO_MODEL), cfg, out_dir / "trace.mtrace")


def _ensure_dir(out_dir: str | Path) -> Path:
    from moesim.errors import MoesimError

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MoesimError(f"demo output {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoesimError(f"cannot create demo directory {out_dir}: {exc.strerror}") from None
    return out_dir


def _run(args: argparse.Namespace) -> int:
    from moesim.cli.cmd_trace import format_stats
    from moesim.trace import Trace
    from moesim.trace.stats import trace_stats

    path = demo_trace(args.out)
    with Trace.open(path) as trace:
        print(format_stats(trace, trace_stats(trace)))
    print(f"\ntrace written to {path}; inspect it with 'moesim trace show {path}'")
    return 0
