"""``moesim replay``: replay a routing trace on a modelled cluster and report where the time goes.

The parser is built by :func:`add_arguments` and the inputs by :func:`prepare`, so other commands (and the
rebalancing replay) reuse exactly the same options and checks. ``--rebalance POLICY`` hands the replay to
:func:`moesim.placement.rebalance.replay_with_rebalance` (imported only then).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moesim.trace.reader import add_allow_truncated

ORDER = 30


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every replay option (shared with commands that replay too)."""
    p.add_argument("--trace", required=True, metavar="T", help="routing trace (.mtrace; token or load-only)")
    add_allow_truncated(p)
    p.add_argument("--topology", required=True, metavar="P",
                   help="cluster: a preset (dgx-h100, dgx-h200, hgx-h800, pcie-8gpu), NAME:N for N nodes "
                        "(e.g. dgx-h100:8; options as dgx-h100:8,nics=4,nic-bw=25), or a topology JSON file")
    from moesim.cli.topology_args import add_topology_flags

    add_topology_flags(p)
    p.add_argument("--mapping", metavar="M.json",
                   help="expert mapping (moesim or SGLang JSON); default: linear placement over the topology's GPUs")
    p.add_argument("--slots-per-gpu", type=int, default=None,
                   help="slots per GPU of the default linear placement (default: experts / GPUs rounded up; "
                        "extra slots replicate experts 0, 1, ...)")
    p.add_argument("--layout", choices=("ep", "ep-tp-attn", "tp"), default="ep",
                   help="ep: all-to-all dispatch/combine, DP attention; ep-tp-attn: EP experts beside TP "
                        "attention (reduce-scatter/all-gather); tp: every expert sharded, all-reduce")
    p.add_argument("--engine", choices=("analytic", "des"), default="analytic",
                   help="analytic (vectorised, busiest link/GPU) or des (discrete-event, flow-level network)")
    p.add_argument("--policy", choices=("vllm", "position", "local", "round_robin"), default="position",
                   help="which replica of a redundant expert serves a token (moesim.replica; the runtime's "
                        "policies): vllm (vLLM today: hash of the token's index in its rank's batch), position "
                        "(token position in the step mod replicas; 'round_robin' is its old name), local (nearest "
                        "replicas)")
    p.add_argument("--cost", default="roofline", metavar="roofline|fit|CALIB.json",
                   help="cost model: roofline of the topology's device, fit to the trace's recorded timings, a "
                        "kernels/calibrate.py JSON, or a saved cost model JSON")
    p.add_argument("--context-len", type=int, default=1024, help="attention context of the roofline cost model")
    p.add_argument("--weight-dtype", metavar="D", help="weights stored as D for the cost model and expert moves: bf16, "
                                                     "fp8 (per-tensor scale), fp8-block (128x128 float32 scales), "
                                                     "fp16, fp32 (default: the trace's model)")
    p.add_argument("--kv-dtype", metavar="D", help="KV cache stored as D (bf16, fp8, ...; default: the trace's model)")
    p.add_argument("--steps", metavar="A:B", help="replay steps A..B-1 only (either side may be empty)")
    p.add_argument("--no-dedup", action="store_true",
                   help="dispatch a token once per chosen expert instead of once per destination GPU")
    from moesim.cli.cmd_comm import add_comm_argument, add_fixed_argument

    add_comm_argument(p)
    add_fixed_argument(p)
    p.add_argument("--overlap", action="store_true", help="overlap communication with compute (two micro-batches)")
    p.add_argument("--no-dense", action="store_true", help="charge only the MoE part (no attention/gate/dense layers)")
    p.add_argument("--rebalance", metavar="POLICY",
                   help="re-place experts while replaying: static | periodic:interval=N,window=W | "
                        "threshold:balancedness=X,window=W (moesim.placement.rebalance)")
    p.add_argument("--rebalance-algo", default="robust", metavar="ALGO",
                   help="placement algorithm for --rebalance (robust: drift-aware, fitted against the window's steps)")
    p.add_argument("--rebalance-max-swaps", type=int, default=None, metavar="N",
                   help="with --rebalance-algo incremental: at most N swaps per layer at each rebalance (a move "
                        "budget; default: the algorithm's, 64)")
    p.add_argument("--rebalance-overlap", action="store_true",
                   help="expert moves overlap compute (no stall); default: blocking, each move charged as a stall")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for report.json, steps.csv, "
                                                                 "timeline.json and the PNG plots")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--progress", action="store_true", help="show a progress bar even when stderr is not a terminal")
    p.add_argument("--quiet", action="store_true", help="do not print the table")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "replay", help="replay a routing trace on a modelled cluster (analytic or discrete-event engine)",
        description="Replay a routing trace over a modelled GPU cluster under an expert mapping and a parallel "
                    "layout; print step latency, throughput, MoE share, load imbalance, bytes and the busiest "
                    "link, and write report.json, steps.csv, a Chrome-trace timeline.json (Perfetto) and plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_run)


