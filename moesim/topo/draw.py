"""A layered picture of a topology: GPUs at the bottom, node switches, NICs, leaf and spine switches above."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_LEVEL = {"gpu": 0.0, "nvswitch": 1.0, "pcie_switch": 0.8, "host": 1.4, "switch": 1.0, "nic": 2.0, "leaf": 3.0,
          "spine": 4.0}
_COLOR = {"nvlink": "tab:green", "pcie": "tab:orange", "ib": "tab:blue", "link": "tab:gray"}


def layout(topo: Any) -> dict[str, tuple[float, float]]:
    """Positions: GPUs evenly on a line; node-level switches over their node's GPUs; fabric switches spread."""
    g = topo.graph
    G = topo.num_gpus
    pos: dict[str, tuple[float, float]] = {}
    gx = {name: float(i) for i, name in enumerate(topo.gpu_names)}
    for name, x in gx.items():
        pos[name] = (x, 0.0)
    others: dict[str, list[str]] = {}
    for v, a in g.nodes(data=True):
        kind = a.get("kind", "other")
        if kind == "gpu":
            continue
        y = _LEVEL.get(kind, 2.5)
        if kind == "nic" and "index" in a and f"gpu{a['index']}" in gx:
            pos[v] = (gx[f"gpu{a['index']}"], y)
            continue
        nbr_gpus = [gx[u] for u in g.successors(v) if u in gx]
        if nbr_gpus and kind not in ("leaf", "spine"):
            pos[v] = (float(np.mean(nbr_gpus)), y)
            continue
        others.setdefault(kind, []).append(v)
    for kind, names in others.items():
        y = _LEVEL.get(kind, 2.5)
        xs = np.linspace(0, max(G - 1, 1), len(names) + 2)[1:-1] if len(names) > 1 else [max(G - 1, 1) / 2]
        for v, x in zip(names, xs):
            if v not in pos:
                nb = [pos[u][0] for u in g.successors(v) if u in pos and g.nodes[u].get("kind") != "spine"]
                pos[v] = (float(np.mean(nb)) if nb and kind == "host" else float(x), y)
    return pos


def draw_png(topo: Any, out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moesim.io import atomic_path

    g = topo.graph
    pos = layout(topo)
    big = g.number_of_nodes() > 120
    fig, ax = plt.subplots(figsize=(min(4 + topo.num_gpus * 0.35, 40), 5.5))
    bw = topo.edge_bw
    lw = 1.0 + 2.0 * (np.log10(bw) - np.log10(bw.min())) / max(np.log10(bw.max()) - np.log10(bw.min()), 1e-9)
    seen = set()
    for e, (u, v) in enumerate(topo.edges()):
        if (v, u) in seen:
            continue
        seen.add((u, v))
        (x0, y0), (x1, y1) = pos[u], pos[v]
        color = _COLOR.get(str(topo.edge_kind[e]), "k")
        ax.plot([x0, x1], [y0, y1], color=color, lw=float(lw[e]) * (0.4 if big else 1), alpha=0.6, zorder=1)
    for kind in sorted({a.get("kind", "other") for _, a in g.nodes(data=True)}):
        names = [v for v, a in g.nodes(data=True) if a.get("kind", "other") == kind]
        xy = np.array([pos[v] for v in names])
        ax.scatter(xy[:, 0], xy[:, 1], s=12 if big else 120, label=kind, zorder=2,
                   marker="s" if kind != "gpu" else "o")
        if not big:
            for v, (x, y) in zip(names, xy):
                ax.annotate(v, (x, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=6)
    for kind, color in _COLOR.items():
        if kind in set(topo.edge_kind.tolist()):
            ax.plot([], [], color=color, label=f"{kind} link")
    ax.set_title(f"{topo.name}: {topo.num_nodes}×{topo.gpus_per_node} {topo.device.name}, routing {topo.routing}")
    ax.set_yticks([])
    ax.set_xticks([])
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
