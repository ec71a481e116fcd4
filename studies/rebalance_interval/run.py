"""Rebalance interval vs migration cost: when is moving experts worth it?

Question: the expert popularity drifts over time, so a placement fitted once degrades. Re-placing every N steps
(vLLM's EPLB ``step_interval``) restores balance but moves expert weights between GPUs. For which intervals does
periodic rebalancing beat a static placement, with the moves blocking the step (stall) or overlapped with it,
and how does the answer depend on how fast the routing drifts?

Method: a DeepSeek-V3-shaped model (256 experts, top-8 in 8 groups, expert FFN 2048, hidden 7168; 16 MoE layers
instead of 58 so the 16 GPUs hold it and the study runs in minutes) on two DGX H100s (dgx-h100:2, 17 slots per
GPU). Synthetic routing (moesim.trace.synth) with drift 0.005 / 0.02 / 0.08 per step; per-step expert loads of
1024 sampled tokens scaled to 16384 tokens per step (1024 per GPU, a chunked-prefill-sized batch) and written
as a load-only trace. moesim.placement.rebalance.replay_with_rebalance replays it with a static placement and with
periodic re-placement (window 32 steps) by EPLB from scratch or by the incremental rebalancer (bounded swaps from
the current mapping), charging every move of expert weights over the topology.

    python studies/rebalance_interval/run.py [--quick]
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _study as S

from moesim.cost import CostModel
from moesim.models import get_model
from moesim.placement import place
from moesim.placement.rebalance import replay_with_rebalance
from moesim.topo import load_topology
from moesim.trace import Trace
from moesim.trace.synth import SynthConfig, generate_steps
from moesim.trace.writer import TraceWriter

NAME = "rebalance_interval"
TOPOLOGY = "dgx-h100:2"
LAYERS = 16  # DeepSeek-V3 has 58 MoE layers; 16 keep the weights within 16 x 80 GB and the study fast
SAMPLE_TOKENS = 1024  # tokens sampled per step by the synthetic router
STEP_TOKENS = 16384  # tokens per step the loads are scaled to (1024 per GPU)
WINDOW = 32  # steps of load each re-placement is fitted to
ALGO = "eplb"  # the initial placement: DeepSeek's EPLB (hierarchical here: 8 groups over 2 nodes)
# re-placement algorithms compared: label -> (moesim.placement algorithm, its keywords)
REBALANCERS: dict[str, tuple[str, dict[str, Any]]] = {
    "eplb": ("eplb", {}),  # from scratch, as vLLM and SGLang rebalance
    "incremental": ("incremental", {}),  # from the current mapping, at most 64 swaps per layer (library default)
    "incremental-4": ("incremental", {"max_swaps": 4}),  # a tight move budget: at most 4 swaps per layer
}


def study_model() -> Any:
    """DeepSeek-V3's per-layer shape with 16 MoE layers and no dense layers."""
    return get_model("deepseek-v3").with_(name="deepseek-v3-16l", num_layers=LAYERS, num_dense_layers=0)


def write_trace(model: Any, path: Path, steps: int, drift: float, sample: int, step_tokens: int) -> Path:
    """A load-only trace: per step, the expert counts of ``sample`` synthetic tokens scaled to ``step_tokens``."""
    cfg = SynthConfig(steps=steps, tokens=sample, decode_tokens=sample, prefill_steps=0, drift=drift, seed=0,
                      origin=False, weights=False)
    scale = step_tokens // sample
    with TraceWriter(path, model, kind="counts", meta={"source": "studies/rebalance_interval",
                                                      "synth": cfg.to_dict(), "scale": scale}, atomic=True) as w:
        for ids, _w, _o, _ph in generate_steps(model, cfg, threads=2):
            counts = np.stack([np.bincount(ids[layer].ravel(), minlength=model.num_experts)
                               for layer in range(model.num_layers)])
            w.add_counts(counts * scale, "prefill")
    return path


