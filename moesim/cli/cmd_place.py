"""``moesim place``: compute an expert mapping from load statistics (a trace window or a load file)."""

from __future__ import annotations

import argparse
from typing import Any

ORDER = 40


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every place option (shared with ``moesim sweep``, which checks a spec's options with this parser)."""
    from moesim.placement import ALGORITHMS
    from moesim.placement.inputs import add_source_arguments

    add_source_arguments(p)
    p.add_argument("--algo", default="greedy", help=f"one of: {', '.join(ALGORITHMS)}")
    p.add_argument("--out", required=True, help="mapping JSON to write (moesim format)")
    p.add_argument("--sglang", help="also write SGLang's --init-expert-location file here (.json or .pt; one row per "
                                    "decoder layer, dense layers included, as SGLang indexes it)")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "place", help="compute an expert placement (mapping.json) from a trace or a load file",
        description="Place logical experts (and redundant replicas) on the topology's GPUs with one algorithm. "
                    "Prints balancedness (Σ mean / Σ max of per-GPU load over layers, vLLM EPLB's figure), the "
                    "busiest GPU ÷ mean and ÷ lower bound, and the algorithm's time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_run)


def check_algo(algo: str) -> None:
    from moesim.placement import ALGORITHMS, PlacementError

    if algo not in ALGORITHMS:
        raise PlacementError(f"unknown placement algorithm {algo!r}; known: {', '.join(ALGORITHMS)}")


def execute(args: argparse.Namespace) -> dict[str, Any]:
    """Place, write the mapping (and the SGLang file); return the placement's figures (``info`` and ``seconds``)."""
    from moesim.cli.topology_args import topology_from_args
    from moesim.placement import PlacementError, place
    from moesim.placement.inputs import algo_kwargs, open_source, resolve_slots

    check_algo(args.algo)
    if args.sglang and not args.sglang.lower().endswith((".json", ".pt")):
        raise PlacementError(f"--sglang must end in .json or .pt (what SGLang's --init-expert-location reads), got "
                             f"{args.sglang!r}")
    topo = topology_from_args(args)
    src = open_source(args)
    try:
        E = src.load.shape[1]
        slots = resolve_slots(args, E, topo.num_gpus)
        co = src.coactivation() if args.algo in ("affinity", "colocate", "milp") else None
        extra = {"windows": src.windows()} if args.algo == "robust" else {}
        res = place(src.load, args.algo, num_gpus=topo.num_gpus, num_slots=slots,
                    gpus_per_node=topo.gpus_per_node, coactivation=co, **algo_kwargs(args, src.model), **extra)
    finally:
        if src.trace is not None:
            src.trace.close()
    meta = dict(res.mapping.meta)
    meta.update({"load": src.label, "topology": topo.name, "seconds": round(res.seconds, 6),
                 **{k: v for k, v in res.info.items() if isinstance(v, (int, float, str, bool))}})
    if src.model is not None:
        meta["model"] = src.model.name
    if "gap_per_layer" in res.info:  # the MILP's proven gap of each layer
        meta["gap_per_layer"] = [round(float(g), 6) for g in res.info["gap_per_layer"]]
    mapping = type(res.mapping)(res.mapping.phy2log, res.mapping.num_gpus, res.mapping.num_experts, meta)
    # write both outputs only once everything is computed (each atomically)
    mapping.save(args.out)
    if args.sglang:
        mapping.save_sglang(args.sglang, src.model.num_dense_layers if src.model is not None else 0)
    figures = {k: v for k, v in res.info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"num_gpus": topo.num_gpus, "num_slots": slots, "redundant": slots - E, **figures,
            "seconds": res.seconds}


def _run(args: argparse.Namespace) -> int:
    r = execute(args)
    extra = f", MILP gap {r['gap']:.2%} (per layer in the mapping's meta)" if "gap" in r else ""
    if args.algo == "robust":
        extra += f", {r.get('windows', 0)} windows"
    print(f"{args.algo}: {r['num_gpus']} GPUs × {r['num_slots'] // r['num_gpus']} slots ({r['redundant']} redundant), "
          f"balancedness {r['balancedness']:.4f}, busiest/mean {r['imbalance']:.4f}, "
          f"busiest/bound {r['busiest_over_bound']:.4f}, {r['seconds']:.3f} s{extra} → {args.out}")
    return 0
