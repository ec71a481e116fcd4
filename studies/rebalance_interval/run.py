"""Rebalance interval vs migration cost: when is moving experts worth it?

Question: the expert popularity drifts over time, so a placement fitted once degrades. Re-placing every N steps
(vLLM's EPLB ``step_interval``) restores balance but moves expert weights between GPUs. For which intervals does
periodic rebalancing beat a static placement, with the moves blocking the step (stall) or overlapped with it,
and how does the answer depend on how fast the routing drifts?

Method: a DeepSeek-V3-shaped model (256 experts, top-8 in 8 groups, expert FFN 2048, hidden 7168; 16 MoE layers
instead of 58 so the 16 GPUs hold it and the study runs in minutes) on two DGX H100s (dgx-h100:2, 17 slots per
GPU). Synthetic routing (moesim.trace.synth) with drift 0.005 / 0.02 / 0.08 per step; per-step expert loads of
1024 sampled tokens scaled to 16384 tokens per step (1024 per GPU, a chunked-prefill-sized batch) and written
as a load-only trace. The grid is ``sweep.toml`` (``sweep-quick.toml`` for --quick), run by ``moesim sweep``'s
library: each cell is ``moesim replay --rebalance periodic:interval=N,window=min(32,N)`` (or ``static``) from an
initial EPLB placement fitted on steps 0-31, with EPLB from scratch or the incremental rebalancer (bounded swaps
from the current mapping) re-placing, every move of expert weights charged over the topology as a stall; the
overlapped variant is the same replay without its stalls.

    python studies/rebalance_interval/run.py [--quick] [--ray [ADDRESS]]
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
from moesim.models import get_model
from moesim.placement import place
from moesim.sweep import load_spec, run_sweep
from moesim.sweep.spec import read_toml
from moesim.topo import load_topology
from moesim.trace import Trace
from moesim.trace.synth import SynthConfig, generate_steps
from moesim.trace.writer import TraceWriter

NAME = "rebalance_interval"
HERE = Path(__file__).resolve().parent
TOPOLOGY = "dgx-h100:2"
LAYERS = 16  # DeepSeek-V3 has 58 MoE layers; 16 keep the weights within 16 x 80 GB and the study fast
SAMPLE_TOKENS = 1024  # tokens sampled per step by the synthetic router
STEP_TOKENS = 16384  # tokens per step the loads are scaled to (1024 per GPU)
WINDOW = 32  # steps of load each re-placement is fitted to
ALGO = "eplb"  # the initial placement: DeepSeek's EPLB (hierarchical here: 8 groups over 2 nodes)
REBALANCERS = ("eplb", "incremental", "incremental-4")  # the spec's rebalancer labels, in its order


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


def make_inputs(spec_path: Path, model: Any, topo: Any, steps: int, sample: int) -> None:
    """Write each trace and initial mapping the spec's cases name (if missing): drift from the case's label,
    the initial placement EPLB fitted on the first WINDOW steps, one redundant slot per GPU."""
    G = topo.num_gpus
    for case in read_toml(spec_path)["axes"]["case"]:
        trace, mapping = spec_path.parent / case["trace"], spec_path.parent / case["mapping"]
        trace.parent.mkdir(exist_ok=True)
        if not trace.exists():
            write_trace(model, trace, steps, float(case["label"].split()[-1]), sample, STEP_TOKENS)
        if not mapping.exists():
            with Trace.open(trace) as t:
                load = t.load(0, min(WINDOW, steps)).sum(axis=0).astype(float)
            place(load, ALGO, num_gpus=G, num_slots=model.num_experts + G, gpus_per_node=topo.gpus_per_node,
                  num_groups=model.num_groups).mapping.save(mapping)


def rows_of(sweep_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sweep's table (one row per drift × rebalancer × policy) as the study's rows: per drift one static row,
    then per rebalancer and interval a blocking row and an overlapped one (the same replay without its stalls)."""
    out = []
    for c in sweep_rows:
        if c["status"] != "ok":
            raise SystemExit(f"cell {c['cell']} ({c['case']}, {c['rebalancer']}, {c['rebalance']}) failed: "
                             f"{c['error']}")
    statics = {c["case"]: c for c in sweep_rows if c["rebalance"] == "static" and c["rebalancer"] == "eplb"}
    for c in sweep_rows:
        drift = float(c["case"].split()[-1])
        t_static = statics[c["case"]]["total_time_s"]
        if c["rebalance"] == "static":
            if c["rebalancer"] == "eplb":
                out.append(row(drift, "-", "static", None, c, t_static))
            continue
        interval = int(c["rebalance"].split("interval=")[1].split(",")[0])
        out.append(row(drift, c["rebalancer"], "blocking", interval, c, t_static))
        out.append(row(drift, c["rebalancer"], "overlapped", interval, c, t_static))
    return out


