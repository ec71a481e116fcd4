"""What load imbalance costs: step time of skewed placements vs a perfectly balanced one.

Question: as routing skew grows, how much slower is an MoE step under a naive (linear) placement than under a
balanced one (LPT packing; DeepSeek's EPLB with one redundant slot per GPU) and than the ideal (every GPU exactly
the mean load)? How does step time follow the busiest/mean GPU load, and when does imbalance matter at all?

Method: synthetic traces (moesim.trace.synth) with skew 0..1.5 for Qwen3-235B-A22B on one DGX H100 (8 GPUs) and
DeepSeek-V3 on four (32 GPUs); placements fitted on the first half of the steps, scored on the second half by
moesim's analytic engine, in a decode regime (128 tokens per GPU per step, per-token workload) and a prefill
regime (4096 tokens per GPU, the decode steps' expert loads scaled up).

    python studies/imbalance_cost/run.py [--quick]
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
from moesim.placement import lower_bound, place
from moesim.sim import SimConfig, simulate, workload_from_counts, workload_from_ids
from moesim.topo import load_topology
from moesim.trace.stats import imbalance
from moesim.trace.synth import SynthConfig, generate_steps

NAME = "imbalance_cost"
# (model preset, topology preset): each model's bf16 weights fit its cluster — Qwen3-235B-A22B ~470 GB on
# 8 x 80 GB, DeepSeek-V3 ~1.34 TB on 32 x 80 GB (moesim/models.py shapes, moesim/topo/devices.py HBM sizes).
SETUPS = (("qwen3-235b-a22b", "dgx-h100"), ("deepseek-v3", "dgx-h100:4"))
DECODE_PER_GPU = 128  # decode tokens per GPU per step
PREFILL_PER_GPU = 4096  # prefill tokens per GPU per step
PLACEMENTS = ("linear", "lpt", "eplb+1")  # eplb+1: one redundant slot per GPU (DeepSeek's EP32: 9 slots/GPU)
DECODE, PREFILL = 0, 1  # trace phase codes


def synth(model: Any, G: int, tokens: int, steps: int, skew: float) -> tuple[np.ndarray, np.ndarray]:
    """ids [L, steps*tokens, k] and origin [steps*tokens] of decode steps at the given skew (seed 0)."""
    cfg = SynthConfig(steps=steps, tokens=tokens, decode_tokens=tokens, prefill_steps=0, num_ranks=G,
                      skew=skew, seed=0)
    ids, origin = [], []
    for i, _w, o, _ph in generate_steps(model, cfg, threads=2):
        ids.append(i)
        origin.append(o)
    return np.concatenate(ids, axis=1), np.concatenate(origin)


def step_counts(ids: np.ndarray, steps: int, E: int) -> np.ndarray:
    """[steps, L, E] token-choices per expert of each step."""
    L, T, _k = ids.shape
    per = T // steps
    out = np.zeros((steps, L, E))
    for s in range(steps):
        for layer in range(L):
            out[s, layer] = np.bincount(ids[layer, s * per:(s + 1) * per].ravel(), minlength=E)
    return out


def mappings(load: np.ndarray, model: Any, G: int) -> dict[str, ExpertMapping]:
    """The placements compared, fitted to ``load [L, E]``."""
    E = model.num_experts
    groups = {"num_groups": model.num_groups}
    return {"linear": ExpertMapping.linear(model.num_layers, E, G),
            "lpt": place(load, "lpt", num_gpus=G, num_slots=E).mapping,
            "eplb+1": place(load, "eplb", num_gpus=G, num_slots=E + G, **groups).mapping}


def measure(wl: Any, topo: Any, mapping: ExpertMapping, cost: CostModel, model: Any, cfg: SimConfig,
            load: np.ndarray, slots: int) -> dict[str, Any]:
    res = simulate(wl, topo, mapping, cost, model, cfg, engine="analytic")
    summ = res.summary(topo)
    pt = np.asarray(res.phase_time)
    lb = lower_bound(load, topo.num_gpus, slots)
    gl = np.asarray(res.gpu_load, dtype=float)  # [L, G] token-choices per GPU over the scored steps
    return {"step_ms": 1e3 * summ["step_latency_mean_s"], "busiest/mean GPU": summ["busiest_gpu_over_mean_load"],
            "busiest/bound": float(gl.max(axis=1).sum() / lb.sum()) if lb.sum() > 0 else 1.0,
            "moe_share": summ["moe_share"], "expert_ms": 1e3 * float(pt[..., 3].sum(axis=1).mean()),
            "comm_ms": 1e3 * float(pt[..., [2, 4]].sum(axis=(1, 2)).mean())}


def engines_check(wl: Any, topo: Any, mapping: ExpertMapping, cost: CostModel, model: Any,
                  cfg: SimConfig) -> dict[str, float]:
    """Step time of the workload's last step by the analytic engine and by the discrete-event engine (ms)."""
    last = wl.window(wl.num_steps - 1, wl.num_steps)
    out = {}
    for engine in ("analytic", "des"):
        res = simulate(last, topo, mapping, cost, model, cfg, engine=engine)
        out[engine] = 1e3 * float(np.sum(res.step_time))
        pt = np.asarray(res.phase_time)
        out[f"{engine} combine"] = 1e3 * float(pt[..., 4].sum())
    return out


