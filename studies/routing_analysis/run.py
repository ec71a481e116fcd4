"""Routing analysis: expert load distribution and imbalance, real statistics vs synthetic presets.

Question: how unevenly do real MoE routers load their experts, layer by layer, and does moesim's synthetic
generator (moesim.trace.synth) reproduce those regimes (Mixtral near-balanced, OLMoE / Switch heavily skewed)?

Method: real counts from ../shared/data/routing (read with moesim.trace.importers.read_import); synthetic traces
of every large preset (moesim.trace.synth.generate_steps, default per-model skew, fixed seed), load summed over
the whole trace like the real statistics are. Per layer: busiest/mean, coefficient of variation, normalised
entropy, fraction of idle experts (and of near-idle ones, < 10% of the mean).

    python studies/routing_analysis/run.py [--quick]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _study as S

from moesim.models import get_model
from moesim.trace.importers import read_import
from moesim.trace.stats import entropy, imbalance
from moesim.trace.synth import SynthConfig, default_skew, generate_steps

NAME = "routing_analysis"
SYNTH_MODELS = ("mixtral-8x7b", "mixtral-8x22b", "olmoe-1b-7b", "switch-base-128", "qwen3-30b-a3b",
                "qwen3-235b-a22b", "deepseek-v3")
OLMOE_DOMAINS = ("arxiv", "book", "c4", "github", "tulu", "wikipedia")
MIXTRAL_DOMAINS = ("arxiv", "book", "c4", "github", "wikipedia")


def layer_metrics(load: np.ndarray) -> dict[str, np.ndarray]:
    """Per-layer imbalance figures of ``load [L, E]`` (token-choices per expert)."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean(axis=1)
    return {
        "busiest_mean": imbalance(load),
        "cv": np.divide(load.std(axis=1), mean, out=np.zeros_like(mean), where=mean > 0),
        "entropy": entropy(load),
        "idle": (load == 0).mean(axis=1),
        "near_idle": (load < 0.1 * mean[:, None]).mean(axis=1),
    }


def real_sources() -> list[dict[str, Any]]:
    """The real statistics: (label, model, layer indices, load [L, E], tokens per layer, citation)."""
    R = S.ROUTING_DATA
    out = []
    imp = read_import("mixtral-csv", [R / "mixtral-8x7b-expert-counts" / "expert_activation_count.csv"])
    out.append({"label": "Mixtral-8x7B-Instruct counts", "group": "mixtral", "model": imp.model,
                "layers": list(range(imp.model.num_layers)), "load": imp.counts.sum(axis=0),
                "citation": imp.meta.get("citation", "")})
    olmoe_json = R / "olmoe-routing-analysis" / "expert_counts_all.json"
    for select, domains, group, label in (("mistral/expert_counts", MIXTRAL_DOMAINS, "mixtral", "Mixtral-8x7B"),
                                          ("olmoe/expert_counts", OLMOE_DOMAINS, "olmoe", "OLMoE"),
                                          ("olmoe/expert_counts_top1", MIXTRAL_DOMAINS, "olmoe", "OLMoE top-1")):
        imp = read_import("olmoe", [olmoe_json], select=select)
        keys = [k.rsplit("/", 1)[-1] for k in imp.meta["steps"]]
        for d in domains:
            out.append({"label": f"{label} {d}", "group": group, "model": imp.model,
                        "layers": imp.meta["layers"], "load": imp.counts[keys.index(d)],
                        "citation": imp.meta.get("citation", ""), "domain": d})
        out.append({"label": f"{label} all domains", "group": group, "model": imp.model,
                    "layers": imp.meta["layers"], "load": imp.counts.sum(axis=0),
                    "citation": imp.meta.get("citation", ""), "domain": "all"})
    for variant in ("olmoe-sft", "olmoe-dpo"):
        imp = read_import("olmoe", [olmoe_json], select=f"{variant}/expert_counts")
        out.append({"label": f"OLMoE-{variant[6:].upper()} tulu", "group": "olmoe", "model": imp.model,
                    "layers": imp.meta["layers"], "load": imp.counts.sum(axis=0),
                    "citation": imp.meta.get("citation", ""), "domain": "tulu"})
    imp = read_import("switch", [R / "switch-base-128-expert-counts" / "expert_statistics_3d.json"])
    out.append({"label": "Switch-base-128", "group": "switch", "model": imp.model, "layers": imp.meta["layers"],
                "load": imp.counts.sum(axis=0), "citation": imp.meta.get("citation", "")})
    return out


