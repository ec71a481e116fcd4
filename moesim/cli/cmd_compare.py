"""``moesim compare``: several placement algorithms side by side on one load, fitted and on held-out steps."""

from __future__ import annotations

import argparse
from typing import Any

ORDER = 45


def register(sub: Any) -> None:
    from moesim.placement import ALGORITHMS
    from moesim.placement.inputs import add_source_arguments

    p = sub.add_parser(
        "compare", help="compare placement algorithms: balance, IB bytes, predicted step time, algorithm time",
        description="Run several placement algorithms on the same load and print, side by side: busiest GPU ÷ "
                    "lower bound, balancedness (Σ mean / Σ max over layers, vLLM EPLB's figure), busiest ÷ mean, "
                    "inter-node bytes per token and predicted step time (analytic engine; needs a model: the "
                    "trace's or --model), and the algorithm's time. On a multi-step trace the mappings are also "
                    "scored on the steps after the fitted window (--holdout).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_source_arguments(p)
    p.add_argument("--algos", default="linear,round_robin,eplb,greedy,affinity",
                   help=f"comma-separated, from: {', '.join(ALGORITHMS)}")
    p.add_argument("--holdout", type=float, default=0.25,
                   help="fraction of a trace's steps (after the fit) to score on; with --window A:B, the steps "
                        "after B are held out")
    p.add_argument("--out", help="directory for compare.json, compare.md, compare.png and the mappings")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moesim.cli.topology_args import topology_from_args
    from moesim.errors import MoesimError
    from moesim.io import atomic_write_text, write_json
    from moesim.placement.compare import COLUMNS, HOLDOUT_COLUMNS, compare, format_markdown, format_table, plot
    from moesim.placement.inputs import algo_kwargs, open_source, resolve_slots

    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise MoesimError(f"--out {out} exists and is not a directory")
    topo = topology_from_args(args)
    src = open_source(args)
    slots = resolve_slots(args, src.load.shape[1], topo.num_gpus)
    res = compare(src, topo, algos, slots, holdout=args.holdout, algo_kw=algo_kwargs(args, src.model))
    head = (f"{res['source']} on {topo.name}: {topo.num_gpus} GPUs × {slots // topo.num_gpus} slots "
            f"({slots - src.load.shape[1]} redundant)")
    fit = f" (fitted on steps {res['fit_steps'][0]}:{res['fit_steps'][1]})" if res["fit_steps"] else ""
    text = [head + fit, format_table(res["rows"], COLUMNS)]
    if res["holdout_rows"]:
        a, b = res["holdout_steps"]
        text += ["", f"held-out steps {a}:{b} (mappings fitted on the window before them)",
                 format_table(res["holdout_rows"], HOLDOUT_COLUMNS)]
    if src.model is None:
        text.append("(no model: give --model for predicted step time and inter-node bytes)")
    print("\n".join(text))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for algo, mapping in res["mappings"].items():
            mapping.save(out / f"mapping-{algo}.json")
        data = {k: v for k, v in res.items() if k != "mappings"}
        md = [f"# {head}{fit}", "", format_markdown(res["rows"], COLUMNS)]
        if res["holdout_rows"]:
            md += ["", f"Held-out steps {res['holdout_steps'][0]}:{res['holdout_steps'][1]}", "",
                   format_markdown(res["holdout_rows"], HOLDOUT_COLUMNS)]
        plot(res, out / "compare.png")
        atomic_write_text(out / "compare.md", "\n".join(md) + "\n")
        write_json(out / "compare.json", data)
        print(f"wrote {out}/compare.json, compare.md, compare.png")
    return 0
