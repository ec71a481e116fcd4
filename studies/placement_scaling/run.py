"""Placement algorithms from 1 to 8 nodes of H100s, for Mixtral-8x7B and DeepSeek-V3, scored on held-out steps.

Question: how do the placement algorithms (linear, round_robin, lpt, greedy, eplb, milp, affinity) compare as
the cluster grows from one DGX H100 to eight — in balance (busiest GPU / lower bound, balancedness), inter-node
traffic, predicted step time, and their own running time — for a few-expert model (Mixtral, 8 experts) and a
many-expert one (DeepSeek-V3, 256 experts)?

Method: the grid is ``sweep.toml`` (``sweep-quick.toml`` for --quick), run by ``moesim sweep``'s library: per
(model, cluster) a synthetic decode trace (moesim.trace.synth, 128 tokens per GPU per step, seed 0; synthesized
into traces/ when missing) and one ``moesim compare`` cell — each algorithm fitted on the first half of the steps
and scored on the second half: load-only scores and the analytic engine's step time and inter-node bytes.

    python studies/placement_scaling/run.py [--quick] [--ray [ADDRESS]]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _study as S

from moesim.models import get_model
from moesim.sweep import load_spec, run_sweep
from moesim.sweep.spec import read_toml
from moesim.topo import load_topology
from moesim.trace.synth import SynthConfig, synthesize

NAME = "placement_scaling"
HERE = Path(__file__).resolve().parent
ALGOS = ("linear", "round_robin", "lpt", "greedy", "eplb", "eplb-global", "milp", "affinity")
MODELS = ("mixtral-8x7b", "deepseek-v3")
NODES = (1, 2, 4, 8)
TOKENS_PER_GPU = 128  # decode tokens per GPU per step (weak scaling: the batch grows with the cluster)
STEPS = 6


def slots_per_gpu(num_experts: int, num_gpus: int) -> int:
    """Enough slots to hold every expert, plus one redundant slot per GPU (DeepSeek's EP32 uses 9 for 256/32)."""
    return -(-num_experts // num_gpus) + 1


def make_traces(spec_path: Path, steps: int, tokens_per_gpu: int) -> None:
    """Synthesize each trace the spec's cases name (if missing): the case's model on its cluster's GPUs, seed 0."""
    for case in read_toml(spec_path)["axes"]["case"]:
        path = spec_path.parent / case["trace"]
        if path.exists():
            continue
        model = get_model(case["model"])
        G = load_topology(case["topology"]).num_gpus
        assert case["slots-per-gpu"] == slots_per_gpu(model.num_experts, G), case
        T = tokens_per_gpu * G
        path.parent.mkdir(exist_ok=True)
        synthesize(model, SynthConfig(steps=steps, tokens=T, decode_tokens=T, prefill_steps=0, num_ranks=G, seed=0),
                   path)


def rows_of(sweep_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sweep's table (one row per case, columns ``<algo>.<figure>``, ``holdout.<algo>.<figure>``) as one row
    per (case, algorithm), scored on the held-out steps."""
    out = []
    for c in sweep_rows:
        if c["status"] != "ok":
            raise SystemExit(f"cell {c['cell']} ({c['case']}) failed: {c['error']}")
        G = load_topology(c["topology"]).num_gpus
        case = []
        for algo in ALGOS:
            h = f"holdout.{algo}."
            case.append({"model": c["model"], "nodes": G // 8, "GPUs": G, "slots/GPU": c["slots-per-gpu"],
                         "algo": algo, "busiest/bound": c[h + "busiest_over_bound"],
                         "balancedness": c[h + "balancedness"],
                         "inter-node MB/token": c[h + "inter_bytes_per_token"] / 1e6,
                         "step_ms": 1e3 * c[h + "step_time"], "fit busiest/bound": c[f"{algo}.busiest_over_bound"],
                         "algo_s": c[f"wall.algo_s.{algo}"], "milp gap": c.get(f"{algo}.milp_gap", float("nan"))})
        best = min(r["step_ms"] for r in case)
        out += [{**r, "step / best": r["step_ms"] / best} for r in case]
    return out


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

    def extra(p: Any) -> None:
        p.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                       help="run the sweep's cells on Ray (a new local cluster, or the one at ADDRESS)")

    args = S.parse_args(NAME, __doc__.split("\n\n")[0], argv, extra)
    spec_path = HERE / ("sweep-quick.toml" if args.quick else "sweep.toml")
    make_traces(spec_path, 4 if args.quick else STEPS, 16 if args.quick else TOKENS_PER_GPU)
    # one cell at a time (unless on Ray): the algorithms' own wall times are among the figures
    res = run_sweep(load_spec(spec_path), args.out / "sweep", workers=1, ray=args.ray, progress=sys.stderr.isatty())
    rows = rows_of(res.rows)
    cols = ["model", "nodes", "GPUs", "slots/GPU", "algo", "busiest/bound", "balancedness", "inter-node MB/token",
            "step_ms", "step / best", "fit busiest/bound", "algo_s", "milp gap"]
    S.write_csv(args.out / "placement_scaling.csv", rows, cols)
    plot(rows, args.out / "placement_scaling.png")
    text = S.table(rows, cols) + (f"\n{len(res.rows)} sweep cells ({res.ran} run, {res.cached} cached); sweep "
                                  f"table: {args.out.name}/sweep/results.csv\n")
    S.publish(args, NAME, text, clock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
