"""Headline numbers of a topology: what ``moesim topo show`` prints."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np


def alltoall_bw_per_gpu(topo: Any, mask: np.ndarray | None = None) -> float:
    """Bytes/s each GPU sends in a uniform all-to-all over the pairs in ``mask`` [G, G] (default: all pairs
    but the diagonal), when every pair sends the same and the busiest link decides (fluid model, no latency)."""
    G = topo.num_gpus
    if mask is None:
        mask = ~np.eye(G, dtype=bool)
    if not mask.any():
        return float("nan")
    load = topo.link_load(mask.astype(float))
    busiest = float(np.max(load / topo.edge_bw))
    per_gpu = mask.sum(axis=1).max()  # bytes each (busiest) GPU sends, one per destination
    return float(per_gpu / busiest) if busiest > 0 else float("inf")


def summarize(topo: Any) -> dict[str, Any]:
    g = topo.graph
    G = topo.num_gpus
    kinds = Counter(a.get("kind", "?") for _, a in g.nodes(data=True))
    links: dict[str, dict[str, Any]] = {}
    for k in sorted(set(topo.edge_kind.tolist())):
        sel = topo.edge_kind == k
        links[k] = {"count": int(sel.sum()), "bandwidth_min": float(topo.edge_bw[sel].min()),
                    "bandwidth_max": float(topo.edge_bw[sel].max()),
                    "latency_max": float(topo.edge_latency[sel].max())}
    edges = topo.edges()
    gpu0 = topo.gpu_names[0]
    intra_out = sum(float(topo.edge_bw[e]) for e, (u, v) in enumerate(edges)
                    if u == gpu0 and g.nodes[v].get("kind") not in ("nic",))
    nic_bw = [float(topo.edge_bw[e]) for e, (u, v) in enumerate(edges)
              if g.nodes[u].get("kind") == "nic" and g.nodes[v].get("kind") not in ("gpu", "pcie_switch", "host")]
    inter = topo.is_inter_node()
    intra_pairs = ~inter & ~np.eye(G, dtype=bool)
    lat = topo.path_latency()
    # bisection: GPU i of the first half exchanges with GPU i + G/2 of the second (whole nodes on each side when
    # the node count is even); bytes/s across the cut, one direction
    half = G // 2
    cut = np.zeros((G, G), dtype=bool)
    if half:
        cut[np.arange(half), np.arange(half) + half] = True
        cut[np.arange(half) + half, np.arange(half)] = True
    out: dict[str, Any] = {
        "name": topo.name, "device": topo.device.to_dict(), "routing": topo.routing,
        "num_gpus": G, "num_nodes": topo.num_nodes, "gpus_per_node": topo.gpus_per_node,
        "node_kinds": dict(sorted(kinds.items())), "num_links": topo.num_links, "links": links,
        "per_gpu": {
            "intra_node_injection_bw": intra_out,  # bytes/s out of GPU 0 into its node's fabric
            "scale_out_bw": (sum(nic_bw) / G) if nic_bw else 0.0,  # NIC bytes/s per GPU
            "alltoall_bw": alltoall_bw_per_gpu(topo) if G > 1 else float("nan"),
            "intra_node_alltoall_bw": alltoall_bw_per_gpu(topo, intra_pairs) if intra_pairs.any() else float("nan"),
            "inter_node_alltoall_bw": alltoall_bw_per_gpu(topo, inter) if inter.any() else float("nan"),
        },
        "bisection_bw": alltoall_bw_per_gpu(topo, cut) * half if half else float("nan"),
        "latency": {
            "intra_node_max": float(lat[intra_pairs].max()) if intra_pairs.any() else float("nan"),
            "inter_node_min": float(lat[inter].min()) if inter.any() else float("nan"),
            "inter_node_max": float(lat[inter].max()) if inter.any() else float("nan"),
        },
    }
    return out


def format_summary(s: dict[str, Any]) -> str:
    """A few aligned lines for the terminal."""
    def gbs(x: float) -> str:
        return "-" if x != x else f"{x / 1e9:,.1f} GB/s"

    def us(x: float) -> str:
        return "-" if x != x else f"{x * 1e6:.2f} µs"

    d = s["device"]
    p = s["per_gpu"]
    lines = [
        f"topology     {s['name']}  ({s['num_nodes']} node(s) × {s['gpus_per_node']} GPUs = {s['num_gpus']} GPUs, "
        f"routing {s['routing']})",
        f"device       {d['name']}: {d['peak_flops'] / 1e12:.4g} TFLOP/s bf16"
        + (f" ({d['peak_flops_fp8'] / 1e12:.4g} fp8)" if d.get("peak_flops_fp8") else "")
        + f", HBM {d['hbm_bw'] / 1e12:.3g} TB/s, "
        f"{d['hbm_bytes'] / 1e9:,.0f} GB",
        "nodes        " + ", ".join(f"{k} {v}" for k, v in s["node_kinds"].items()),
        f"links        {s['num_links']} directed",
    ]
    for k, v in s["links"].items():
        bw = gbs(v["bandwidth_min"]) if v["bandwidth_min"] == v["bandwidth_max"] else \
            f"{gbs(v['bandwidth_min'])}..{gbs(v['bandwidth_max'])}"
        lines.append(f"  {k:<10} {v['count']:>6} × {bw}, latency ≤ {us(v['latency_max'])}")
    lines += [
        f"per GPU      intra-node injection {gbs(p['intra_node_injection_bw'])}, scale-out (NIC) "
        f"{gbs(p['scale_out_bw'])}",
        f"all-to-all   per GPU: all pairs {gbs(p['alltoall_bw'])}, intra-node {gbs(p['intra_node_alltoall_bw'])}, "
        f"inter-node {gbs(p['inter_node_alltoall_bw'])}",
        f"bisection    {gbs(s['bisection_bw'])} each way (GPU i <-> GPU i+{s['num_gpus'] // 2})",
        f"latency      intra-node ≤ {us(s['latency']['intra_node_max'])}, inter-node "
        f"{us(s['latency']['inter_node_min'])}..{us(s['latency']['inter_node_max'])}",
    ]
    return "\n".join(lines)
