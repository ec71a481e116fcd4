"""The simulator: replay a routing trace on a modelled cluster under an expert mapping and a parallel layout.

``simulate`` is the one entry point: it builds the :class:`~moesim.sim.workload.Workload` (in windows of steps,
so long traces stay within memory), adjusts the cost model to the layout
(:func:`~moesim.sim.analytic.layout_cost`) and runs the analytic or the discrete-event engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moesim.errors import MoesimError
from moesim.sim.config import LAYOUTS, SimConfig
from moesim.sim.result import SimResult
from moesim.sim.workload import Workload, build_workload, check_mapping, workload_from_counts, workload_from_ids

ENGINES = ("analytic", "des")
# memory budget of one window of the workload (send_tokens dominates: steps × layers × G² floats)
WINDOW_BYTES = 256 * 2**20

__all__ = ["ENGINES", "LAYOUTS", "SimConfig", "SimResult", "Workload", "build_workload", "simulate",
           "window_steps", "workload_from_counts", "workload_from_ids"]


def window_steps(num_layers: int, num_gpus: int, slots: int, budget: int = WINDOW_BYTES) -> int:
    """Steps per workload window so that one window's arrays stay within ``budget`` bytes."""
    per_step = 8 * num_layers * (num_gpus * num_gpus + slots + num_gpus) * 3  # arrays + engine temporaries
    return max(1, budget // max(per_step, 1))


def _engine(name: str) -> Callable[..., SimResult]:
    if name == "analytic":
        from moesim.sim.analytic import run_analytic

        return run_analytic
    if name == "des":
        try:
            from moesim.sim.des import run_des
        except ImportError as exc:
            raise MoesimError(f"the discrete-event engine is not available ({exc})") from None
        return run_des
    raise MoesimError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")


def simulate(trace_or_workload: Any, topology: Any, mapping: Any, cost: Any, model: Any,
             config: SimConfig | None = None, engine: str = "analytic", start: int = 0, stop: int | None = None,
             progress: bool | Callable[[int, int], None] = False) -> SimResult:
    """Replay steps ``start .. stop-1`` of a trace (or a prepared Workload) and return the engine's SimResult.

    ``progress``: a callable ``(steps_done, steps_total)`` called as steps finish (False: none).
    """
    from moesim.sim.analytic import layout_cost

    config = config or SimConfig()
    run = _engine(engine)
    G = int(topology.num_gpus)
    if mapping is not None and mapping.num_gpus != G:
        raise MoesimError(f"mapping is for {mapping.num_gpus} GPUs but topology {topology.name!r} has {G}")
    if mapping is not None:
        check_mapping(mapping, model)
    cost = layout_cost(cost, config.layout, G)
    report = progress if callable(progress) else None

    def one(wl: Workload, done: int, total: int) -> SimResult:
        if engine == "des":
            cb = (lambda i, _n: report(done + i, total)) if report else None
            res = run(wl, topology, cost, model, config, progress=cb)
        else:
            res = run(wl, topology, cost, model, config)
            if report:
                report(done + wl.num_steps, total)
        return res

    if isinstance(trace_or_workload, Workload):
        wl = trace_or_workload
        if wl.layout != config.layout:
            raise MoesimError(f"workload was built for layout {wl.layout!r}, config says {config.layout!r}")
        if stop is not None or start:
            wl = wl.window(start, wl.num_steps if stop is None else stop)
        return one(wl, 0, wl.num_steps)
    trace = trace_or_workload
    if mapping is None:
        raise MoesimError("simulating a trace needs an expert mapping")
    n = trace.num_steps
    stop = n if stop is None else stop
    if not (0 <= start < stop <= n):
        raise MoesimError(f"step range {start}:{stop} is not inside the trace's {n} steps (0:{n})")
    slots = mapping.phy2log.shape[1] if config.layout != "tp" else G * mapping.num_experts
    win = window_steps(model.num_layers, G, slots)
    if engine == "analytic":  # per-token traces: also bound the token arrays of one window
        win = min(win, max(1, int(2**24 // max(1, model.num_layers * model.top_k * _mean_tokens(trace)))))
    results = []
    for a in range(start, stop, win):
        b = min(stop, a + win)
        results.append(one(build_workload(trace, mapping, config, a, b), a - start, stop - start))
    return SimResult.concat(results)


def _mean_tokens(trace: Any) -> float:
    try:
        return max(1.0, trace.num_tokens / max(trace.num_steps, 1))
    except Exception:
        return 1.0