def synth_sources(quick: bool) -> list[dict[str, Any]]:
    """Synthetic traces: a few prefill steps, then decode steps; load summed over all steps + per decode step."""
    cfg = (SynthConfig(steps=4, tokens=512, prefill_steps=2, decode_tokens=128, seed=0) if quick else
           SynthConfig(steps=48, tokens=4096, prefill_steps=8, decode_tokens=1024, seed=0))
    out = []
    for name in SYNTH_MODELS[:4] + SYNTH_MODELS[-1:] if quick else SYNTH_MODELS:
        model = get_model(name)
        total = np.zeros((model.num_layers, model.num_experts), dtype=np.int64)
        step_imb = []
        for ids, _w, _o, phase in generate_steps(model, cfg, threads=2):
            per = np.stack([np.bincount(ids[layer].ravel(), minlength=model.num_experts)
                            for layer in range(model.num_layers)])
            total += per
            if phase == "decode":
                step_imb.append(imbalance(per))
        out.append({"label": f"synth {name}", "group": "synth", "model": model,
                    "layers": list(range(model.num_layers)), "load": total,
                    "skew": default_skew(model), "step_busiest_mean": np.mean(step_imb, axis=0),
                    "decode_tokens": cfg.decode_tokens, "citation": "moesim.trace.synth (seed 0)"})
    return out


def summarise(src: dict[str, Any]) -> dict[str, Any]:
    m = layer_metrics(src["load"])
    src["metrics"] = m
    model = src["model"]
    row = {"source": src["label"], "kind": "synthetic" if src["group"] == "synth" else "real",
           "E": model.num_experts, "k": model.top_k, "layers": len(src["layers"]),
           "tokens/layer": int(src["load"][0].sum()) // model.top_k,
           "busiest/mean min": float(m["busiest_mean"].min()),
           "median": float(np.median(m["busiest_mean"])), "max": float(m["busiest_mean"].max()),
           "CV med": float(np.median(m["cv"])), "entropy med": float(np.median(m["entropy"])),
           "idle max": float(m["idle"].max()), "<10% mean med": float(np.median(m["near_idle"]))}
    if "step_busiest_mean" in src:
        row["decode-step busiest/mean med"] = float(np.median(src["step_busiest_mean"]))
    return row