def run_setup(model_name: str, topo_name: str, skews: Sequence[float], steps: int,
              des_skews: Sequence[float] = ()) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    model = get_model(model_name)
    topo = load_topology(topo_name)
    G = topo.num_gpus
    cost = CostModel.roofline(model, topo.device)
    cfg = SimConfig()
    fit, score = slice(0, steps // 2), slice(steps // 2, steps)
    n_score = steps - steps // 2
    B = DECODE_PER_GPU * G
    scale = PREFILL_PER_GPU / DECODE_PER_GPU
    rows, checks = [], []
    for skew in skews:
        ids, origin = synth(model, G, B, steps, skew)
        counts = step_counts(ids, steps, model.num_experts)  # [steps, L, E]
        fit_load = counts[fit].sum(axis=0)
        score_load = counts[score].sum(axis=0)
        expert_imb = float(np.median(imbalance(score_load)))
        maps = mappings(fit_load, model, G)
        uniform = np.full((n_score, model.num_layers, model.num_experts), B * model.top_k / model.num_experts)
        lin = maps["linear"]
        for regime in ("decode", "prefill"):
            tokens = np.full(n_score, B if regime == "decode" else int(B * scale), dtype=np.int64)
            phase = np.full(n_score, DECODE if regime == "decode" else PREFILL, np.uint8)
            factor = 1.0 if regime == "decode" else scale
            ideal_wl = workload_from_counts(uniform * factor, tokens, lin, cfg, phase=phase, top_k=model.top_k)
            ideal = measure(ideal_wl, topo, lin, cost, model, cfg, score_load * factor, model.num_experts)
            ideal["busiest/bound"] = float("nan")  # the ideal is no placement of this load: no bound applies
            lb = lower_bound(score_load, G, model.num_experts)  # without replicas: the hottest expert is a floor
            base = {"model": model_name, "topology": topo_name, "GPUs": G, "regime": regime,
                    "tokens/step": int(tokens[0]), "skew": skew, "expert busiest/mean": expert_imb,
                    "bound/mean": float(lb.sum() / (score_load.sum() / G))}
            rows.append({**base, "placement": "ideal", **ideal, "vs ideal": 1.0})
            check = regime == "decode" and skew in des_skews
            if check:
                ideal_e = engines_check(ideal_wl, topo, lin, cost, model, cfg)
                checks.append({"model": model_name, "GPUs": G, "regime": regime, "skew": skew, "placement": "ideal",
                               "analytic ms": ideal_e["analytic"], "DES ms": ideal_e["des"],
                               "DES / analytic": ideal_e["des"] / ideal_e["analytic"],
                               "analytic vs ideal": 1.0, "DES vs ideal": 1.0,
                               "analytic combine ms": ideal_e["analytic combine"],
                               "DES combine ms": ideal_e["des combine"]})
            for name, mp in maps.items():
                if regime == "decode":  # per-token: each token's own choices, dispatched from its origin GPU
                    wl = workload_from_ids(ids[:, score.start * B:], tokens, mp, cfg,
                                           origin=origin[score.start * B:], phase=phase)
                else:  # the scored steps' expert loads, scaled to the prefill batch
                    wl = workload_from_counts(counts[score] * factor, tokens, mp, cfg, phase=phase,
                                              top_k=model.top_k)
                r = measure(wl, topo, mp, cost, model, cfg, score_load * factor, mp.phy2log.shape[1])
                rows.append({**base, "placement": name, **r, "vs ideal": r["step_ms"] / ideal["step_ms"]})
                if check:
                    e = engines_check(wl, topo, mp, cost, model, cfg)
                    checks.append({"model": model_name, "GPUs": G, "regime": regime, "skew": skew, "placement": name,
                                   "analytic ms": e["analytic"], "DES ms": e["des"],
                                   "DES / analytic": e["des"] / e["analytic"],
                                   "analytic vs ideal": e["analytic"] / ideal_e["analytic"],
                                   "DES vs ideal": e["des"] / ideal_e["des"],
                                   "analytic combine ms": e["analytic combine"], "DES combine ms": e["des combine"]})
    return rows, checks


def plot_vs_skew(rows: list[dict[str, Any]], path: Path) -> None:
    plt = S.pyplot()
    panels = sorted({(r["model"], r["topology"], r["regime"]) for r in rows}, key=lambda x: (x[1], x[2]))
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7.5), squeeze=False)
    style = {"linear": "o-", "lpt": "s--", "eplb+1": "^-.", "ideal": "k:"}
    for j, (m, t, regime) in enumerate(panels):
        for name in ("ideal", *PLACEMENTS):
            sel = [r for r in rows if (r["model"], r["topology"], r["regime"], r["placement"]) == (m, t, regime, name)]
            x = [r["skew"] for r in sel]
            axes[0, j].plot(x, [r["vs ideal"] for r in sel], style[name], label=name)
            axes[1, j].plot(x, [r["moe_share"] for r in sel], style[name], label=name)
        axes[0, j].set_title(f"{m} on {t}\n{regime}, {sel[0]['tokens/step']} tokens/step", fontsize=9)
        axes[1, j].set_xlabel("synthetic routing skew")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("step time / ideal (balanced) step time")
    axes[1, 0].set_ylabel("MoE share of step time")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Cost of load imbalance (analytic engine, held-out steps)")
    S.save_fig(fig, path)


