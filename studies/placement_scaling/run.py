"""Placement algorithms from 1 to 8 nodes of H100s, for Mixtral-8x7B and DeepSeek-V3, scored on held-out steps.

Question: how do the placement algorithms (linear, round_robin, lpt, greedy, eplb, milp, affinity) compare as
the cluster grows from one DGX H100 to eight — in balance (busiest GPU / lower bound, balancedness), inter-node
traffic, predicted step time, and their own running time — for a few-expert model (Mixtral, 8 experts) and a
many-expert one (DeepSeek-V3, 256 experts)?

Method: per (model, cluster) a synthetic decode trace (moesim.trace.synth, 128 tokens per GPU per step, seed 0);
each algorithm fitted on the first half of the steps and scored on the second half with
moesim.placement.compare.compare (the library behind ``moesim compare``): load-only scores and the analytic
engine's step time and inter-node bytes.

    python studies/placement_scaling/run.py [--quick]
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _study as S

from moesim.models import get_model
from moesim.placement.compare import compare
from moesim.placement.inputs import LoadSource
from moesim.topo import load_topology
from moesim.trace import Trace
from moesim.trace.synth import SynthConfig, synthesize

NAME = "placement_scaling"
ALGOS = ("linear", "round_robin", "lpt", "greedy", "eplb", "eplb-global", "milp", "affinity")
MODELS = ("mixtral-8x7b", "deepseek-v3")
NODES = (1, 2, 4, 8)
TOKENS_PER_GPU = 128  # decode tokens per GPU per step (weak scaling: the batch grows with the cluster)
MILP_SECONDS = 5.0  # milp's time limit, shared over the layers (then greedy stands for the rest)


def slots_per_gpu(num_experts: int, num_gpus: int) -> int:
    """Enough slots to hold every expert, plus one redundant slot per GPU (DeepSeek's EP32 uses 9 for 256/32)."""
    return -(-num_experts // num_gpus) + 1


def run_case(model_name: str, nodes: int, steps: int, tokens_per_gpu: int, milp_seconds: float,
             tmp: Path) -> list[dict[str, Any]]:
    model = get_model(model_name)
    topo = load_topology("dgx-h100" if nodes == 1 else f"dgx-h100:{nodes}")
    G = topo.num_gpus
    T = tokens_per_gpu * G
    cfg = SynthConfig(steps=steps, tokens=T, decode_tokens=T, prefill_steps=0, num_ranks=G, seed=0)
    path = synthesize(model, cfg, tmp / f"{model_name}-{nodes}.mtrace")
    spg = slots_per_gpu(model.num_experts, G)
    with Trace.open(path) as trace:
        load = trace.load(0, steps).sum(axis=0).astype(float)
        src = LoadSource(load, model, trace, (0, steps), f"synth {model_name}")
        res = compare(src, topo, list(ALGOS), spg * G, holdout=0.5,
                      algo_kw={"num_groups": model.num_groups, "time_limit": milp_seconds})
    rows = []
    fit = {r["algo"]: r for r in res["rows"]}
    for h in res["holdout_rows"]:
        f = fit[h["algo"]]
        rows.append({"model": model_name, "nodes": nodes, "GPUs": G, "slots/GPU": spg, "algo": h["algo"],
                     "busiest/bound": h["busiest_over_bound"], "balancedness": h["balancedness"],
                     "inter-node MB/token": h["inter_bytes_per_token"] / 1e6, "step_ms": 1e3 * h["step_time"],
                     "fit busiest/bound": f["busiest_over_bound"], "algo_s": f["seconds"],
                     "milp gap": f.get("milp_gap", float("nan"))})
    best = min(r["step_ms"] for r in rows)
    for r in rows:
        r["step / best"] = r["step_ms"] / best
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = S.pyplot()
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    metrics = [("busiest/bound", "busiest GPU / lower bound (held out)", False),
               ("step / best", "step time / best algorithm's (held out)", False),
               ("inter-node MB/token", "inter-node MB per token (held out)", False),
               ("algo_s", "algorithm time (s, log)", True)]
    fig, axes = plt.subplots(len(models), len(metrics), figsize=(4.3 * len(metrics), 3.6 * len(models)),
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(models):
        for j, (key, label, log) in enumerate(metrics):
            ax = axes[i, j]
            for k, algo in enumerate(ALGOS):
                sel = sorted((r for r in rows if r["model"] == m and r["algo"] == algo), key=lambda r: r["nodes"])
                ax.plot([r["nodes"] for r in sel], [max(r[key], 1e-4) for r in sel], marker="o", color=cmap(k),
                        label=algo, ls="--" if algo in ("linear", "round_robin") else "-")
            ax.set_xscale("log", base=2)
            ax.set_xticks(NODES, [str(n) for n in NODES])
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("DGX H100 nodes (8 GPUs each)")
            ax.set_title(f"{m}: {label}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=7)
    fig.subplots_adjust(hspace=0.4, wspace=0.28)
    fig.suptitle("Placement algorithms vs cluster size (fit on the first half of the steps, scored on the rest)")
    S.save_fig(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    clock = S.Clock()
    args = S.parse_args(NAME, __doc__.split("\n\n")[0], argv)
    if args.quick:
        cases, steps, tpg, milp_s = [("mixtral-8x7b", 2)], 4, 16, 0.2
    else:
        cases, steps, tpg, milp_s = [(m, n) for m in MODELS for n in NODES], 6, TOKENS_PER_GPU, MILP_SECONDS
    rows = []
    with tempfile.TemporaryDirectory(prefix="moesim-study-") as tmp:
        for model_name, nodes in cases:
            rows += run_case(model_name, nodes, steps, tpg, milp_s, Path(tmp))
            print(f"  {model_name} on {nodes} node(s) done ({clock})", file=sys.stderr)
    cols = ["model", "nodes", "GPUs", "slots/GPU", "algo", "busiest/bound", "balancedness", "inter-node MB/token",
            "step_ms", "step / best", "fit busiest/bound", "algo_s", "milp gap"]
    S.write_csv(args.out / "placement_scaling.csv", rows, cols)
    plot(rows, args.out / "placement_scaling.png")
    text = S.table(rows, cols)
    S.publish(args, NAME, text, clock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
