"""Side-by-side scoring of placement algorithms on one load (and, for traces, on held-out steps).

For each algorithm: its mapping's busiest GPU ÷ lower bound (Σ over layers of the busiest GPU's load ÷ Σ of
base.lower_bound), balancedness (vLLM's Σ mean / Σ max) and imbalance (mean over layers of busiest ÷ mean);
with a model, the analytic engine's predicted mean step time and inter-node bytes per token; the algorithm's
own seconds. On a trace with several steps, the mapping is fitted on a window and *also* scored on the steps
that follow it (``holdout``), as a live rebalancer would experience it: a placement fitted to the very load
it is scored on flatters every algorithm. ``holdout_domains`` splits by domain instead: on a trace whose steps are
domains or sources (an OLMoE per-domain import: trace meta ``steps``), fit on the other steps and score on the
named ones — traffic of a kind the placement has not seen. Held-out rows carry ``ratio`` = held-out ÷ fitted
busiest/mean. ``robust`` gets the fit steps as its windows (one per domain, or runs of steps).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.errors import MoesimError
from moesim.mapping import ExpertMapping
from moesim.placement import ALGORITHMS, PlacementError, balancedness, gpu_loads, imbalance, lower_bound, place

COLUMNS = [("algo", "algorithm", "{}"), ("busiest_over_bound", "busiest/bound", "{:.4f}"),
           ("balancedness", "balancedness", "{:.4f}"), ("imbalance", "busiest/mean", "{:.4f}"),
           ("inter_bytes_per_token", "IB bytes/token", "{:.4g}"), ("step_time", "step time (s)", "{:.4g}"),
           ("seconds", "algo time (s)", "{:.3g}")]
HOLDOUT_COLUMNS = [("algo", "algorithm", "{}"), ("busiest_over_bound", "busiest/bound", "{:.4f}"),
                   ("balancedness", "balancedness", "{:.4f}"), ("imbalance", "busiest/mean", "{:.4f}"),
                   ("ratio", "held-out ÷ fitted", "{:.3f}"),
                   ("inter_bytes_per_token", "IB bytes/token", "{:.4g}"), ("step_time", "step time (s)", "{:.4g}")]


def score(load: np.ndarray, mapping: ExpertMapping, num_slots: int) -> dict[str, float]:
    """Load-only quality of ``mapping`` on ``load`` [L, E]."""
    lb = lower_bound(load, mapping.num_gpus, num_slots)
    busiest = gpu_loads(load, mapping).max(axis=1)
    return {"busiest_over_bound": float(busiest.sum() / lb.sum()) if lb.sum() > 0 else 1.0,
            "balancedness": balancedness(load, mapping), "imbalance": imbalance(load, mapping)}


def predict(source: Any, mapping: ExpertMapping, topology: Any, model: Any, cost: Any, config: Any,
            start: int, stop: int, counts: np.ndarray | None = None) -> dict[str, float]:
    """Mean predicted step time and inter-node bytes per token (analytic engine) for steps start..stop-1.

    ``source``: an open Trace; or None with ``counts`` [S, L, E] (a load file: one step of that load).
    """
    from moesim.sim import simulate

    if source is not None:
        res = simulate(source, topology, mapping, cost, model, config, engine="analytic", start=start, stop=stop)
    else:
        from moesim.sim.workload import workload_from_counts

        assert counts is not None
        tokens = np.maximum(np.rint(counts[:, 0, :].sum(axis=1) / model.top_k), 1).astype(np.int64)
        wl = workload_from_counts(counts, tokens, mapping, config, top_k=model.top_k)
        res = simulate(wl, topology, mapping, cost, model, config, engine="analytic")
    tokens = float(np.sum(res.step_tokens))
    return {"step_time": float(np.mean(res.step_time)),
            "inter_bytes_per_token": float(np.sum(res.bytes_inter)) / tokens if tokens > 0 else 0.0}


def step_names(trace: Any) -> list[str]:
    """A name per trace step: the last part of the trace meta's ``steps`` entries (OLMoE: arxiv, book, ...), else
    the step index."""
    names = trace.meta.get("steps") if isinstance(trace.meta, dict) else None
    if isinstance(names, list) and len(names) == trace.num_steps and all(isinstance(n, str) for n in names):
        return [n.rsplit("/", 1)[-1] for n in names]
    return [str(i) for i in range(trace.num_steps)]


def domain_split(trace: Any, holdout: list[str]) -> tuple[list[int], list[int]]:
    """(fit steps, held-out steps) for held-out domain names (or step indices); one-line errors otherwise."""
    names = step_names(trace)
    test = []
    for h in holdout:
        if h in names:
            test.append(names.index(h))
        elif h.isdigit() and int(h) < trace.num_steps:
            test.append(int(h))
        else:
            raise MoesimError(f"--holdout-domains: no step or domain {h!r} in the trace (it has: {', '.join(names)})")
    test = sorted(set(test))
    fit = [i for i in range(trace.num_steps) if i not in test]
    if not fit:
        raise MoesimError("--holdout-domains holds out every step: nothing left to fit on")
    return fit, test


def compare(src: Any, topology: Any, algos: list[str], num_slots: int, *, holdout: float = 0.25,
            algo_kw: dict[str, Any] | None = None, config: Any = None, cost: Any = None,
            progress: Any = None, holdout_domains: list[str] | None = None) -> dict[str, Any]:
    """Run every algorithm on ``src`` (placement.inputs.LoadSource); return {"rows", "holdout_rows", ...}."""
    unknown = [a for a in algos if a not in ALGORITHMS]
    if unknown:
        raise PlacementError(f"unknown placement algorithm(s) {', '.join(unknown)}")
    if not algos:
        raise PlacementError("--algos is empty")
    if not 0 <= holdout < 1:
        raise MoesimError(f"--holdout must be in [0, 1), got {holdout}")
    model = src.model
    G = topology.num_gpus
    fit_load, test_load = src.load, None
    fit_range = test_range = None
    trace = src.trace
    fit_steps = test_steps = None
    if holdout_domains:
        if trace is None:
            raise MoesimError("--holdout-domains needs a --trace whose steps are domains (e.g. an OLMoE import)")
        if src.window != (0, trace.num_steps):
            raise MoesimError("--holdout-domains and --window cannot be combined")
        fit_steps, test_steps = domain_split(trace, holdout_domains)
        per_step = trace.load().astype(np.float64)
        fit_load, test_load = per_step[fit_steps].sum(axis=0), per_step[test_steps].sum(axis=0)
        windows = per_step[fit_steps]
    elif trace is not None:
        start, stop = src.window
        if holdout > 0 and src.window == (0, trace.num_steps) and trace.num_steps >= 2:
            cut = max(1, min(trace.num_steps - 1, round(trace.num_steps * (1 - holdout))))
            fit_range, test_range = (0, cut), (cut, trace.num_steps)
        elif holdout > 0 and stop < trace.num_steps:
            fit_range, test_range = (start, stop), (stop, trace.num_steps)
        else:
            fit_range = (start, stop)
        per_step = trace.load(*fit_range).astype(np.float64)
        fit_load = per_step.sum(axis=0)
        windows = per_step
        if test_range is not None:
            test_load = trace.load(*test_range).sum(axis=0).astype(np.float64)
    if fit_load.sum() <= 0:
        raise MoesimError("the fitted load is all zero: nothing to place by")
    co = None
    if trace is not None and fit_range is not None and any(a in ("affinity", "colocate", "milp") for a in algos):
        from moesim.placement.affinity import coactivation_from_trace

        co = coactivation_from_trace(trace, *fit_range)
    kw_robust: dict[str, Any] = {}
    if trace is not None and "robust" in algos:
        from moesim.placement.robust import split_windows

        kw_robust["windows"] = split_windows(windows)
    sim_ok = model is not None
    if sim_ok and cost is None:
        from moesim.cost import CostModel

        cost = CostModel.roofline(model, topology.device)
    if sim_ok and config is None:
        from moesim.replica import ReplicaPolicy
        from moesim.sim.config import SimConfig

        config = SimConfig(policy=ReplicaPolicy(gpus_per_node=topology.gpus_per_node))
    rows, hrows, mappings = [], [], {}
    for algo in algos:
        res = place(fit_load, algo, num_gpus=G, num_slots=num_slots, gpus_per_node=topology.gpus_per_node,
                    coactivation=co, **(algo_kw or {}), **(kw_robust if algo == "robust" else {}))
        mappings[algo] = res.mapping
        row: dict[str, Any] = {"algo": algo, "seconds": res.seconds, **score(fit_load, res.mapping, num_slots)}
        if "gap" in res.info:
            row["milp_gap"] = res.info["gap"]
        if sim_ok:
            if trace is not None and fit_range is not None:
                row.update(predict(trace, res.mapping, topology, model, cost, config, *fit_range))
            else:
                row.update(predict(None, res.mapping, topology, model, cost, config, 0, 1, counts=fit_load[None]))
        rows.append(row)
        if test_load is not None:
            hrow: dict[str, Any] = {"algo": algo, **score(test_load, res.mapping, num_slots)}
            hrow["ratio"] = hrow["imbalance"] / row["imbalance"]
            if sim_ok and test_range is not None:
                hrow.update(predict(trace, res.mapping, topology, model, cost, config, *test_range))
            elif sim_ok:
                hrow.update(predict(None, res.mapping, topology, model, cost, config, 0, 1, counts=test_load[None]))
            hrows.append(hrow)
        if progress is not None:
            progress(algo)
    if test_steps is not None:
        names = step_names(trace)
        fit_range, test_range = [names[i] for i in fit_steps], [names[i] for i in test_steps]
    return {"rows": rows, "holdout_rows": hrows, "fit_steps": fit_range, "holdout_steps": test_range,
            "split": "domain" if test_steps is not None else "steps",
            "num_gpus": G, "num_slots": num_slots, "gpus_per_node": topology.gpus_per_node,
            "model": None if model is None else model.name, "topology": topology.name, "source": src.label,
            "mappings": mappings}


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Fixed-width text table; missing values print as '-'."""
    cells = [[title for _, title, _ in columns]]
    for r in rows:
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].ljust(widths[i]) if i == 0 else c[i].rjust(widths[i]) for i in range(len(columns)))
             for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    out = ["| " + " | ".join(t for _, t, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in columns)
                   + " |")
    return "\n".join(out)


