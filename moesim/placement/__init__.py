"""Expert placement: where each logical expert (and each redundant replica) lives, and when to move them.

One entry point, :func:`place`: load [layers × experts] + cluster shape → :class:`PlacementResult`
(the mapping, the algorithm's own seconds, and info such as the MILP gap and the lower bound).
Quality figures (balancedness, imbalance, lower bound) are defined once, in :mod:`moesim.placement.base`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from moesim.mapping import ExpertMapping
from moesim.placement.base import (
    PlacementError,
    PlacementResult,
    balancedness,
    check_cap,
    check_load,
    check_shape,
    enforce_cap,
    gpu_loads,
    imbalance,
    lower_bound,
    read_load,
    slot_loads,
)


def _linear(load: np.ndarray, G: int, N: int, **kw: Any) -> tuple[ExpertMapping, dict]:
    from moesim.placement.simple import linear
    return linear(load, G, N), {}


def _round_robin(load: np.ndarray, G: int, N: int, **kw: Any) -> tuple[ExpertMapping, dict]:
    from moesim.placement.simple import round_robin
    return round_robin(load, G, N), {}


def _greedy(load: np.ndarray, G: int, N: int, *, gpus_per_node: int = 8, **kw: Any) -> tuple[ExpertMapping, dict]:
    from moesim.placement.simple import greedy, spread_nodes
    return spread_nodes(load, greedy(load, G, N), gpus_per_node), {}


def _lpt(load: np.ndarray, G: int, N: int, *, gpus_per_node: int = 8, **kw: Any) -> tuple[ExpertMapping, dict]:
    from moesim.placement.simple import greedy, spread_nodes
    m = greedy(load, G, N, slack=(0.0,), move_limit=0, enum_limit=0)
    m = spread_nodes(load, m, gpus_per_node)
    return ExpertMapping(m.phy2log, G, m.num_experts, {"algo": "lpt"}), {}


def _robust(load: np.ndarray, G: int, N: int, *, gpus_per_node: int = 8, windows: Any = None, beta: float = 0.5,
            delta: float = 0.09, **kw: Any) -> tuple[ExpertMapping, dict]:
    from moesim.placement.robust import robust
    from moesim.placement.simple import spread_nodes
    m, info = robust(load, G, N, windows, beta=beta, delta=delta)
    return spread_nodes(load, m, gpus_per_node), info


def _incremental(load: np.ndarray, G: int, N: int, *, previous: ExpertMapping | None = None,
                 max_swaps: int = 64, gpus_per_node: int = 8, **kw: Any) -> tuple[ExpertMapping, dict]:
    from moesim.placement.simple import incremental
    if previous is None:  # nothing to start from: the fast balanced placement
        return _lpt(load, G, N, gpus_per_node=gpus_per_node)
    if previous.num_slots != N or previous.num_gpus != G or previous.num_experts != load.shape[1]:
        raise PlacementError("incremental: the previous mapping does not match the requested shape")
    return incremental(load, previous, max_swaps), {}


def _eplb_with(policy: str) -> Callable[..., tuple[ExpertMapping, dict]]:
    def run(load: np.ndarray, G: int, N: int, *, gpus_per_node: int = 8, num_groups: int = 1,
            **kw: Any) -> tuple[ExpertMapping, dict]:
        from moesim.placement.eplb import eplb_with_log2phy
        m, log2phy = eplb_with_log2phy(load, G, N, gpus_per_node, num_groups, policy)
        return m, {"policy": m.meta["policy"], "log2phy": log2phy}
    return run


def _milp(load: np.ndarray, G: int, N: int, *, gpus_per_node: int = 8, time_limit: float = 30.0,
          coactivation: Any = None, internode_weight: float = 0.0, **kw: Any) -> tuple[ExpertMapping, dict]:
    from moesim.placement.milp import milp_place
    from moesim.placement.simple import spread_nodes
    co = getattr(coactivation, "same", coactivation)
    m, info = milp_place(load, G, N, time_limit=time_limit, gpus_per_node=gpus_per_node, coactivation=co,
                         internode_weight=internode_weight)
    if internode_weight <= 0:  # node-blind solution: deal its GPUs over nodes and rails like greedy
        m = spread_nodes(load, m, gpus_per_node)
    return m, info


def _affinity(load: np.ndarray, G: int, N: int, *, gpus_per_node: int = 8, coactivation: Any = None,
              cross_weight: float = 0.5, num_groups: int = 1, epsilon: float = 0.005,
              **kw: Any) -> tuple[ExpertMapping, dict]:
    from moesim.placement.affinity import affinity
    from moesim.placement.simple import balance_rails
    m = affinity(load, G, N, gpus_per_node, coactivation, cross_weight=cross_weight, num_groups=num_groups,
                 epsilon=epsilon)
    m = balance_rails(load, m, gpus_per_node)
    return m, {"coactivation": coactivation is not None, "nodes": m.meta.get("nodes"),
               "fallback_layers": m.meta.get("fallback_layers", 0), "spilled_layers": m.meta.get("spilled_layers", 0)}


def _colocate(load: np.ndarray, G: int, N: int, *, gpus_per_node: int = 8, coactivation: Any = None,
              epsilon: float = 0.004, num_groups: int = 1, **kw: Any) -> tuple[ExpertMapping, dict]:
    from moesim.placement.affinity import colocate
    m = colocate(load, G, N, gpus_per_node, coactivation, epsilon=epsilon,
                 num_groups=num_groups)
    return m, {"coactivation": coactivation is not None, "swaps": m.meta.get("swaps", 0),
               "group_start_layers": m.meta.get("grown_layers", 0)}


ALGORITHMS: dict[str, Callable[..., tuple[ExpertMapping, dict]]] = {
    "linear": _linear,
    "round_robin": _round_robin,
    "lpt": _lpt,
    "greedy": _greedy,
    "eplb": _eplb_with("auto"),
    "eplb-global": _eplb_with("global"),
    "eplb-hierarchical": _eplb_with("hierarchical"),
    "milp": _milp,
    "incremental": _incremental,
    "affinity": _affinity,
    "colocate": _colocate,
    "robust": _robust,
}
# this project's own algorithms: they keep the replica cap (≤ G replicas per expert, never two on one GPU);
# linear/round_robin (vLLM) and eplb (DeepSeek's reference) are reproduced as their authors wrote them
CAPPED = frozenset({"lpt", "greedy", "milp", "incremental", "affinity", "colocate", "robust"})


def place(load: np.ndarray, algo: str, *, num_gpus: int, num_slots: int, gpus_per_node: int = 8, seed: int = 0,
          time_limit: float = 30.0, coactivation: Any = None, **kw: Any) -> PlacementResult:
    """Place ``load`` [L, E] on ``num_gpus`` GPUs with ``num_slots`` physical slots per layer (in total).

    ``algo``: one of :data:`ALGORITHMS`. ``seed`` is recorded; every algorithm here is deterministic.
    Extra keywords go to the algorithm (``num_groups`` for eplb, ``internode_weight`` for milp, ...).
    info always holds ``lower_bound`` (mean over layers), ``busiest_over_bound``, ``balancedness``, ``imbalance``.
    """
    if algo not in ALGORITHMS:
        raise PlacementError(f"unknown placement algorithm {algo!r}; known: {', '.join(ALGORITHMS)}")
    load = check_load(load)
    check_shape(load.shape[1], num_gpus, num_slots, gpus_per_node)
    if not (isinstance(time_limit, (int, float)) and np.isfinite(time_limit) and time_limit > 0):
        raise PlacementError(f"time limit must be a positive number of seconds, got {time_limit!r}")
    own = algo in CAPPED
    if own:
        check_cap(load.shape[1], num_gpus, num_slots)
    t0 = time.perf_counter()
    mapping, info = ALGORITHMS[algo](load, num_gpus, num_slots, gpus_per_node=gpus_per_node,
                                     time_limit=time_limit, coactivation=coactivation, seed=seed, **kw)
    info = dict(info)
    log2phy = info.pop("log2phy", None)
    if own:  # safety net; the algorithms themselves keep the cap (tests check they need no repair)
        mapping, info["cap_repaired_layers"] = enforce_cap(load, mapping)
    seconds = time.perf_counter() - t0
    meta = dict(mapping.meta)
    meta.update({"algo": algo, "seed": seed})
    mapping = ExpertMapping(mapping.phy2log, num_gpus, load.shape[1], meta)
    lb = lower_bound(load, num_gpus, num_slots)
    busiest = gpu_loads(load, mapping).max(axis=1)
    info.update({"lower_bound": float(lb.mean()),
                 "busiest_over_bound": float(busiest.sum() / lb.sum()) if lb.sum() > 0 else 1.0,
                 "balancedness": balancedness(load, mapping), "imbalance": imbalance(load, mapping)})
    return PlacementResult(mapping, seconds, info, log2phy)


__all__ = ["ALGORITHMS", "PlacementError", "PlacementResult", "balancedness", "gpu_loads", "imbalance",
           "lower_bound", "place", "read_load", "slot_loads"]
