"""Simulator vs live runtime: how well does moesim predict the rest of a live EP run it was fitted on the start of?

Question: after fitting the cost model, the network and the per-step overhead on the first steps of a live run,
how close does the simulator come to the step time of the steps that follow — before and after an expert mapping
computed from the recorded load is applied live, mid-run?

Method: ``moesim validate`` (moesim/validate.py) several times on this machine: 2 gloo ranks on CPU, the ``small``
runtime preset, 96 steps of 64 sequences per rank (prompts of 16 tokens: the KV cache grows from 16 to 112
positions), fitted on steps 0..23, a new mapping from ``eplb`` applied live before step 48; seeds 0..N-1 with the
analytic engine, seed 0 with the discrete-event engine, and seed 0 with 48 steps (shorter windows). Then the
machine's own noise: identical ``moesim run`` invocations back to back, their median decode step; and the CPU
attention time against the KV length, which the fitted cost model follows with its ``d·tokens·kv_len`` term.

    python studies/validate_loop/run.py [--quick] [--seeds N]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _study as S

from moesim.validate import ValidateConfig, run_validation

NAME = "validate_loop"


def _extra(p) -> None:
    p.add_argument("--seeds", type=int, default=8, help="validate runs with the analytic engine (seeds 0..N-1)")


def spread(runs: int, steps: int, batch: int, work: Path) -> list[float]:
    """Median decode step (s) of ``runs`` identical live runs: the floor any prediction error sits on."""
    out = []
    for i in range(runs):
        rec = work / f"spread{i}"
        cmd = [sys.executable, "-m", "moesim", "run", "--nproc", "2", "--preset", "small", "--steps", str(steps),
               "--batch", str(batch), "--prompt-len", "16", "--record", str(rec)]
        subprocess.run(cmd, check=True, capture_output=True)
        doc = json.loads((rec / "run.json").read_text())
        out.append(float(np.median([s["wall_s"] for s in doc["steps"][1:]])))
    return out


def attention_vs_kv(batch: int, kv_lens: Sequence[int]) -> list[dict[str, float]]:
    """One layer's decode attention of the ``small`` preset on one CPU thread, median of 5, per KV length; beside
    it, the SDPA call the runtime made before (K/V copied per head, an explicit boolean mask) on the same cache."""
    import time

    import torch
    import torch.nn.functional as F
    from moesim.runtime.model import build_decoder
    from moesim.runtime.weights import weight_source

    from moesim.models import get_model

    torch.set_num_threads(1)
    spec = get_model("small")
    model = build_decoder(spec, weight_source(spec, None, 0), "cpu", torch.float32)
    rows = []
    with torch.inference_mode():
        for kv in kv_lens:
            cache = model.new_cache(batch, kv + 1)
            cache.length = kv - 1
            x = torch.randn(batch, 1, spec.hidden_size)
            rep = spec.num_attention_heads // spec.num_kv_heads
            q = torch.randn(batch, spec.num_attention_heads, 1, spec.head_dim)
            keys, values = cache.k[0, :, :, :kv], cache.v[0, :, :, :kv]
            mask = torch.ones(1, kv, dtype=torch.bool)
            now, before = [], []
            for _ in range(5):
                t0 = time.perf_counter()
                model.attention(0, x, cache)
                t1 = time.perf_counter()
                k, v = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                now.append(t1 - t0)
                before.append(time.perf_counter() - t1)
            rows.append({"kv positions": kv, "attention ms (1 layer)": 1e3 * float(np.median(now)),
                         "ms per 16 positions": 16e3 * float(np.median(now)) / kv,
                         "SDPA alone, explicit mask + K/V copies ms": 1e3 * float(np.median(before))})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = S.parse_args(NAME, __doc__, argv, extra=_extra)
    clock = S.Clock()
    steps, batch, seeds = (24, 8, 1) if args.quick else (96, 64, args.seeds)
    runs = [(seed, "analytic", steps) for seed in range(seeds)]
    if not args.quick:
        runs += [(0, "des", steps), (0, "analytic", steps // 2)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed, engine, n in runs:
            cfg = ValidateConfig(nproc=2, preset="small", algo="eplb", steps=n, batch=batch, prompt_len=16,
                                 seed=seed, engine=engine, out=str(work / f"{engine}{seed}-{n}"), quiet=True)
            rep = run_validation(cfg)
            v = rep["windows"]
            rows.append({"seed": seed, "engine": engine, "steps": n,
                         "measured before ms": 1e3 * v["before"]["step_time_measured_median_s"],
                         "measured after ms": 1e3 * v["after"]["step_time_measured_median_s"],
                         "predicted before ms": 1e3 * v["before"]["step_time_predicted_median_s"],
                         "predicted after ms": 1e3 * v["after"]["step_time_predicted_median_s"],
                         "error of median": v["held_out"]["median_step_time_rel_error"],
                         "median per-step error": v["held_out"]["step_time_median_rel_error"],
                         "MoE time error (max rank)": max(max(v[w]["moe_time_rel_error"]) for w in ("before", "after")),
                         "load max/mean measured": v["after"]["busiest_over_mean_load_measured"],
                         "load max/mean predicted": v["after"]["busiest_over_mean_load_predicted"]})
            if seed == 0 and engine == "analytic" and n == steps:
                shutil.copy(work / f"analytic0-{n}" / "step_time.png", args.out / "step_time_seed0.png")
                S.write_json(args.out / "report_seed0.json", rep)
        floor = spread(2 if args.quick else 4, steps, batch, work)
    S.write_csv(args.out / "validate_loop.csv", rows)
    errs = [r["error of median"] for r in rows if r["steps"] == steps]
    shape = ValidateConfig(steps=steps)
    C, K = shape.calibration_steps, shape.remap_step
    text = [f"moesim validate: small on 2 gloo ranks, {steps} steps x {batch} sequences per rank (prompt 16), "
            f"fitted on steps 0..{C - 1}, eplb remap before step {K}; errors over the held-out "
            f"steps {C}..{steps - 1}", "", S.table(rows), "",
            f"error of the median step time ({steps} steps): median {np.median(errs):.1%} over {len(errs)} runs "
            f"(min {min(errs):.1%}, max {max(errs):.1%}); goal <= 15%",
            "identical live runs back to back, median decode step: "
            + ", ".join(f"{1e3 * f:.1f} ms" for f in floor)
            + f" (spread {(max(floor) - min(floor)) / np.median(floor):.0%} of their median)"]
    if not args.quick:
        att = attention_vs_kv(batch, [16, 32, 48, 64, 80, 96, 112, 128, 160])
        S.write_csv(args.out / "attention_vs_kv.csv", att)
        text += ["", f"CPU decode attention of one layer against the KV length (batch {batch}, one thread; the "
                 "last column: the SDPA call alone as the runtime made it before this study's revision):", "",
                 S.table(att)]
    S.publish(args, NAME, "\n".join(text), clock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