def plot(result: dict[str, Any], path: Any) -> None:
    """Bar charts: busiest/bound (fitted and held out) and predicted step time per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moesim.io import atomic_path

    rows, hrows = result["rows"], result["holdout_rows"]
    names = [r["algo"] for r in rows]
    x = np.arange(len(names))
    has_time = any(r.get("step_time") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_time else 1, figsize=(11 if has_time else 6, 4), squeeze=False)
    ax = axes[0, 0]
    w = 0.4 if hrows else 0.8
    ax.bar(x - (w / 2 if hrows else 0), [r["busiest_over_bound"] for r in rows], w, label="fitted window")
    if hrows:
        ax.bar(x + w / 2, [r["busiest_over_bound"] for r in hrows], w, label="held-out steps")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("busiest GPU load ÷ lower bound")
    ax.legend(loc="lower right", fontsize=8)
    if has_time:
        ax = axes[0, 1]
        ax.bar(x - (w / 2 if hrows else 0), [r.get("step_time") or 0 for r in rows], w, label="fitted window")
        if hrows:
            ax.bar(x + w / 2, [r.get("step_time") or 0 for r in hrows], w, label="held-out steps")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylabel("predicted mean step time (s)")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{result['source']} on {result['topology']}: {result['num_gpus']} GPUs × "
                 f"{result['num_slots'] // result['num_gpus']} slots", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