@dataclass
class ReplayInputs:
    trace: Any
    topology: Any
    mapping: Any
    cost: Any
    model: Any
    config: Any
    start: int
    stop: int
    inputs: dict[str, Any]


def parse_steps(spec: str | None, num_steps: int) -> tuple[int, int]:
    """``A:B`` (either side optional, negative counts from the end) -> (start, stop) inside the trace."""
    from moesim.errors import MoesimError

    if not spec:
        return 0, num_steps
    parts = spec.split(":")
    if len(parts) != 2:
        raise MoesimError(f"--steps {spec!r}: expected A:B (e.g. 0:100, 50:, :-10)")
    try:
        a = int(parts[0]) if parts[0].strip() else 0
        b = int(parts[1]) if parts[1].strip() else num_steps
    except ValueError:
        raise MoesimError(f"--steps {spec!r}: A and B must be integers") from None
    a, b = (a + num_steps if a < 0 else a), (b + num_steps if b < 0 else b)
    if not 0 <= a < b <= num_steps:
        raise MoesimError(f"--steps {spec!r} is empty or outside the trace's {num_steps} steps")
    return a, b


def _cost(spec: str, trace: Any, model: Any, topology: Any, context_len: int) -> Any:
    from moesim.cost import COST_FORMAT, CostModel
    from moesim.errors import MoesimError
    from moesim.io import read_json

    if spec == "roofline":
        return CostModel.roofline(model, topology.device, context_len=context_len)
    if spec == "fit":
        timings = trace.timings()
        if len(timings) == 0:
            raise MoesimError(f"--cost fit: trace {trace.path} holds no recorded timings")
        cost, _info = CostModel.fit(timings, model, topology.device)
        return cost
    path = Path(spec)
    if not path.exists():
        raise MoesimError(f"--cost {spec!r}: not roofline, fit, or an existing JSON file")
    data = read_json(path, "cost model")
    if isinstance(data, dict) and data.get("format") == COST_FORMAT:
        return CostModel.from_dict(data)
    return CostModel.from_calibration(path, model, topology.device, context_len=context_len)


def prepare(args: argparse.Namespace) -> ReplayInputs:
    """Open and check every input; one-line MoesimError for anything wrong. The caller closes ``trace``."""
    from moesim.cli.cmd_comm import check_comm_args
    from moesim.cli.topology_args import topology_from_args
    from moesim.errors import MoesimError
    from moesim.mapping import ExpertMapping
    from moesim.placement import ALGORITHMS
    from moesim.replica import ReplicaPolicy
    from moesim.sim.config import SimConfig
    from moesim.sim.fixed import load_fixed
    from moesim.trace import open_trace

    check_comm_args(args)
    if args.rebalance_algo not in ALGORITHMS:
        raise MoesimError(f"--rebalance-algo {args.rebalance_algo!r} is not a placement algorithm; known: "
                          f"{', '.join(ALGORITHMS)}")
    topology = topology_from_args(args)
    trace = open_trace(args.trace, args)
    try:
        from moesim.models import with_dtypes

        model = with_dtypes(trace.model, getattr(args, "weight_dtype", None), getattr(args, "kv_dtype", None))
        G = topology.num_gpus
        if args.mapping:
            mapping = ExpertMapping.load(args.mapping, model=model, num_gpus=G)
            mapping_source = str(args.mapping)
        else:
            if args.slots_per_gpu is not None and not 1 <= args.slots_per_gpu <= model.num_experts:
                raise MoesimError(f"--slots-per-gpu must be 1..{model.num_experts} (the model's experts: more would "
                                  f"put two copies of one expert on a GPU), got {args.slots_per_gpu}")
            spg = args.slots_per_gpu
            if spg is None and model.num_experts % G:
                spg = -(-model.num_experts // G)  # round up: the extra slots replicate the first experts
            mapping = ExpertMapping.linear(model.num_layers, model.num_experts, G, spg)
            mapping_source = f"linear ({mapping.slots_per_gpu} slots per GPU)"
        start, stop = parse_steps(args.steps, trace.num_steps)
        config = SimConfig(layout=args.layout, policy=ReplicaPolicy(args.policy, topology.gpus_per_node),
                           dedup=not args.no_dedup, include_dense=not args.no_dense, overlap_comm=args.overlap,
                           dense_layers=not args.no_dense, comm=args.comm, dispatch_dtype=args.dispatch_dtype,
                           combine_dtype=args.combine_dtype, fixed=load_fixed(args.fixed))
        if args.context_len < 0:
            raise MoesimError("--context-len must be >= 0")
        cost = _cost(args.cost, trace, model, topology, args.context_len)
    except BaseException:
        trace.close()
        raise
    inputs = {"trace": str(args.trace), "trace_kind": trace.kind, "model": model.name, "topology": args.topology,
              "topology_name": topology.name, "num_gpus": G, "mapping": mapping_source,
              "slots_per_gpu": mapping.slots_per_gpu, "layout": args.layout, "engine": args.engine,
              "steps": [start, stop], "config": config.to_dict(), "cost_model": cost.to_dict(),
              "rebalance": args.rebalance, "trace_truncated": trace.truncated}
    return ReplayInputs(trace, topology, mapping, cost, model, config, start, stop, inputs)


class ProgressBar:
    """A one-line stderr bar: ``[#####.....] 50/100 steps 1.2 s``; silent unless enabled."""

    def __init__(self, enabled: bool, label: str = "replay") -> None:
        self.enabled, self.label = enabled, label
        self.t0 = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        width = 30
        fill = int(width * done / max(total, 1))
        sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} steps "
                         f"{now - self.t0:.1f} s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def rebalance_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The placement keywords of ``--rebalance-*`` (checked: a move budget needs the incremental rebalancer)."""
    from moesim.errors import MoesimError

    n = getattr(args, "rebalance_max_swaps", None)
    if n is None:
        return {}
    if n < 1:
        raise MoesimError(f"--rebalance-max-swaps must be >= 1, got {n}")
    if args.rebalance_algo != "incremental":
        raise MoesimError("--rebalance-max-swaps applies to --rebalance-algo incremental only")
    return {"max_swaps": n}


