"""Command-line plumbing shared by ``moesim place`` and ``moesim compare``: load source, window, slot count."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.errors import MoesimError
from moesim.limits import finite_float
from moesim.models import ModelSpec, get_model
from moesim.placement.base import PlacementError, read_load
from moesim.trace.reader import add_allow_truncated


@dataclass
class LoadSource:
    """Where the load came from: a trace (window of steps) or a load file."""

    load: np.ndarray  # [L, E] summed over the window
    model: ModelSpec | None
    trace: Any = None  # an open moesim Trace, or None
    window: tuple[int, int] | None = None
    label: str = ""

    def windows(self, num_windows: int = 8) -> np.ndarray | None:
        """[W, L, E] the fit window's steps in up to ``num_windows`` runs (``robust``'s scenarios); None for a
        load file (one table: nothing to be robust against)."""
        if self.trace is None:
            return None
        from moesim.placement.robust import split_windows

        start, stop = self.window or (0, self.trace.num_steps)
        return split_windows(self.trace.load(start, stop), num_windows)

    def coactivation(self) -> Any:
        if self.trace is None:
            return None
        from moesim.placement.affinity import coactivation_from_trace

        start, stop = self.window or (0, None)
        return coactivation_from_trace(self.trace, start, stop)


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="routing trace (.moetrace) whose expert counts are the load")
    add_allow_truncated(p)
    src.add_argument("--load", help="load file [layers × experts]: .json (list of rows), .csv or .npy")
    p.add_argument("--model", help="model preset (checks a load file's shape; default: the trace's model)")
    p.add_argument("--window", help="trace steps A:B (half-open) to fit on; default: all steps")
    p.add_argument("--topology", required=True, help="preset (dgx-h100), NAME:N nodes (hgx-h800:4) or JSON file")
    from moesim.cli.topology_args import add_topology_flags

    add_topology_flags(p)
    slots = p.add_mutually_exclusive_group()
    slots.add_argument("--slots-per-gpu", type=int, help="physical expert slots per GPU")
    slots.add_argument("--redundant", type=int, help="redundant slots in total (slots = experts + R)")
    p.add_argument("--groups", type=int, help="expert groups for eplb (default: the model's, else 1)")
    p.add_argument("--time-limit", type=finite_float(0.0, 86400.0, open_lo=True), default=30.0,
                   help="seconds for milp (layers run in parallel, each with limit ÷ rounds of layers)")
    p.add_argument("--internode-weight", type=finite_float(0.0), default=0.0,
                   help="milp: weight of co-activated pairs that share no node (needs --trace)")


def parse_window(spec: str | None, num_steps: int) -> tuple[int, int]:
    if not spec:
        return 0, num_steps
    try:
        a, b = spec.split(":")
        start = int(a) if a.strip() else 0
        stop = int(b) if b.strip() else num_steps
    except ValueError:
        raise MoesimError(f"--window must be A:B (steps, half-open), got {spec!r}") from None
    if not 0 <= start < stop <= num_steps:
        raise MoesimError(f"--window {spec} is outside the trace's {num_steps} steps (need 0 ≤ A < B ≤ {num_steps})")
    return start, stop


def open_source(args: argparse.Namespace) -> LoadSource:
    model = get_model(args.model) if args.model else None
    if args.trace:
        from moesim.trace import open_trace

        trace = open_trace(args.trace, args)
        if model is not None and (model.num_layers, model.num_experts) != (trace.model.num_layers,
                                                                          trace.model.num_experts):
            raise MoesimError(f"--model {model.name} does not match the trace's model {trace.model.name}")
        start, stop = parse_window(args.window, trace.num_steps)
        load = trace.load(start, stop).sum(axis=0).astype(np.float64)
        if load.sum() <= 0:
            raise PlacementError(f"trace {args.trace} steps {start}:{stop} route no tokens: nothing to place by")
        return LoadSource(load, trace.model, trace, (start, stop), f"{args.trace} steps {start}:{stop}")
    if args.window:
        raise MoesimError("--window applies to --trace only")
    load = read_load(args.load, model)
    return LoadSource(load, model, None, None, str(args.load))


def resolve_slots(args: argparse.Namespace, num_experts: int, num_gpus: int) -> int:
    """Total slots per layer from --slots-per-gpu / --redundant (default: the fewest that hold every expert)."""
    if args.slots_per_gpu is not None:
        if args.slots_per_gpu < 1:
            raise PlacementError(f"--slots-per-gpu must be positive, got {args.slots_per_gpu}")
        total = args.slots_per_gpu * num_gpus
    elif args.redundant is not None:
        if args.redundant < 0:
            raise PlacementError(f"--redundant must be ≥ 0, got {args.redundant}")
        total = num_experts + args.redundant
        if total % num_gpus:
            raise PlacementError(f"{num_experts} experts + {args.redundant} redundant = {total} slots do not divide "
                                 f"over {num_gpus} GPUs")
    else:
        total = -(-num_experts // num_gpus) * num_gpus
    if total < num_experts:
        raise PlacementError(f"{total} slots ({num_gpus} GPUs × {total // num_gpus}) cannot hold {num_experts} experts")
    if total > num_experts * num_gpus:  # more would put two copies of an expert on one GPU: no use, only memory
        flag = "--slots-per-gpu" if args.slots_per_gpu is not None else "--redundant"
        raise PlacementError(f"{flag} asks for {total} slots per layer; at most {num_experts} experts × {num_gpus} "
                             f"GPUs = {num_experts * num_gpus} can each hold a different copy")
    return total


def algo_kwargs(args: argparse.Namespace, model: ModelSpec | None) -> dict[str, Any]:
    groups = args.groups if args.groups is not None else (model.num_groups if model is not None else 1)
    if groups < 1:
        raise PlacementError(f"--groups must be positive, got {groups}")
    return {"num_groups": groups, "time_limit": args.time_limit, "internode_weight": args.internode_weight}
