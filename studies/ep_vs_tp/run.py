"""EP vs TP for Mixtral-8x7B on 2 H100 GPUs: bytes moved per token and predicted decode step time per layout.

Question: on two NVLink-connected H100s, should Mixtral-8x7B's experts be split by expert (EP) or by tensor (TP),
and where does the answer change with the decode batch size?

Method: synthetic decode traces (moesim.trace.synth, Mixtral default skew, seed 0) of B = 1..256 tokens per step,
replayed by moesim's analytic engine under three layouts (moesim.sim.config): ``ep`` (data-parallel attention,
all-to-all dispatch/combine), ``ep-tp-attn`` (TP attention, experts split by expert, outputs all-reduced) and
``tp`` (every expert sharded over both GPUs); roofline H100 costs; a few points re-run by the DES engine.

    python studies/ep_vs_tp/run.py [--quick]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _study as S

from moesim.cost import CostModel
from moesim.mapping import ExpertMapping
from moesim.models import get_model
from moesim.sim import SimConfig, simulate, workload_from_ids
from moesim.topo import DEVICES, Topology
from moesim.trace.synth import SynthConfig, generate_steps

NAME = "ep_vs_tp"
LAYOUTS = ("ep", "ep-tp-attn", "tp")
# Two H100 SXM on NVSwitch: NVLink4 gives each GPU 450 GB/s per direction (18 links x 25 GB/s, NVIDIA H100
# datasheet; DESIGN.md facts table); ~1 us GPU-to-GPU latency (DESIGN.md: NVLink latency ~1-2 us).
NVLINK_BW = 450e9
NVLINK_LATENCY = 1e-6
# Sensitivity: the same two GPUs joined by PCIe 5.0 x16 only (64 GB/s per direction raw, PCI-SIG), ~2 us.
PCIE_BW = 64e9
PCIE_LATENCY = 2e-6


def topology(pcie: bool = False) -> Topology:
    """Two H100s on one NVSwitch: a flat star (each GPU one 450 GB/s-per-direction link to the switch)."""
    if pcie:
        return Topology.flat(2, PCIE_BW, PCIE_LATENCY, DEVICES["h100"], name="2xH100-PCIe5")
    return Topology.flat(2, NVLINK_BW, NVLINK_LATENCY, DEVICES["h100"], name="2xH100-NVLink")


def decode_steps(model: Any, batch: int, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids [L, steps*batch, k], step_tokens [steps], origin [steps*batch] of a decode-only synthetic trace."""
    cfg = SynthConfig(steps=steps, tokens=batch, decode_tokens=batch, prefill_steps=0, num_ranks=2, seed=seed)
    ids, origin = [], []
    for i, _w, o, _ph in generate_steps(model, cfg, threads=1):
        ids.append(i)
        origin.append(o)
    return np.concatenate(ids, axis=1), np.full(steps, batch, dtype=np.int64), np.concatenate(origin)


def run_point(model: Any, topo: Topology, cost: CostModel, mapping: ExpertMapping, ids: np.ndarray,
              step_tokens: np.ndarray, origin: np.ndarray, layout: str, engine: str) -> dict[str, Any]:
    config = SimConfig(layout=layout)
    wl = workload_from_ids(ids, step_tokens, mapping, config, origin=origin,
                           phase=np.zeros(len(step_tokens), np.uint8))  # 0 = decode (trace phase code)
    res = simulate(wl, topo, mapping, cost, model, config, engine=engine)
    summ = res.summary(topo)
    pt = np.asarray(res.phase_time)  # [S, L, 5] dense, gate, dispatch, expert, combine
    tokens = float(np.sum(res.step_tokens))
    return {"step_ms": 1e3 * float(np.mean(res.step_time)),
            "tokens/s": summ["tokens_per_s"],
            "bytes/token": float(np.sum(res.bytes_intra) + np.sum(res.bytes_inter)) / tokens,
            "dense_ms": 1e3 * float(pt[..., 0:2].sum(axis=(1, 2)).mean()),
            "comm_ms": 1e3 * float(pt[..., [2, 4]].sum(axis=(1, 2)).mean()),
            "expert_ms": 1e3 * float(pt[..., 3].sum(axis=1).mean()),
            "moe_share": summ["moe_share"],
            "busiest/mean GPU": summ["busiest_gpu_over_mean_load"]}


