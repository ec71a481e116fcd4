"""Discrete-event engine speed and agreement, side by side: one DeepSeek-V3 decode step on 8, 64 and 256 GPUs.

    python benchmarks/bench_des.py                          # the table (DES: numpy and compiled flow network)
    python benchmarks/bench_des.py --markdown benchmarks/results/bench_des.md
    python benchmarks/bench_des.py --quick                  # 4 MoE layers, 8 and 64 GPUs (a smoke run)
    python benchmarks/bench_des.py --quantum 0 --rel-quantum 0     # exact flow network (much slower)
    python benchmarks/bench_des.py --tokens 512             # longer transfers

Cases (issue 16): DeepSeek-V3, all 58 MoE layers and its 3 dense layers, 64 decode tokens per GPU, one step (three
at 64 GPUs, reported per step),
synthetic routing (moesim.trace.synth, the model's default skew), linear placement, ``ep`` layout, on dgx-h100
(8 GPUs), dgx-h100:8 (64) and dgx-h100:32 (256); Mixtral-8x7B on one node beside them.

Single thread (OMP/BLAS threads set to 1 before numpy loads). Per row: the DES's CPU and wall seconds per step with
the numpy flow network and with the compiled one (``moesim.sim.maxmin_jit``, numba; the same results up to
round-off, so the step times printed once), the simpy events it processed and events per CPU second, flows and max-min
recomputations; the analytic engine's step time (des/analytic ratio), its layer-steps/s on the same workload and
its per-token rate (token-selections/s, workload build + engine, ``bench_sim.bench_tokens``: 4 steps × 4096
tokens). CPU time is the figure to read on a shared machine (wall time suffers from the other processes).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from moesim.cost import CostModel  # noqa: E402
from moesim.mapping import ExpertMapping  # noqa: E402
from moesim.models import get_model  # noqa: E402
from moesim.sim import maxmin_jit  # noqa: E402
from moesim.sim.analytic import run_analytic  # noqa: E402
from moesim.sim.config import SimConfig  # noqa: E402
from moesim.sim.des import DEFAULT_QUANTUM, DEFAULT_REL_QUANTUM, run_des  # noqa: E402
from moesim.sim.workload import build_workload  # noqa: E402
from moesim.topo import load_topology  # noqa: E402
from moesim.trace import Trace  # noqa: E402
from moesim.trace.synth import SynthConfig, synthesize  # noqa: E402

CASES = (
    # (model, topology, decode tokens per GPU, steps)
    ("mixtral-8x7b", "dgx-h100", 64, 1),
    ("deepseek-v3", "dgx-h100", 64, 1),
    ("deepseek-v3", "dgx-h100:8", 64, 3),  # 3 steps: the per-step figure of a replay (one-time set-up amortised)
    ("deepseek-v3", "dgx-h100:32", 64, 1),
)
GOAL_S = {64: 1.0, 256: 10.0}  # issue 16: seconds per DeepSeek-V3 step, one core


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.process_time() - c0, time.perf_counter() - w0, out


def bench_case(model_name: str, topo_name: str, tokens_per_gpu: int, steps: int, quantum: float,
               layers: int | None, tmp: Path, rel_quantum: float = DEFAULT_REL_QUANTUM,
               kernels: tuple[str, ...] = ("numpy", "compiled"), per_token: bool = True) -> dict:
    model = get_model(model_name)
    if layers:
        model = model.with_(num_layers=min(layers, model.num_layers))
    topo = load_topology(topo_name)
    G = topo.num_gpus
    path = tmp / f"{model_name}-{G}-{model.num_layers}.trace"
    # one prefill-free decode trace: steps x (tokens_per_gpu x G) tokens, origins spread over the G ranks
    synthesize(model, SynthConfig(steps=steps, tokens=tokens_per_gpu * G, prefill_steps=0, num_ranks=G,
                                  seed=0), path)
    mapping = ExpertMapping.linear(model.num_layers, model.num_experts, G)
    config = SimConfig(layout="ep")
    cost = CostModel.roofline(model, topo.device)
    with Trace.open(path) as trace:
        wl = build_workload(trace, mapping, config)
    run_analytic(wl, topo, cost, model, config)  # warm-up (routing tables)
    c_an, _, ra = _timed(lambda: run_analytic(wl, topo, cost, model, config))
    S = len(ra.step_time)
    row = {"case": f"{model_name}, {G} GPUs ({topo_name}), {model.num_layers} MoE layers, {tokens_per_gpu} tok/GPU",
           "G": G, "model": model_name, "analytic_ms": float(np.mean(ra.step_time)) * 1e3,
           "analytic_layer_steps_s": S * model.num_layers / max(c_an, 1e-9)}
    for kind in kernels:
        if kind == "compiled" and not maxmin_jit._available:
            row["compiled"] = None  # numba not installed
            continue
        before = maxmin_jit.set_active(kind == "compiled")
        try:
            c, w, rd = _timed(lambda: run_des(wl, topo, cost, model, config, quantum=quantum,
                                              rel_quantum=rel_quantum))
        finally:
            maxmin_jit.set_active(before)
        ev = int(rd.extra["sim_events"])
        row[kind] = {"cpu_s": c / S, "wall_s": w / S, "events": ev / S, "events_per_s": ev / max(c, 1e-9)}
        row.update(des_ms=float(np.mean(rd.step_time)) * 1e3, flows=int(rd.extra["flows"]) // S,
                   recomputations=int(rd.extra["rate_recomputations"]) // S)
    row["ratio"] = row["des_ms"] / row["analytic_ms"]
    if per_token and model_name == "deepseek-v3":
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_sim import bench_tokens

        row["per_token_sel_s"] = bench_tokens(tmp, model_name, G, 4, 4096)["sel_s"]
    return row


def _fmt_kernel(k: dict | str | None) -> tuple[str, str]:
    if k == "not run":
        return "not run", "—"
    if k is None:
        return "n/a (no numba)", "n/a"
    return f"{k['cpu_s']:.2f} s ({k['wall_s']:.2f} wall)", f"{k['events_per_s'] / 1e3:,.0f} k"


def table(rows: list[dict]) -> str:
    head = ("| case | DES step / analytic | DES CPU per step, numpy | compiled | speed-up | simpy events per step | "
            "events/s numpy | compiled | flows, recomputations | analytic layer-steps/s | analytic per-token sel/s |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        n_t, n_e = _fmt_kernel(r.get("numpy", "not run"))
        c_t, c_e = _fmt_kernel(r.get("compiled", "not run"))
        sp = (f"{r['numpy']['cpu_s'] / r['compiled']['cpu_s']:.1f}x" if r.get("numpy") and r.get("compiled")
              else "—")
        ev = (r.get("compiled") or r.get("numpy"))["events"]
        pt = f"{r['per_token_sel_s'] / 1e6:.1f} M" if "per_token_sel_s" in r else "—"
        lines.append(f"| {r['case']} | {r['des_ms']:.3f} / {r['analytic_ms']:.3f} ms ({r['ratio']:.3f}) | {n_t} | "
                     f"{c_t} | {sp} | {ev:,.0f} | {n_e} | {c_e} | {r['flows']:,}, {r['recomputations']:,} | "
                     f"{r['analytic_layer_steps_s']:,.0f} | {pt} |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        goal = GOAL_S.get(r["G"])
        if goal is None or r["model"] != "deepseek-v3" or "58 MoE" not in r["case"]:
            continue
        best = min(k["cpu_s"] for k in (r.get("numpy"), r.get("compiled")) if k)
        out.append(f"DeepSeek-V3 step at {r['G']} GPUs: {best:.2f} s CPU (goal {goal:g} s: "
                   f"{'MET' if best <= goal else 'NOT MET'})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 MoE layers, up to 64 GPUs")
    ap.add_argument("--quantum", type=float, default=DEFAULT_QUANTUM, help="flow network hand-over quantum, s")
    ap.add_argument("--rel-quantum", type=float, default=DEFAULT_REL_QUANTUM,
                    help="hand-over quantum as a fraction of the median remaining transfer time")
    ap.add_argument("--tokens", type=int, default=None, help="decode tokens per GPU (default: 64)")
    ap.add_argument("--kernels", default="numpy,compiled", help="flow networks to time: numpy, compiled or both")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table (Markdown) here")
    args = ap.parse_args(argv)
    kernels = tuple(k for k in args.kernels.split(",") if k)
    if not kernels or any(k not in ("numpy", "compiled") for k in kernels):
        print("bench_des: --kernels takes numpy, compiled or numpy,compiled", file=sys.stderr)
        return 2
    maxmin_jit.load()  # compile or load numba's cache before timing anything
    cases = [c for c in CASES if not (args.quick and c[1] == "dgx-h100:32")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: numba loads each kernel's compiled code at first call
        bench_case("mixtral-8x7b", "dgx-h100", 8, 1, args.quantum, 1, Path(tmp), args.rel_quantum, kernels, False)
    print(f"single thread; load average {os.getloadavg()[0]:.1f}; compiled flow network: "
          f"{'available' if maxmin_jit._available else 'not available (pip install numba)'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, topo_name, tok, steps in cases:
            r = bench_case(model_name, topo_name, args.tokens or tok, steps, args.quantum,
                           4 if args.quick else None, Path(tmp), args.rel_quantum, kernels, per_token=not args.quick)
            rows.append(r)
            n, c = r.get("numpy"), r.get("compiled")
            print(f"{r['case']}: step des {r['des_ms']:.3f} ms / analytic {r['analytic_ms']:.3f} ms "
                  f"({r['ratio']:.3f}); DES CPU/step numpy {n['cpu_s'] if n else float('nan'):.2f} s, compiled "
                  f"{c['cpu_s'] if c else float('nan'):.2f} s", flush=True)
    md = table(rows)
    print()
    print(md)
    for line in goals(rows):
        print(line)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        cmd = "python benchmarks/bench_des.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:]))
        text = (f"# DES speed (issue 16)\n\n`{cmd.strip()}`, single thread, load average "
                f"{os.getloadavg()[0]:.1f} at the end (shared 2-core machine: CPU seconds are the figure to read)."
                f"\n\n{md}\n\n" + "\n".join(f"- {g}" for g in goals(rows)) + "\n")
        tmp_path = args.markdown.with_suffix(".tmp")
        tmp_path.write_text(text)
        tmp_path.replace(args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
