"""``moesim comm``: one MoE dispatch + combine alone on a modelled cluster, as DeepEP's own tests drive it."""

from __future__ import annotations

import argparse
import json
from typing import Any

ORDER = 35


def add_comm_argument(p: argparse.ArgumentParser) -> None:
    """``--comm`` / ``--dispatch-dtype`` / ``--combine-dtype`` for every command that replays."""
    p.add_argument("--comm", default="flat", metavar="BACKEND",
                   help="all-to-all backend of the ep dispatch/combine: flat (once per destination GPU), "
                        "hierarchical (DeepEP normal: once per node over RDMA, NVLink forwarding) or low-latency "
                        "(DeepEP LL: one message per token and expert, fixed kernel latency)")
    p.add_argument("--dispatch-dtype", default=None, metavar="DT",
                   help="wire precision of the dispatch: bf16, fp8 (one fp32 scale per 128 values) or fp32 "
                        "(default: the model's bytes per parameter)")
    p.add_argument("--combine-dtype", default=None, metavar="DT", help="wire precision of the combine (as above)")


def add_fixed_argument(p: argparse.ArgumentParser) -> None:
    """``--fixed`` for the commands that replay a trace (moesim.sim.fixed)."""
    p.add_argument("--fixed", default="none", metavar="none|graph|eager|F.json",
                   help="fixed costs per step and collective: none; graph (CUDA-graph decode: NCCL collective "
                        "latency, one graph launch, LM head); eager (host launch overhead per kernel instead); or a "
                        "fixed-costs JSON such as the fixed_costs.json that moesim validate fits")


def check_comm_args(args: argparse.Namespace) -> None:
    """One-line errors for the flags of :func:`add_comm_argument`."""
    from moesim.errors import MoesimError
    from moesim.sim.comm import BACKENDS, DTYPES

    if args.comm not in BACKENDS:
        raise MoesimError(f"--comm {args.comm!r}: known backends are {', '.join(BACKENDS)}")
    for flag, v in (("--dispatch-dtype", args.dispatch_dtype), ("--combine-dtype", args.combine_dtype)):
        if v is not None and v not in DTYPES:
            raise MoesimError(f"{flag} {v!r}: known dtypes are {', '.join(DTYPES)}")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "comm", help="one all-to-all dispatch + combine alone (DeepEP-style): time and bottleneck bandwidth",
        description="Draw routing as DeepEP's tests do (random scores; group-limited top-k with one group per node "
                    "for the normal kernels), place experts linearly over the topology's GPUs (EP = its GPUs) and "
                    "price one dispatch and one combine with the chosen backend. Prints their times and the "
                    "bottleneck bandwidth as DeepEP defines it (NVLink bytes received per rank on one node, RDMA "
                    "bytes sent per rank across nodes, every selection for low-latency; own rank counted).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--topology", required=True, metavar="P", help="preset, NAME:N (e.g. hgx-h800:2) or JSON file")
    from moesim.cli.topology_args import add_topology_flags

    add_topology_flags(p)  # --gpus N: EP = the first N GPUs
    p.add_argument("--backend", default="hierarchical", metavar="B", help="flat | hierarchical | low-latency")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=7168, help="hidden size (values per token)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token")
    p.add_argument("--experts", type=int, default=256, help="routed experts (a multiple of the GPUs)")
    p.add_argument("--topk-groups", type=int, default=None,
                   help="node groups each token may use (default: min(nodes, 4), as DeepEP's test; more than the "
                        "nodes means all of them)")
    p.add_argument("--dispatch-dtype", default="fp8", metavar="DT", help="bf16 | fp8 | fp32")
    p.add_argument("--combine-dtype", default="bf16", metavar="DT", help="bf16 | fp8 | fp32")
    p.add_argument("--engine", default="analytic", metavar="E", help="analytic | des")
    p.add_argument("--seed", type=int, default=0, help="seed of the routing draw")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from moesim.cli.topology_args import topology_from_args
    from moesim.errors import MoesimError
    from moesim.sim import ENGINES
    from moesim.sim.comm import BACKENDS, DTYPES
    from moesim.sim.commbench import run_comm

    if args.backend not in BACKENDS:
        raise MoesimError(f"--backend {args.backend!r}: known backends are {', '.join(BACKENDS)}")
    if args.engine not in ENGINES:
        raise MoesimError(f"--engine {args.engine!r}: known engines are {', '.join(ENGINES)}")
    for flag, v in (("--dispatch-dtype", args.dispatch_dtype), ("--combine-dtype", args.combine_dtype)):
        if v not in DTYPES:
            raise MoesimError(f"{flag} {v!r}: known dtypes are {', '.join(DTYPES)}")
    topology = topology_from_args(args)
    r = run_comm(topology, args.backend, engine=args.engine, tokens=args.tokens, hidden=args.hidden,
                 top_k=args.top_k, experts=args.experts, topk_groups=args.topk_groups,
                 dispatch_dtype=args.dispatch_dtype, combine_dtype=args.combine_dtype, seed=args.seed)
    r["topology"] = topology.name
    if args.json:
        print(json.dumps(r, indent=2, sort_keys=True))
        return 0
    print(f"{r['backend']} all-to-all on {topology.name}: EP{r['ep']} ({r['nodes']} node(s)), {r['tokens_per_rank']} "
          f"tokens/rank, hidden {r['hidden']}, top-{r['top_k']} of {r['experts']} experts, "
          f"{r['topk_groups']} group(s); {r['engine']} engine")
    print(f"  dispatch ({r['dispatch_dtype']}, {r['dispatch_message_bytes']:.0f} B/token): "
          f"{r['dispatch_us']:9.1f} us  {r['dispatch_bw_gbs']:7.1f} GB/s ({r['bw_kind']})")
    print(f"  combine  ({r['combine_dtype']}, {r['combine_message_bytes']:.0f} B/token): "
          f"{r['combine_us']:9.1f} us  {r['combine_bw_gbs']:7.1f} GB/s ({r['bw_kind']})")
    print(f"  bandwidth = {r['messages_per_rank']:.0f} messages per rank × bytes / time, as DeepEP's tests count")
    return 0