def plot(rows: list[dict[str, Any]], best: list[dict[str, Any]], path: Path) -> None:
    plt = S.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    marks = {"ep": "o-", "ep-tp-attn": "s--", "tp": "^-."}
    for layout in LAYOUTS:
        sel = [r for r in rows if r["layout"] == layout]
        b = [r["batch"] for r in sel]
        axes[0].plot(b, [r["bytes/token"] / 1e6 for r in sel], marks[layout], label=layout)
        axes[1].plot(b, [r["step_ms"] for r in sel], marks[layout], label=layout)
    axes[0].set_ylabel("MB moved between GPUs per token per step")
    axes[1].set_ylabel("predicted decode step time (ms)")
    b = [r["batch"] for r in best]
    for layout in ("ep", "ep-tp-attn"):
        axes[2].plot(b, [r[f"{layout} ms"] / r["tp ms"] for r in best], marks[layout], label=f"{layout}, NVLink")
        axes[2].plot(b, [r[f"{layout} ms PCIe"] / r["tp ms PCIe"] for r in best], marks[layout], alpha=0.5,
                     label=f"{layout}, PCIe 5.0 (64 GB/s)")
    axes[2].axhline(1.0, color="tab:green", lw=1)
    axes[2].set_ylabel("step time / tp step time (same link)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decode batch (tokens per step)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle("Mixtral-8x7B on 2x H100 (NVLink 450 GB/s), analytic engine, roofline costs")
    S.save_fig(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    clock = S.Clock()
    args = S.parse_args(NAME, __doc__.split("\n\n")[0], argv)
    model = get_model("mixtral-8x7b")
    topo = topology()
    cost = CostModel.roofline(model, DEVICES["h100"])  # defaults: mfu 0.6, mbu 0.8, context 1024
    mapping = ExpertMapping.linear(model.num_layers, model.num_experts, 2)  # experts 0-3 on GPU 0, 4-7 on GPU 1
    batches = [1, 4, 16, 64] if args.quick else [2 ** i for i in range(11)]  # 1..256 asked; 512, 1024 beyond
    steps = 4 if args.quick else 32
    des_batches = {1, 64} if args.quick else {1, 16, 256}
    rows, checks = [], []
    for batch in batches:
        ids, step_tokens, origin = decode_steps(model, batch, steps, seed=batch)
        for layout in LAYOUTS:
            r = run_point(model, topo, cost, mapping, ids, step_tokens, origin, layout, "analytic")
            rows.append({"batch": batch, "layout": layout, **r})
            if batch in des_batches:
                d = run_point(model, topo, cost, mapping, ids[:, :batch * min(steps, 8)],
                              step_tokens[:min(steps, 8)], origin[:batch * min(steps, 8)], layout, "des")
                a = run_point(model, topo, cost, mapping, ids[:, :batch * min(steps, 8)],
                              step_tokens[:min(steps, 8)], origin[:batch * min(steps, 8)], layout, "analytic")
                checks.append({"batch": batch, "layout": layout, "analytic step_ms": a["step_ms"],
                               "des step_ms": d["step_ms"], "rel diff": d["step_ms"] / a["step_ms"] - 1,
                               "analytic bytes/token": a["bytes/token"], "des bytes/token": d["bytes/token"]})
    best = []
    pcie = topology(pcie=True)
    for batch in batches:
        sel = {r["layout"]: r["step_ms"] for r in rows if r["batch"] == batch}
        ids, step_tokens, origin = decode_steps(model, batch, steps, seed=batch)
        slow = {lay: run_point(model, pcie, cost, mapping, ids, step_tokens, origin, lay, "analytic")
                for lay in LAYOUTS}
        best.append({"batch": batch, "fastest (NVLink)": min(sel, key=sel.get),
                     **{f"{lay} ms": sel[lay] for lay in LAYOUTS}, "ep / tp": sel["ep"] / sel["tp"],
                     "fastest (PCIe)": min(slow, key=lambda k: slow[k]["step_ms"]),
                     **{f"{lay} ms PCIe": slow[lay]["step_ms"] for lay in LAYOUTS},
                     "ep / tp PCIe": slow["ep"]["step_ms"] / slow["tp"]["step_ms"]})
    cols = ["batch", "layout", "bytes/token", "step_ms", "tokens/s", "dense_ms", "comm_ms", "expert_ms", "moe_share",
            "busiest/mean GPU"]
    S.write_csv(args.out / "layouts.csv", rows, cols)
    S.write_csv(args.out / "des_check.csv", checks)
    S.write_csv(args.out / "fastest.csv", best)
    S.write_json(args.out / "setup.json", {"model": model.to_dict(), "topology": topo.summary(),
                                           "cost": cost.to_dict(), "mapping": "linear (experts 0-3 | 4-7)",
                                           "steps_per_point": steps, "seeds": "synth seed = batch size"})
    plot(rows, best, args.out / "ep_vs_tp.png")
    text = (S.table(rows, cols)
            + "\nFastest layout per batch (NVLink 450 GB/s; and the same GPUs on PCIe 5.0 x16, 64 GB/s):\n\n"
            + S.table(best)
            + "\nDES check (first steps of a few points):\n\n" + S.table(checks))
    S.publish(args, NAME, text, clock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