def execute(args: argparse.Namespace, progress: Any = False) -> dict[str, Any]:
    """Replay as the options say and write the report into ``args.out``; return the report's summary.

    What ``moesim replay`` runs and what a ``moesim sweep`` cell runs (no printing here).
    """
    from moesim.errors import MoesimError
    from moesim.io import atomic_dir
    from moesim.sim import simulate
    from moesim.sim.report import write_report

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MoesimError(f"--out {out} exists and is not a directory")
    if args.engine == "des":
        try:
            import moesim.sim.des  # noqa: F401
        except ImportError as exc:
            raise MoesimError(f"the discrete-event engine is not available ({exc})") from None
    place_kw = rebalance_kwargs(args) if args.rebalance else {}
    r = prepare(args)
    try:
        if args.rebalance:
            from moesim.placement.rebalance import replay_with_rebalance

            result, schedule = replay_with_rebalance(r.trace, r.topology, r.cost, r.model, r.mapping, args.rebalance,
                                                     args.rebalance_algo, r.config, args.engine, start=r.start,
                                                     stop=r.stop, blocking=not args.rebalance_overlap,
                                                     place_kw=place_kw)
            r.inputs["rebalance_algo"] = args.rebalance_algo
            if place_kw:
                r.inputs["rebalance_place_kw"] = place_kw
            r.inputs["rebalance_blocking"] = not args.rebalance_overlap
            r.inputs["rebalance_schedule"] = [{"step": int(e.step), "moved_bytes": float(e.moved_bytes),
                                               "seconds": float(e.seconds)} for e in schedule]
        else:
            result = simulate(r.trace, r.topology, r.mapping, r.cost, r.model, r.config, engine=args.engine,
                              start=r.start, stop=r.stop, progress=progress)
    finally:
        r.trace.close()
    with atomic_dir(out, previous=("report.json",)) as tmp:  # the folder holds this run alone, or the last one
        return write_report(result, tmp, r.inputs, r.topology, plots=not args.no_plots)


def _run(args: argparse.Namespace) -> int:
    from moesim.sim.report import format_table

    bar = ProgressBar(args.progress or (sys.stderr.isatty() and not os.environ.get("MOESIM_NO_PROGRESS")))
    summary = execute(args, progress=bar if bar.enabled else False)
    if not args.quiet:
        print(format_table(summary))
        print(f"wrote {args.out}/report.json, steps.csv, timeline.json" + ("" if args.no_plots else
                                                                             ", load_heatmap.png, step_latency.png"))
    return 0