def plot_per_layer(sources: list[dict[str, Any]], path: Path) -> None:
    plt = S.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    colors = {"mixtral": "tab:blue", "olmoe": "tab:red", "switch": "tab:purple"}
    for src in sources:
        if src["group"] == "synth":
            continue
        layers = np.asarray(src["layers"], dtype=float)
        depth = layers / max(layers.max(), 1) if len(layers) > 1 else layers
        domain = src.get("domain")
        strong = domain in (None, "all")
        axes[0].plot(depth, src["metrics"]["busiest_mean"], marker="o" if strong else ".",
                     lw=2 if strong else 0.8, alpha=1 if strong else 0.45,
                     ls="--" if "top-1" in src["label"] else "-", color=colors[src["group"]],
                     label=src["label"] if strong else None)
    axes[0].set_title("real statistics (thin: one domain; bold: all domains)")
    cmap = plt.get_cmap("tab10")
    for i, src in enumerate(s for s in sources if s["group"] == "synth"):
        L = len(src["layers"])
        depth = np.arange(L) / max(L - 1, 1)
        axes[1].plot(depth, src["metrics"]["busiest_mean"], color=cmap(i), lw=1.5, label=src["label"][6:])
    axes[1].set_title("synthetic presets (moesim.trace.synth, default skew)")
    for ax in axes:
        ax.set_yscale("log")
        ax.axhspan(1.1, 1.95, color="tab:blue", alpha=0.08)
        ax.set_xlabel("layer depth (layer index / last MoE layer)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    axes[0].set_ylabel("busiest expert load / mean (log)")
    fig.suptitle("Per-layer expert imbalance (shaded: real Mixtral range 1.1-1.95x)")
    S.save_fig(fig, path)


def plot_sorted(sources: list[dict[str, Any]], path: Path) -> None:
    plt = S.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    cmap = plt.get_cmap("tab10")
    picks = [s for s in sources if s.get("domain") in (None, "all") or s["label"] == "OLMoE arxiv"]
    used = [0, 0]
    for src in picks:
        load = np.asarray(src["load"], dtype=np.float64)
        rel = -np.sort(-load / load.mean(axis=1, keepdims=True), axis=1)
        E = rel.shape[1]
        x = (np.arange(E) + 0.5) / E
        panel = 0 if E <= 8 else 1
        ax, color = axes[panel], cmap(used[panel] % 10)
        used[panel] += 1
        synth = src["group"] == "synth"
        floor = np.maximum(rel, 1e-3)
        ax.plot(x, np.median(floor, axis=0), color=color, ls="--" if synth else "-", lw=1.8,
                marker="o" if E <= 8 else None, label=f"{src['label']} (E={E}, {len(src['layers'])} layers)")
        ax.fill_between(x, floor.min(axis=0), floor.max(axis=0), color=color, alpha=0.12)
    axes[0].set_title("8 experts (Mixtral)")
    axes[1].set_title("64-256 experts (OLMoE, Switch, Qwen3, DeepSeek-V3; log scale, floor 1e-3)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xlabel("expert rank / E (busiest first)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("load / mean (median over layers; band: min-max over layers)")
    fig.suptitle("Sorted expert load curves (solid: real; dashed: synthetic)")
    S.save_fig(fig, path)


def conclusion(sources: list[dict[str, Any]]) -> str:
    """Per regime: the real busiest/mean range, the synthetic preset's, and how many synthetic layers fall inside."""
    def values(pred: Any) -> np.ndarray:
        sel = [s["metrics"]["busiest_mean"] for s in sources if pred(s["label"])]
        return np.concatenate(sel) if sel else np.zeros(0)

    pairs = [("Mixtral-8x7B", lambda s: s.startswith("Mixtral-8x7B"), "mixtral-8x7b"),
             ("OLMoE (top-8, per domain and pooled)", lambda s: s.startswith("OLMoE") and "top-1" not in s,
              "olmoe-1b-7b"),
             ("Switch-base-128", lambda s: s == "Switch-base-128", "switch-base-128")]
    lines = []
    for what, pred, synth in pairs:
        real, syn = values(pred), values(lambda s, synth=synth: s == f"synth {synth}")
        if not len(syn):
            continue
        inside = np.mean((syn >= real.min()) & (syn <= real.max()))
        lines.append(f"- {what}: real busiest/mean {real.min():.2f}-{real.max():.2f}x (median {np.median(real):.2f}); "
                     f"synth {synth} {syn.min():.2f}-{syn.max():.2f}x (median {np.median(syn):.2f}); "
                     f"{inside:.0%} of synthetic layers inside the real range")
    for name in ("qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3"):
        syn = values(lambda s, name=name: s == f"synth {name}")
        if len(syn):
            lines.append(f"- synth {name}: {syn.min():.2f}-{syn.max():.2f}x (median {np.median(syn):.2f}; "
                         "no real statistic here to compare)")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    clock = S.Clock()
    args = S.parse_args(NAME, __doc__.split("\n\n")[0], argv)
    sources = real_sources() + synth_sources(args.quick)
    rows = [summarise(s) for s in sources]
    cols = ["source", "kind", "E", "k", "layers", "tokens/layer", "busiest/mean min", "median", "max", "CV med",
            "entropy med", "idle max", "<10% mean med", "decode-step busiest/mean med"]
    S.write_csv(args.out / "summary.csv", rows, cols)
    per_layer = []
    for s in sources:
        for i, layer in enumerate(s["layers"]):
            per_layer.append({"source": s["label"], "layer": layer,
                              **{k: float(v[i]) for k, v in s["metrics"].items()}})
    S.write_csv(args.out / "per_layer.csv", per_layer)
    S.write_json(args.out / "sources.json", [{"source": s["label"], "model": s["model"].name,
                                              "layers": s["layers"], "citation": s["citation"],
                                              "skew": s.get("skew")} for s in sources])
    plot_per_layer(sources, args.out / "per_layer_imbalance.png")
    plot_sorted(sources, args.out / "sorted_load.png")
    text = S.table(rows, cols)
    concl = conclusion(sources)
    S.publish(args, NAME, text + "\nConclusion (busiest/mean, real vs synthetic):\n\n" + concl, clock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