def run_drift(model: Any, topo: Any, cost: CostModel, drift: float, steps: int, intervals: Sequence[int],
              sample: int, step_tokens: int, tmp: Path, rebalancers: Sequence[str]) -> list[dict[str, Any]]:
    G = topo.num_gpus
    slots = model.num_experts + G  # one redundant slot per GPU: 17 per GPU
    kw = {"num_groups": model.num_groups}
    path = write_trace(model, tmp / f"drift{drift}.mtrace", steps, drift, sample, step_tokens)
    rows = []
    with Trace.open(path) as trace:
        warm = min(WINDOW, steps)
        initial = place(trace.load(0, warm).sum(axis=0).astype(float), ALGO, num_gpus=G, num_slots=slots,
                        gpus_per_node=topo.gpus_per_node, **kw).mapping
        static, _ = replay_with_rebalance(trace, topo, cost, model, initial, "static", ALGO, place_kw=kw)
        t_static = float(np.sum(static.step_time))
        rows.append(row(drift, "-", "static", None, static, [], t_static, t_static, topo))
        for label in rebalancers:
            algo, extra = REBALANCERS[label]
            for interval in intervals:
                policy = f"periodic:interval={interval},window={min(WINDOW, interval)}"
                res, sched = replay_with_rebalance(trace, topo, cost, model, initial, policy, algo,
                                                   place_kw={**kw, **extra}, blocking=True)
                total = float(np.sum(res.step_time))
                # overlapped: the same schedule and mappings, the copies hidden behind compute (no stall)
                rows.append(row(drift, label, "blocking", interval, res, sched, total, t_static, topo))
                rows.append(row(drift, label, "overlapped", interval, res, sched,
                                total - float(np.sum(res.stall_time)), t_static, topo))
    return rows


def row(drift: float, label: str, mode: str, interval: int | None, res: Any, sched: list, total: float,
        t_static: float, topo: Any) -> dict[str, Any]:
    summ = res.summary(topo)
    moved = sum(e.moved_bytes for e in sched)
    stall = sum(e.seconds for e in sched) if mode == "blocking" else 0.0
    return {"drift": drift, "rebalancer": label, "mode": mode, "interval": interval if interval is not None else "-",
            "rebalances": len(sched), "moved GB": moved / 1e9,
            "GB/rebalance": moved / 1e9 / len(sched) if sched else 0.0,
            "s/rebalance": float(np.mean([e.seconds for e in sched])) if sched else 0.0,
            "stall s": stall, "total s": total, "vs static": total / t_static,
            "busiest/mean GPU": summ["busiest_gpu_over_mean_load"],
            "mean step ms (no stalls)": 1e3 * (float(np.sum(res.step_time)) - float(np.sum(res.stall_time)))
            / res.num_steps}


