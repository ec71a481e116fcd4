"""``moesim demo``: the main job on an embedded default, in seconds, with nothing to download.

DeepSeek-V3 served with EP32 on four DGX H100 nodes, 9 expert slots per GPU (32 redundant experts: DeepSeek's
published prefill deployment, see ../shared/DESIGN.md): a synthetic routing trace → a replay of the default
linear placement on the cluster model → placement algorithms side by side, fitted on the first steps and scored
on the steps after them. Each stage is a function of the output directory, so they can be reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

ORDER = 0

DEMO_MODEL = "deepseek-v3"
DEMO_TOPOLOGY = "dgx-h100:4"  # 32 GPUs
DEMO_SLOTS_PER_GPU = 9  # 288 slots for 256 experts: DeepSeek's prefill EP32 layout
DEMO_STEPS = 12
DEMO_TOKENS = 4096  # prefill tokens of the first step
DEMO_DECODE_TOKENS = 512  # running sequences during decode
DEMO_ALGOS = "linear,round_robin,eplb,greedy"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="run the main job on a built-in example (start here)",
        description=f"Synthesise a {DEMO_MODEL} routing trace ({DEMO_STEPS} steps: a prefill of {DEMO_TOKENS} "
                    f"tokens, then decode steps of {DEMO_DECODE_TOKENS}), replay it on {DEMO_TOPOLOGY} with linear "
                    f"placement ({DEMO_SLOTS_PER_GPU} slots per GPU), and compare placement algorithms "
                    f"({DEMO_ALGOS}). Everything lands in DIR.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="moesim-demo", help="output directory DIR (created if missing)")
    p.set_defaults(func=_run)


def demo_trace(out_dir: str | Path) -> Path:
    """Write the demo's synthetic trace to ``out_dir/trace.mtrace`` (creating the directory); return its path."""
    from moesim.models import get_model
    from moesim.trace.synth import SynthConfig, synthesize

    out_dir = _ensure_dir(out_dir)
    gpus = 8 * int(DEMO_TOPOLOGY.split(":")[1])
    cfg = SynthConfig(steps=DEMO_STEPS, tokens=DEMO_TOKENS, decode_tokens=DEMO_DECODE_TOKENS, num_ranks=gpus,
                      seed=0)
    return synthesize(get_model(DEMO_MODEL), cfg, out_dir / "trace.mtrace")


def demo_replay(out_dir: str | Path, trace: Path) -> int:
    """Replay the trace with linear placement: step time, where it goes, load imbalance, bytes, links."""
    from moesim.cli import main

    return main(["replay", "--trace", str(trace), "--topology", DEMO_TOPOLOGY, "--slots-per-gpu",
                 str(DEMO_SLOTS_PER_GPU), "--out", str(Path(out_dir) / "replay")])


def demo_compare(out_dir: str | Path, trace: Path) -> int:
    """Placement algorithms side by side, on the fitted window and on held-out steps."""
    from moesim.cli import main

    return main(["compare", "--trace", str(trace), "--topology", DEMO_TOPOLOGY, "--slots-per-gpu",
                 str(DEMO_SLOTS_PER_GPU), "--algos", DEMO_ALGOS, "--out", str(Path(out_dir) / "compare")])


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

    print(f"== 1/3 a synthetic {DEMO_MODEL} routing trace ({DEMO_STEPS} steps)")
    path = demo_trace(args.out)
    with Trace.open(path) as trace:
        summary = format_stats(trace, trace_stats(trace)).split("\n\n")[0]  # without the per-layer table
    print(summary)
    print(f"\n== 2/3 replay on {DEMO_TOPOLOGY} with linear placement, {DEMO_SLOTS_PER_GPU} slots per GPU")
    rc = demo_replay(args.out, path)
    if rc:
        return rc
    print(f"\n== 3/3 placement algorithms on {DEMO_TOPOLOGY}")
    rc = demo_compare(args.out, path)
    if rc:
        return rc
    print(f"\nnext: 'moesim trace show {path}', 'moesim replay --help', 'moesim place --help', "
          f"'moesim run --nproc 2' (live runtime), 'moesim validate' (simulator vs live runtime)")
    return 0
