"""``moesim topo``: show, validate and export cluster topologies."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

ORDER = 20


def register(sub: Any) -> None:
    p = sub.add_parser(
        "topo", help="show, validate and export cluster topologies (presets or JSON files)",
        description="Topologies are graphs of GPUs, NVSwitch/PCIe switches, NICs and InfiniBand leaf/spine "
                    "switches with per-link bandwidth and latency. Presets: dgx-h100, dgx-h200, hgx-h800, "
                    "pcie-8gpu, and NAME:N for a rail-optimised cluster of N such nodes (e.g. dgx-h100:8).")
    tsub = p.add_subparsers(dest="topo_command", metavar="SUBCOMMAND")
    tsub.required = True
    s = tsub.add_parser("show", help="summarise a topology: GPUs, nodes, links, per-GPU and all-to-all bandwidth",
                        description="Print GPUs, nodes, switches, links by kind, per-GPU NVLink/PCIe and NIC "
                                    "bandwidth, the uniform all-to-all bandwidth per GPU (busiest link decides), "
                                    "and path latencies.")
    s.add_argument("topology", help="preset, NAME:N or topology JSON file")
    from moesim.cli.topology_args import add_topology_flags

    add_topology_flags(s)
    s.add_argument("--png", metavar="OUT.png", help="also draw the topology to this PNG")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("--route", nargs=2, type=int, metavar=("SRC", "DST"), help="also print the route SRC->DST")
    s.add_argument("--model", help="also print the roofline cost of this model preset on the topology's device "
                                   "(expert kernel and dense part against tokens)")
    s.add_argument("--context-len", type=int, default=1024, help="with --model: context each token attends to")
    s.add_argument("--weight-dtype", metavar="D", help="with --model: weights as D (bf16, fp8, fp8-block, ...)")
    s.add_argument("--kv-dtype", metavar="D", help="with --model: KV cache as D (bf16, fp8, ...)")
    s.add_argument("--cost", metavar="CALIB.json", help="with --model: the roofline at the achievable efficiency of a "
                                                         "kernels/calibrate.py file instead of constant mfu/mbu")
    s.set_defaults(func=_show)
    v = tsub.add_parser("validate", help="check a topology JSON file (exit 0 when valid, 2 with the problem)")
    v.add_argument("topology", help="topology JSON file (or a preset)")
    v.set_defaults(func=_validate)
    e = tsub.add_parser("export", help="write a preset as topology JSON (a template for custom topologies)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("topology", help="preset, NAME:N or topology JSON file")
    e.add_argument("--out", required=True, help="output JSON file")
    add_topology_flags(e)
    e.set_defaults(func=_export)


def _show(args: argparse.Namespace) -> int:
    from moesim.cli.topology_args import topology_from_args
    from moesim.errors import MoesimError
    from moesim.topo.summary import format_summary

    topo = topology_from_args(args)
    summary = topo.summary()
    if args.route:
        s, d = args.route
        if not (0 <= s < topo.num_gpus and 0 <= d < topo.num_gpus):
            raise MoesimError(f"--route: GPUs are 0..{topo.num_gpus - 1}, got {s} {d}")
        summary["route"] = {"src": s, "dst": d, "nodes": topo.route_nodes(s, d),
                            "latency": float(topo.path_latency()[s, d]),
                            "bottleneck_bw": float(min((topo.edge_bw[e] for e in topo.route(s, d)), default=0.0))}
    if args.model:
        summary["cost"] = _cost_table(topo, args.model, args.context_len, args)
    if args.png:
        from moesim.topo.draw import draw_png

        draw_png(topo, args.png)
    if args.json:
        print(json.dumps(summary, indent=2, default=_nan_none).replace("NaN", "null"))
    else:
        print(format_summary(summary))
        if args.route:
            r = summary["route"]
            print(f"route        {' -> '.join(r['nodes'])}  ({r['latency'] * 1e6:.2f} µs, "
                  f"bottleneck {r['bottleneck_bw'] / 1e9:,.1f} GB/s)")
        if args.model:
            c = summary["cost"]
            how = f"efficiency curve of {c['efficiency']}" if c["efficiency"] else f"mfu {c['mfu']}, mbu {c['mbu']}"
            print(f"cost         {c['model']} on {c['device']} (roofline, {how}, context "
                  f"{c['context_len']}); one expert turns compute-bound at ~{c['knee_tokens']:.0f} tokens")
            print(f"  {'tokens':>8} {'1 expert µs':>12} {'bound':>8} {'dense decode µs':>16} {'dense prefill µs':>17}")
            for r in c["rows"]:
                print(f"  {r['tokens']:>8} {r['expert_us']:>12.1f} {r['bound']:>8} {r['dense_decode_us']:>16.1f} "
                      f"{r['dense_prefill_us']:>17.1f}")
        if args.png:
            print(f"wrote {args.png}", file=sys.stderr)
    return 0


def _cost_table(topo: Any, model_name: str, context_len: int, args: Any = None) -> dict[str, Any]:
    import numpy as np

    from moesim.cost import CostModel
    from moesim.models import get_model, with_dtypes

    model = with_dtypes(get_model(model_name), getattr(args, "weight_dtype", None), getattr(args, "kv_dtype", None))
    if getattr(args, "cost", None):
        from moesim.cost import efficiency_curve, read_calibration

        curve = efficiency_curve(read_calibration(args.cost), topo.device, source=str(args.cost))
        cost = CostModel.roofline(model, topo.device, context_len=context_len, efficiency=curve)
    else:
        cost = CostModel.roofline(model, topo.device, context_len=context_len)
    e = cost.expert
    knee = e["bytes_per_expert"] / e["byte_rate"] / (e["flops_per_choice"] / e["flops_rate"]
                                                     - e["bytes_per_choice"] / e["byte_rate"])
    rows = []
    for n in (1, 4, 16, 64, 256, 1024, 4096, 16384):
        compute = n * e["flops_per_choice"] / e["flops_rate"]
        memory = (e["bytes_per_expert"] + n * e["bytes_per_choice"]) / e["byte_rate"]
        rows.append({"tokens": n, "expert_us": float(cost.expert_time(np.array([n]))) * 1e6,
                     "bound": "compute" if compute > memory else "memory",
                     "dense_decode_us": float(cost.dense_time(np.array(n), np.array(0))) * 1e6,
                     "dense_prefill_us": float(cost.dense_time(np.array(n), np.array(1))) * 1e6})
    return {"model": model.name, "device": topo.device.name, "mfu": cost.info["mfu"], "mbu": cost.info["mbu"],
            "context_len": cost.info["context_len"], "knee_tokens": knee, "rows": rows,
            "efficiency": getattr(args, "cost", None)}


def _nan_none(x: Any) -> Any:
    return None


def _validate(args: argparse.Namespace) -> int:
    from moesim.topo import load_topology

    topo = load_topology(args.topology)
    topo.routing_matrix()  # routes resolve for every pair
    print(f"{args.topology}: valid — {topo.num_gpus} GPUs in {topo.num_nodes} node(s), {topo.num_links} links, "
          f"device {topo.device.name}, routing {topo.routing}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from moesim.cli.topology_args import topology_from_args
    from moesim.io import write_json

    topo = topology_from_args(args)
    write_json(args.out, topo.to_json())
    print(f"wrote {args.out} ({topo.num_gpus} GPUs, {topo.num_links} links)", file=sys.stderr)
    return 0
