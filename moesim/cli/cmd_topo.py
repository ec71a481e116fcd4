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
    s.add_argument("--png", metavar="OUT.png", help="also draw the topology to this PNG")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("--route", nargs=2, type=int, metavar=("SRC", "DST"), help="also print the route SRC->DST")
    s.set_defaults(func=_show)
    v = tsub.add_parser("validate", help="check a topology JSON file (exit 0 when valid, 2 with the problem)")
    v.add_argument("topology", help="topology JSON file (or a preset)")
    v.set_defaults(func=_validate)
    e = tsub.add_parser("export", help="write a preset as topology JSON (a template for custom topologies)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("topology", help="preset, NAME:N or topology JSON file")
    e.add_argument("--out", required=True, help="output JSON file")
    e.set_defaults(func=_export)


def _show(args: argparse.Namespace) -> int:
    from moesim.errors import MoesimError
    from moesim.topo.summary import format_summary
    from moesim.topology import load_topology

    topo = load_topology(args.topology)
    summary = topo.summary()
    if args.route:
        s, d = args.route
        if not (0 <= s < topo.num_gpus and 0 <= d < topo.num_gpus):
            raise MoesimError(f"--route: GPUs are 0..{topo.num_gpus - 1}, got {s} {d}")
        summary["route"] = {"src": s, "dst": d, "nodes": topo.route_nodes(s, d),
                            "latency": float(topo.path_latency()[s, d]),
                            "bottleneck_bw": float(min((topo.edge_bw[e] for e in topo.route(s, d)), default=0.0))}
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
        if args.png:
            print(f"wrote {args.png}", file=sys.stderr)
    return 0


def _nan_none(x: Any) -> Any:
    return None


def _validate(args: argparse.Namespace) -> int:
    from moesim.topology import load_topology

    topo = load_topology(args.topology)
    topo.routing_matrix()  # routes resolve for every pair
    print(f"{args.topology}: valid — {topo.num_gpus} GPUs in {topo.num_nodes} node(s), {topo.num_links} links, "
          f"device {topo.device.name}, routing {topo.routing}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from moesim.io import write_json
    from moesim.topology import load_topology

    topo = load_topology(args.topology)
    write_json(args.out, topo.to_json())
    print(f"wrote {args.out} ({topo.num_gpus} GPUs, {topo.num_links} links)", file=sys.stderr)
    return 0
