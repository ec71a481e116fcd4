"""``moesim compare``: several placement algorithms side by side on one load, fitted and on held-out steps."""

from __future__ import annotations

import argparse
from typing import Any

ORDER = 45


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every compare option (shared with ``moesim sweep``, which checks a spec's options with this parser)."""
    from moesim.placement import ALGORITHMS
    from moesim.placement.inputs import add_source_arguments

    add_source_arguments(p)
    p.add_argument("--algos", default="linear,round_robin,eplb,greedy,affinity",
                   help=f"comma-separated, from: {', '.join(ALGORITHMS)}")
    p.add_argument("--holdout", type=float, default=0.25,
                   help="fraction of a trace's steps (after the fit) to score on; with --window A:B, the steps "
                        "after B are held out")
    p.add_argument("--holdout-domains", metavar="NAMES",
                   help="comma-separated domains (or step indices) of a trace whose steps are domains, e.g. an "
                        "OLMoE import: fit on the other steps, score on these (replaces --holdout)")
    from moesim.cli.cmd_comm import add_comm_argument, add_fixed_argument

    add_comm_argument(p)
    add_fixed_argument(p)
    p.add_argument("--out", help="directory for compare.json, compare.md, compare.png and the mappings")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "compare", help="compare placement algorithms: balance, IB bytes, predicted step time, algorithm time",
        description="Run several placement algorithms on the same load and print, side by side: busiest GPU ÷ "
                    "lower bound, balancedness (Σ mean / Σ max over layers, vLLM EPLB's figure), busiest ÷ mean, "
                    "inter-node bytes per token and predicted step time (analytic engine; needs a model: the "
                    "trace's or --model), and the algorithm's time. On a multi-step trace the mappings are also "
                    "scored on the steps after the fitted window (--holdout).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_run)


def algo_list(spec: str) -> list[str]:
    return [a.strip() for a in spec.split(",") if a.strip()]


def execute(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Compare as the options say, write compare.json/.md/.png and the mappings into ``args.out`` (if given).

    Returns the result of :func:`moesim.placement.compare.compare` and the lines of its text table.
    """
    from pathlib import Path

    from moesim.cli.cmd_comm import check_comm_args
    from moesim.cli.topology_args import topology_from_args
    from moesim.errors import MoesimError
    from moesim.io import atomic_dir, atomic_write_text, write_json
    from moesim.placement.compare import COLUMNS, HOLDOUT_COLUMNS, compare, format_markdown, format_table, plot
    from moesim.placement.inputs import algo_kwargs, open_source, resolve_slots
    from moesim.replica import ReplicaPolicy
    from moesim.sim.config import SimConfig
    from moesim.sim.fixed import load_fixed

    check_comm_args(args)
    algos = algo_list(args.algos)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise MoesimError(f"--out {out} exists and is not a directory")
    domains = [d.strip() for d in args.holdout_domains.split(",") if d.strip()] if args.holdout_domains else None
    if args.holdout_domains is not None and not domains:
        raise MoesimError("--holdout-domains is empty")
    topo = topology_from_args(args)
    src = open_source(args)
    try:
        slots = resolve_slots(args, src.load.shape[1], topo.num_gpus)
        config = SimConfig(policy=ReplicaPolicy(gpus_per_node=topo.gpus_per_node), comm=args.comm,
                           dispatch_dtype=args.dispatch_dtype, combine_dtype=args.combine_dtype,
                           fixed=load_fixed(args.fixed))
        res = compare(src, topo, algos, slots, holdout=args.holdout, algo_kw=algo_kwargs(args, src.model),
                      config=config, holdout_domains=domains)
    finally:
        if src.trace is not None:
            src.trace.close()
    head = (f"{res['source']} on {topo.name}: {topo.num_gpus} GPUs × {slots // topo.num_gpus} slots "
            f"({slots - src.load.shape[1]} redundant)")
    if res["split"] == "domain":
        fit = f" (fitted on {', '.join(res['fit_steps'])})"
        held = f"held-out {', '.join(res['holdout_steps'])} (mappings fitted on the other domains)"
    else:
        fit = f" (fitted on steps {res['fit_steps'][0]}:{res['fit_steps'][1]})" if res["fit_steps"] else ""
        held = (f"held-out steps {res['holdout_steps'][0]}:{res['holdout_steps'][1]} (mappings fitted on the "
                "window before them)" if res["holdout_steps"] else "")
    text = [head + fit, format_table(res["rows"], COLUMNS)]
    if res["holdout_rows"]:
        text += ["", held, format_table(res["holdout_rows"], HOLDOUT_COLUMNS)]
    if src.model is None:
        text.append("(no model: give --model for predicted step time and inter-node bytes)")
    if out is not None:
        with atomic_dir(out, previous=("compare.json",)) as d:  # one run per folder: no stale mappings
            for algo, mapping in res["mappings"].items():
                mapping.save(d / f"mapping-{algo}.json")
            data = {k: v for k, v in res.items() if k != "mappings"}
            md = [f"# {head}{fit}", "", format_markdown(res["rows"], COLUMNS)]
            if res["holdout_rows"]:
                md += ["", held[0].upper() + held[1:], "", format_markdown(res["holdout_rows"], HOLDOUT_COLUMNS)]
            plot(res, d / "compare.png")
            atomic_write_text(d / "compare.md", "\n".join(md) + "\n")
            write_json(d / "compare.json", data)
    return res, text


def _run(args: argparse.Namespace) -> int:
    _res, text = execute(args)
    print("\n".join(text))
    if args.out:
        print(f"wrote {args.out}/compare.json, compare.md, compare.png")
    return 0