def row(drift: float, label: str, mode: str, interval: int | None, c: dict[str, Any],
        t_static: float) -> dict[str, Any]:
    n = c.get("rebalances") or 0
    moved = c.get("rebalance_moved_bytes") or 0.0
    seconds = c.get("rebalance_seconds") or 0.0
    no_stalls = c["total_time_s"] - c["stall_time_s"]
    total = c["total_time_s"] if mode != "overlapped" else no_stalls
    return {"drift": drift, "rebalancer": label, "mode": mode, "interval": interval if interval is not None else "-",
            "rebalances": n, "moved GB": moved / 1e9, "GB/rebalance": moved / 1e9 / n if n else 0.0,
            "s/rebalance": seconds / n if n else 0.0, "stall s": seconds if mode == "blocking" else 0.0,
            "total s": total, "vs static": total / t_static, "busiest/mean GPU": c["busiest_gpu_over_mean_load"],
            "mean step ms (no stalls)": 1e3 * no_stalls / c["steps"]}


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

    def extra(p: Any) -> None:
        p.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                       help="run the sweep's cells on Ray (a new local cluster, or the one at ADDRESS)")

    args = S.parse_args(NAME, __doc__.split("\n\n")[0], argv, extra)
    model = study_model()
    topo = load_topology(TOPOLOGY)
    steps, sample = (40, 128) if args.quick else (300, SAMPLE_TOKENS)
    spec_path = HERE / ("sweep-quick.toml" if args.quick else "sweep.toml")
    make_inputs(spec_path, model, topo, steps, sample)
    res = run_sweep(load_spec(spec_path), args.out / "sweep", workers=1 if args.quick else None, ray=args.ray,
                    progress=sys.stderr.isatty())
    rows = rows_of(res.rows)
    cols = ["drift", "rebalancer", "mode", "interval", "rebalances", "moved GB", "GB/rebalance", "s/rebalance",
            "stall s", "total s", "vs static", "busiest/mean GPU", "mean step ms (no stalls)"]
    S.write_csv(args.out / "rebalance.csv", rows, cols)
    cross = crossover(rows)
    S.write_csv(args.out / "crossover.csv", cross)
    cost = CostModel.roofline(model, topo.device)  # what each cell's `--cost roofline` builds
    S.write_json(args.out / "setup.json", {"model": model.to_dict(), "topology": TOPOLOGY, "steps": steps,
                                           "sample_tokens": sample, "step_tokens": STEP_TOKENS, "window": WINDOW,
                                           "initial": ALGO, "sweep": spec_path.name,
                                           "slots_per_gpu": model.num_experts // topo.num_gpus + 1,
                                           "expert_bytes": model.expert_bytes, "cost": cost.to_dict()})
    plot(rows, args.out / "rebalance_interval.png")
    text = (S.table(rows, cols) + "\nCrossover:\n\n" + S.table(cross)
            + f"\n{len(res.rows)} sweep cells ({res.ran} run, {res.cached} cached); sweep table: "
              f"{args.out.name}/sweep/results.csv\n")
    S.publish(args, NAME, text, clock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