def crossover(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per drift, rebalancer and mode: the best interval, and the shortest interval that still beats static."""
    out = []
    for drift in sorted({r["drift"] for r in rows}):
        for label in REBALANCERS:
            for mode in ("blocking", "overlapped"):
                sel = [r for r in rows if (r["drift"], r["rebalancer"], r["mode"]) == (drift, label, mode)]
                if not sel:
                    continue
                best = min(sel, key=lambda r: r["total s"])
                winners = [r["interval"] for r in sel if r["vs static"] < 1.0]
                out.append({"drift": drift, "rebalancer": label, "mode": mode, "best interval": best["interval"],
                            "best vs static": best["vs static"],
                            "shortest interval beating static": min(winners) if winners else "none",
                            "GB/rebalance": best["GB/rebalance"]})
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = S.pyplot()
    drifts = sorted({r["drift"] for r in rows})
    labels = [lab for lab in REBALANCERS if any(r["rebalancer"] == lab for r in rows)]
    fig, axes = plt.subplots(1, len(labels) + 1, figsize=(4.6 * (len(labels) + 1), 4.5), squeeze=False)
    axes = axes[0]
    cmap = plt.get_cmap("viridis")
    for i, drift in enumerate(drifts):
        c = cmap(i / max(len(drifts) - 1, 1) * 0.85)
        for j, label in enumerate(labels):
            for mode, ls in (("blocking", "-o"), ("overlapped", "--s")):
                sel = sorted((r for r in rows if (r["drift"], r["rebalancer"], r["mode"]) == (drift, label, mode)),
                             key=lambda r: r["interval"])
                axes[j].plot([r["interval"] for r in sel], [r["vs static"] for r in sel], ls, color=c,
                             label=f"drift {drift}, {mode}")
            axes[j].set_title(f"rebalancer {label}: total time / static", fontsize=10)
            sel = sorted((r for r in rows if (r["drift"], r["rebalancer"], r["mode"]) == (drift, label, "blocking")),
                         key=lambda r: r["interval"])
            axes[-1].plot([r["interval"] for r in sel], [r["mean step ms (no stalls)"] for r in sel],
                          ["-o", "--s", ":^"][j % 3], color=c, label=f"drift {drift}, {label}")
        st = next(r for r in rows if r["drift"] == drift and r["mode"] == "static")
        axes[-1].axhline(st["mean step ms (no stalls)"], color=c, ls=":", lw=1)
    lo = min(ax.get_ylim()[0] for ax in axes[:-1])
    hi = max(ax.get_ylim()[1] for ax in axes[:-1])
    for ax in axes[:-1]:  # one scale for the rebalancers, so they compare at a glance
        ax.set_ylim(lo, hi)
        ax.axhline(1.0, color="k", lw=1)
    axes[0].set_ylabel("total time incl. stalls / static total (below 1: pays)")
    axes[-1].set_ylabel("mean step time without stalls (ms; dotted: static)")
    axes[-1].set_title("What the balance buys per step", fontsize=10)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("rebalance interval (steps)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.suptitle(f"Periodic rebalancing, DeepSeek-V3-shaped ({LAYERS} layers) on {TOPOLOGY}")
    S.save_fig(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    clock = S.Clock()
    args = S.parse_args(NAME, __doc__.split("\n\n")[0], argv)
    model = study_model()
    topo = load_topology(TOPOLOGY)
    cost = CostModel.roofline(model, topo.device)
    if args.quick:
        drifts, steps, intervals, sample = (0.08,), 40, (10, 20), 128
        rebalancers: Sequence[str] = ("eplb", "incremental-4")
    else:
        drifts, steps, intervals, sample = (0.005, 0.02, 0.08), 300, (10, 20, 50, 100, 150), SAMPLE_TOKENS
        rebalancers = tuple(REBALANCERS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="moesim-study-") as tmp:
        for drift in drifts:
            rows += run_drift(model, topo, cost, drift, steps, intervals, sample, STEP_TOKENS, Path(tmp), rebalancers)
            print(f"  drift {drift} done ({clock})", file=sys.stderr)
    cols = ["drift", "rebalancer", "mode", "interval", "rebalances", "moved GB", "GB/rebalance", "s/rebalance",
            "stall s", "total s", "vs static", "busiest/mean GPU", "mean step ms (no stalls)"]
    S.write_csv(args.out / "rebalance.csv", rows, cols)
    cross = crossover(rows)
    S.write_csv(args.out / "crossover.csv", cross)
    S.write_json(args.out / "setup.json", {"model": model.to_dict(), "topology": TOPOLOGY, "steps": steps,
                                           "sample_tokens": sample, "step_tokens": STEP_TOKENS, "window": WINDOW,
                                           "initial": ALGO,
                                           "rebalancers": {k: [a, kw] for k, (a, kw) in REBALANCERS.items()},
                                           "slots_per_gpu": model.num_experts // topo.num_gpus + 1,
                                           "expert_bytes": model.expert_bytes, "cost": cost.to_dict()})
    plot(rows, args.out / "rebalance_interval.png")
    text = S.table(rows, cols) + "\nCrossover:\n\n" + S.table(cross)
    S.publish(args, NAME, text, clock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