def plot_vs_busiest(rows: list[dict[str, Any]], path: Path) -> None:
    plt = S.pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    marks = {"linear": "o", "lpt": "s", "eplb+1": "^", "ideal": "D"}
    colors = {"decode": "tab:blue", "prefill": "tab:red"}
    for r in rows:
        ax.scatter(r["busiest/mean GPU"], r["vs ideal"], marker=marks[r["placement"]], color=colors[r["regime"]],
                   alpha=0.75, s=28 if r["model"].startswith("deepseek") else 18,
                   edgecolors="k" if r["model"].startswith("deepseek") else "none", linewidths=0.4)
    x = np.linspace(1, max(r["busiest/mean GPU"] for r in rows), 20)
    ax.plot(x, x, "k--", lw=0.8, label="step time proportional to busiest GPU")
    for regime, c in colors.items():
        ax.scatter([], [], color=c, label=regime)
    for name, mk in marks.items():
        ax.scatter([], [], marker=mk, color="gray", label=name)
    ax.set_xlabel("busiest / mean GPU load (token-choices, held-out steps)")
    ax.set_ylabel("step time / ideal step time")
    ax.set_title("Step time vs busiest/mean GPU load\n(outlined: DeepSeek-V3 on 32 GPUs; plain: Qwen3-235B on 8)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    S.save_fig(fig, path)


def pivot(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setup, regime, skew): busiest/mean GPU load and step time / ideal of each placement."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["model"], r["regime"], r["skew"])
        row = out.setdefault(key, {"model": r["model"], "GPUs": r["GPUs"], "regime": r["regime"],
                                   "tok/step": r["tokens/step"], "skew": r["skew"],
                                   "expert b/m": r["expert busiest/mean"], "no-replica bound/mean": r["bound/mean"]})
        if r["placement"] == "ideal":
            row["ideal ms"] = r["step_ms"]
            row["MoE share ideal"] = r["moe_share"]
        else:
            row[f"{r['placement']} GPU b/m"] = r["busiest/mean GPU"]
            row[f"{r['placement']} /ideal"] = r["vs ideal"]
            if r["placement"] == "linear":
                row["MoE share linear"] = r["moe_share"]
    order = ["model", "GPUs", "regime", "tok/step", "skew", "expert b/m", "no-replica bound/mean"]
    order += [f"{p} {c}" for p in PLACEMENTS for c in ("GPU b/m", "/ideal")]
    order += ["ideal ms", "MoE share ideal", "MoE share linear"]
    return [{c: row[c] for c in order} for _k, row in sorted(out.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                          kv[0][2]))]


def main(argv: Sequence[str] | None = None) -> int:
    clock = S.Clock()
    args = S.parse_args(NAME, __doc__.split("\n\n")[0], argv)
    skews = (0.0, 1.0) if args.quick else (0.0, 0.3, 0.6, 0.9, 1.2, 1.5)
    steps = 2 if args.quick else 6
    setups = (("qwen3-30b-a3b", "dgx-h100"),) if args.quick else SETUPS
    # the discrete-event engine re-runs the last decode step of a few points (DeepSeek-V3: contention across nodes)
    des = {"qwen3-30b-a3b": (1.0,)} if args.quick else {"deepseek-v3": (0.0, 0.9, 1.5)}
    rows, checks = [], []
    for model_name, topo_name in setups:
        r, c = run_setup(model_name, topo_name, skews, steps, des.get(model_name, ()))
        rows += r
        checks += c
    cols = ["model", "topology", "regime", "tokens/step", "skew", "expert busiest/mean", "placement",
            "busiest/mean GPU", "busiest/bound", "step_ms", "vs ideal", "moe_share", "expert_ms", "comm_ms"]
    S.write_csv(args.out / "imbalance_cost.csv", rows, cols)
    plot_vs_skew(rows, args.out / "vs_skew.png")
    plot_vs_busiest(rows, args.out / "vs_busiest.png")
    cols.insert(6, "bound/mean")
    S.write_csv(args.out / "imbalance_cost.csv", rows, cols)
    S.write_csv(args.out / "des_check.csv", checks)
    text = (S.table(pivot(rows)) + "\nDES check (last held-out decode step; vs ideal = step time / the ideal's, "
            "same engine):\n\n" + S.table(checks))
    S.publish(args, NAME, text, clock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
