"""Rebalancing over time: when to recompute the mapping, what moving the experts costs, and a replay.

Policies (``parse_policy``):
- ``static``: the initial mapping for the whole trace;
- ``periodic:interval=N,window=W``: every N steps, re-place from the load of the last W steps (vLLM's EPLB:
  ``step_interval`` and ``window_size``; its defaults are 3000 and 1000 steps);
- ``threshold:balancedness=X,window=W[,cooldown=C]``: after each step, if the balancedness (base.balancedness,
  vLLM's Σ mean / Σ max) of the current mapping on the last W steps' load is below X, re-place from those W
  steps; at most once per C steps (default W).

A rebalance at step t takes effect from step t. Cost: the new mapping is first matched to the old one —
nodes, then GPUs within nodes, relabelled to overlap the old mapping most (``match_gpus``), and on every GPU
slots keep the experts they already hold (``align``) — then every (GPU, expert) replica the GPU
did not hold before is fetched whole (``expert_bytes``) from a GPU that held that expert: one on the same node
if there is one, else the lowest-numbered holder (``migration_matrix``; a GPU adding a replica of an expert
it already holds copies it locally: the diagonal, counted in the moved bytes but not sent). The [G, G] byte
matrix of all layers is sent over the topology at once; its time is ``moesim.sim.analytic.comm_time``.
Blocking: the time is
added to step t as a stall. Overlapped: the bytes are recorded, no stall (the copy hides behind compute).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesim.errors import MoesimError
from moesim.mapping import ExpertMapping
from moesim.placement.base import balancedness


@dataclass(frozen=True)
class RebalancePolicy:
    kind: str = "static"  # static | periodic | threshold
    interval: int = 100
    window: int = 50
    balancedness: float = 0.8
    cooldown: int | None = None

    def describe(self) -> str:
        if self.kind == "static":
            return "static"
        if self.kind == "periodic":
            return f"periodic:interval={self.interval},window={self.window}"
        return f"threshold:balancedness={self.balancedness},window={self.window},cooldown={self.gap}"

    @property
    def gap(self) -> int:
        return self.window if self.cooldown is None else self.cooldown


@dataclass
class ScheduleEntry:
    """One mapping change: from ``step`` on, ``mapping``; ``moved_bytes`` sent, taking ``seconds``."""

    step: int
    mapping: ExpertMapping
    moved_bytes: float
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def parse_policy(spec: str) -> RebalancePolicy:
    """``static`` | ``periodic:interval=100,window=50`` | ``threshold:balancedness=0.8,window=50[,cooldown=50]``."""
    if not isinstance(spec, str) or not spec.strip():
        raise MoesimError("rebalance policy must be static, periodic:... or threshold:...")
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    if kind not in ("static", "periodic", "threshold"):
        raise MoesimError(f"unknown rebalance policy {kind!r}; use static, periodic:interval=N,window=W or "
                          "threshold:balancedness=X,window=W")
    params: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        m = re.fullmatch(r"([a-z_]+)=([^=]+)", part)
        if not m:
            raise MoesimError(f"rebalance policy {spec!r}: expected key=value, got {part!r}")
        params[m.group(1)] = m.group(2)
    allowed = {"static": set(), "periodic": {"interval", "window"},
               "threshold": {"balancedness", "window", "cooldown"}}[kind]
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise MoesimError(f"rebalance policy {kind}: unknown parameter(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(allowed)) or 'none'}")
    out: dict[str, Any] = {}
    for key, value in params.items():
        try:
            out[key] = float(value) if key == "balancedness" else int(value)
        except ValueError:
            raise MoesimError(f"rebalance policy {kind}: {key} must be a number, got {value!r}") from None
    pol = RebalancePolicy(kind, **out)
    if pol.interval < 1 or pol.window < 1 or (pol.cooldown is not None and pol.cooldown < 1):
        raise MoesimError(f"rebalance policy {spec!r}: interval, window and cooldown must be positive")
    if not 0 < pol.balancedness <= 1:
        raise MoesimError(f"rebalance policy {spec!r}: balancedness must be in (0, 1]")
    return pol


# -- moving experts -----------------------------------------------------------------------------------
def align(old: ExpertMapping, new: ExpertMapping) -> ExpertMapping:
    """``new`` with each GPU's slots permuted so that experts the GPU already held keep their old slots.

    The set of (GPU, expert) replicas is unchanged, so the load and the bytes to move are those of ``new``;
    only slot indices change, and as few of them as possible.
    """
    _check_pair(old, new)
    S = new.slots_per_gpu
    out = new.phy2log.copy()
    for layer in range(new.num_layers):
        for g in range(new.num_gpus):
            o = list(old.phy2log[layer, g * S:(g + 1) * S])
            want = list(new.phy2log[layer, g * S:(g + 1) * S])
            row: list[int | None] = [None] * S
            for s, e in enumerate(o):
                if e in want:
                    want.remove(e)
                    row[s] = e
            free = iter(want)
            out[layer, g * S:(g + 1) * S] = [e if e is not None else next(free) for e in row]
    return ExpertMapping(out, new.num_gpus, new.num_experts, dict(new.meta))


def match_gpus(old: ExpertMapping, new: ExpertMapping, gpus_per_node: int = 8) -> ExpertMapping:
    """``new`` with whole nodes, then whole GPUs within each node, relabelled to keep the most of ``old`` in place.

    A placement algorithm treats GPUs (and nodes) as interchangeable, so its output is only defined up to such
    a relabelling; picking the one that overlaps ``old`` most (two assignment problems, scipy's
    linear_sum_assignment, per layer) leaves every GPU's load, node membership of co-located experts and the
    balance unchanged while moving far fewer experts.
    """
    from scipy.optimize import linear_sum_assignment

    _check_pair(old, new)
    G, E, S = new.num_gpus, new.num_experts, new.slots_per_gpu
    gpn = gpus_per_node if G % gpus_per_node == 0 else G
    M = G // gpn
    gpu = np.repeat(np.arange(G), S)
    out = new.phy2log.reshape(new.num_layers, G, S).copy()
    for layer in range(new.num_layers):
        h_old = np.zeros((G, E))
        h_new = np.zeros((G, E))
        np.add.at(h_old, (gpu, old.phy2log[layer]), 1)
        np.add.at(h_new, (gpu, new.phy2log[layer]), 1)
        # node level: overlap of the (GPU-summed) expert counts
        n_old = h_old.reshape(M, gpn, E).sum(axis=1)
        n_new = h_new.reshape(M, gpn, E).sum(axis=1)
        over = np.minimum(n_new[:, None, :], n_old[None, :, :]).sum(axis=2)  # [M new, M old]
        rows, cols = linear_sum_assignment(-over)
        node_to = np.empty(M, dtype=np.int64)
        node_to[rows] = cols
        blocks = new.phy2log[layer].reshape(G, S)
        for mn in range(M):
            mo = node_to[mn]
            gn = np.arange(mn * gpn, (mn + 1) * gpn)
            go = np.arange(mo * gpn, (mo + 1) * gpn)
            ov = np.minimum(h_new[gn][:, None, :], h_old[go][None, :, :]).sum(axis=2)
            r, c = linear_sum_assignment(-ov)
            out[layer, go[c]] = blocks[gn[r]]
        # nodes first, then GPUs, is not a joint optimum: never return more moves than no relabelling at all
        h_rel = np.zeros((G, E))
        np.add.at(h_rel, (gpu, out[layer].ravel()), 1)
        if np.maximum(h_rel - h_old, 0).sum() > np.maximum(h_new - h_old, 0).sum():
            out[layer] = blocks
    return ExpertMapping(out.reshape(new.num_layers, -1), G, E, dict(new.meta))


def changed_pairs(old: ExpertMapping, new: ExpertMapping) -> int:
    """(layer, GPU, replica) entries of ``new`` that the GPU did not hold in ``old`` (multiset difference)."""
    _check_pair(old, new)
    return int(sum(_arrivals(old, new, layer).sum() for layer in range(new.num_layers)))


def _arrivals(old: ExpertMapping, new: ExpertMapping, layer: int) -> np.ndarray:
    """[G, E] replicas of each expert that each GPU must receive in ``layer``."""
    G, E, S = new.num_gpus, new.num_experts, new.slots_per_gpu
    gpu = np.repeat(np.arange(G), S)
    have = np.zeros((G, E), dtype=np.int64)
    need = np.zeros((G, E), dtype=np.int64)
    np.add.at(have, (gpu, old.phy2log[layer]), 1)
    np.add.at(need, (gpu, new.phy2log[layer]), 1)
    return np.maximum(need - have, 0)


def migration_matrix(old: ExpertMapping, new: ExpertMapping, expert_bytes: float,
                     gpus_per_node: int = 8) -> np.ndarray:
    """[G, G] bytes each GPU sends each GPU to turn ``old`` into ``new`` (all layers; see the module docstring)."""
    _check_pair(old, new)
    G, S = new.num_gpus, new.slots_per_gpu
    out = np.zeros((G, G))
    node = np.arange(G) // gpus_per_node
    for layer in range(new.num_layers):
        arr = _arrivals(old, new, layer)
        if not arr.any():
            continue
        holders = [np.unique(np.nonzero(old.phy2log[layer] == e)[0] // S) for e in range(new.num_experts)]
        for g, e in zip(*np.nonzero(arr)):
            h = holders[e]
            if g in h:  # a second replica of an expert the GPU holds: local copy
                out[g, g] += arr[g, e] * expert_bytes
                continue
            near = h[node[h] == node[g]]
            src = int(near[0]) if len(near) else int(h[0])
            out[src, g] += arr[g, e] * expert_bytes
    return out


def _check_pair(old: ExpertMapping, new: ExpertMapping) -> None:
    if old.phy2log.shape != new.phy2log.shape or old.num_gpus != new.num_gpus or old.num_experts != new.num_experts:
        raise MoesimError(f"mappings differ in shape: {old.phy2log.shape} on {old.num_gpus} GPUs vs "
                          f"{new.phy2log.shape} on {new.num_gpus} GPUs")


ROBUST_WINDOWS = 4  # runs of steps a rebalance window is split into for the default `robust` re-placement


# -- when to rebalance --------------------------------------------------------------------------------
def plan(step_load: np.ndarray, initial: ExpertMapping, policy: RebalancePolicy,
         replace: Callable[..., ExpertMapping], gpus_per_node: int = 8,
         with_steps: bool = False) -> list[tuple[int, ExpertMapping]]:
    """Walk the steps; return [(step, aligned new mapping)] where ``policy`` rebalances.

    step_load [S, L, E] token-choices per step; ``replace(window_load [L, E], current)`` computes a new mapping
    (``with_steps``: ``replace(window_load, current, (lo, t))``, the window's steps, for ``robust``).
    """
    S = len(step_load)
    out: list[tuple[int, ExpertMapping]] = []
    if policy.kind == "static" or S == 0:
        return out
    csum = np.concatenate([np.zeros((1,) + step_load.shape[1:]), np.cumsum(step_load, axis=0, dtype=np.float64)])
    current = initial
    last = -10**18
    for t in range(1, S):
        lo = max(0, t - policy.window)
        if policy.kind == "periodic":
            due = t % policy.interval == 0
        else:
            if t - last < policy.gap or t < min(policy.window, S):
                continue
            window = csum[t] - csum[lo]
            due = window.sum() > 0 and balancedness(window, current) < policy.balancedness
        if not due:
            continue
        fresh = replace(csum[t] - csum[lo], current, (lo, t)) if with_steps else replace(csum[t] - csum[lo], current)
        new = align(current, match_gpus(current, fresh, gpus_per_node))
        if new != current:
            out.append((t, new))
            current = new
        last = t
    return out


def replay_with_rebalance(trace: Any, topology: Any, cost: Any, model: Any, initial: ExpertMapping,
                          policy: RebalancePolicy | str, algo: str = "robust", config: Any = None,
                          engine: str = "analytic", blocking: bool = True, start: int = 0, stop: int | None = None,
                          place_kw: dict[str, Any] | None = None) -> tuple[Any, list[ScheduleEntry]]:
    """Simulate ``trace`` steps start..stop-1, re-placing with ``algo`` as ``policy`` says, charging migration.

    Returns (SimResult of all steps, with stalls added where blocking; the schedule of mapping changes).
    The default ``robust`` is drift-aware: each re-placement is fitted against the window's steps in up to
    ``ROBUST_WINDOWS`` runs (placement.robust), not only their sum, since the placement is judged on the steps
    that follow the window.
    """
    from moesim.placement import place
    from moesim.sim import simulate
    from moesim.sim.analytic import comm_time
    from moesim.sim.result import SimResult

    if isinstance(policy, str):
        policy = parse_policy(policy)
    stop = trace.num_steps if stop is None else min(stop, trace.num_steps)
    if not 0 <= start < stop:
        raise MoesimError(f"replay steps {start}:{stop} are outside the trace's {trace.num_steps} steps")
    kw = dict(place_kw or {})
    if algo.startswith("eplb"):
        kw.setdefault("num_groups", model.num_groups)
    gpn = getattr(topology, "gpus_per_node", 8)
    step_load = trace.load(start, stop)

    def replace(window_load: np.ndarray, current: ExpertMapping, steps: tuple[int, int]) -> ExpertMapping:
        extra: dict[str, Any] = {"previous": current} if algo == "incremental" else {}
        if algo == "robust":
            from moesim.placement.robust import split_windows

            extra["windows"] = split_windows(step_load[steps[0]:steps[1]], ROBUST_WINDOWS)
        return place(window_load, algo, num_gpus=initial.num_gpus, num_slots=initial.num_slots,
                     gpus_per_node=gpn, **kw, **extra).mapping

    changes = plan(step_load, initial, policy, replace, gpn, with_steps=True)
    kwargs = {} if config is None else {"config": config}
    results, schedule = [], []
    bounds = [0] + [t for t, _ in changes] + [stop - start]
    mappings = [initial] + [m for _, m in changes]
    for i, mapping in enumerate(mappings):
        a, b = start + bounds[i], start + bounds[i + 1]
        results.append(simulate(trace, topology, mapping, cost, model, engine=engine, start=a, stop=b, **kwargs))
    result = SimResult.concat(results) if len(results) > 1 else results[0]
    for i, (t, mapping) in enumerate(changes):
        mat = migration_matrix(mappings[i], mapping, model.expert_bytes, gpn)
        moved = float(mat.sum())
        net = mat.copy()
        np.fill_diagonal(net, 0.0)
        seconds = float(comm_time(topology, net)) if net.any() else 0.0
        if blocking and moved:
            result.add_stall(start + t, seconds, moved, f"rebalance ({algo})")
        schedule.append(ScheduleEntry(start + t, mapping, moved, seconds,
                                      {"blocking": blocking, "pairs": changed_pairs(mappings[i], mapping)}))
    result.extra.setdefault("rebalance", {"policy": policy.describe(), "algo": algo, "blocking": blocking,
                                          "events": [{"step": s.step, "moved_bytes": s.moved_bytes,
                                                      "seconds": s.seconds, **s.info} for s in schedule]})
    return result, schedule


# -- hook for `moesim replay` ---------------------------------------------------------------------------
def add_rebalance_arguments(parser: Any) -> None:
    """Options for a replay command: --rebalance POLICY, --rebalance-algo A, --rebalance-overlap."""
    parser.add_argument("--rebalance", default=None, metavar="POLICY",
                        help="static | periodic:interval=N,window=W | threshold:balancedness=X,window=W[,cooldown=C]")
    parser.add_argument("--rebalance-algo", default="robust",
                        help="placement algorithm used at each rebalance (default robust: drift-aware, fitted "
                             "against the window's steps in runs)")
    parser.add_argument("--rebalance-overlap", action="store_true",
                        help="expert moves overlap compute (no stall); default: blocking, charged as a stall")


def replay_from_args(args: Any, trace: Any, topology: Any, cost: Any, model: Any, mapping: ExpertMapping,
                     config: Any = None, engine: str = "analytic", start: int = 0,
                     stop: int | None = None) -> tuple[Any, list[ScheduleEntry]]:
    """What a replay command calls when ``args.rebalance`` is set (validates before simulating)."""
    from moesim.placement import ALGORITHMS, PlacementError

    policy = parse_policy(args.rebalance)
    algo = getattr(args, "rebalance_algo", "robust")
    if algo not in ALGORITHMS:
        raise PlacementError(f"unknown placement algorithm {algo!r} for --rebalance-algo; known: "
                             f"{', '.join(ALGORITHMS)}")
    return replay_with_rebalance(trace, topology, cost, model, mapping, policy, algo, config, engine,
                                 blocking=not getattr(args, "rebalance_overlap", False), start=start, stop=stop)
