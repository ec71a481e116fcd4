"""Discrete-event vs analytic engine, side by side: step times, their ratio, and wall-clock cost.

    python benchmarks/bench_des.py                 # Mixtral-8x7B on dgx-h100, DeepSeek-V3 on dgx-h100:8
    python benchmarks/bench_des.py --quick         # fewer layers/steps (a smoke run)
    python benchmarks/bench_des.py --quantum 0 --rel-quantum 0     # exact flow network (much slower)
    python benchmarks/bench_des.py --tokens 512    # longer transfers

Workloads are synthetic routing traces (moesim.trace.synth, the model's default skew) with linear placement and
the ``ep`` layout. The DES wall time is per step (and its process CPU time: shared machines are noisy); the analytic
engine's rate is layer-steps per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from moesim.cost import CostModel
from moesim.mapping import ExpertMapping
from moesim.models import get_model
from moesim.sim.analytic import run_analytic
from moesim.sim.config import SimConfig
from moesim.sim.des import DEFAULT_QUANTUM, DEFAULT_REL_QUANTUM, run_des
from moesim.sim.workload import build_workload
from moesim.topo import load_topology
from moesim.trace import Trace
from moesim.trace.synth import SynthConfig, synthesize

CASES = (
    # (model, topology, decode tokens per GPU, steps)
    ("mixtral-8x7b", "dgx-h100", 64, 4),
    ("deepseek-v3", "dgx-h100:8", 64, 1),
)


def bench_case(model_name: str, topo_name: str, tokens_per_gpu: int, steps: int, quantum: float,
               layers: int | None, tmp: Path, rel_quantum: float = DEFAULT_REL_QUANTUM) -> dict:
    model = get_model(model_name)
    if layers:
        model = model.with_(num_layers=min(layers, model.num_layers))
    topo = load_topology(topo_name)
    G = topo.num_gpus
    path = tmp / f"{model_name}-{G}.trace"
    # one prefill-free decode trace: steps x (tokens_per_gpu x G) tokens, origins spread over the G ranks
    synthesize(model, SynthConfig(steps=steps, tokens=tokens_per_gpu * G, prefill_steps=0, num_ranks=G,
                                  seed=0), path)
    mapping = ExpertMapping.linear(model.num_layers, model.num_experts, G)
    config = SimConfig(layout="ep")
    cost = CostModel.roofline(model, topo.device)
    with Trace.open(path) as trace:
        t0 = time.perf_counter()
        wl = build_workload(trace, mapping, config)
        t_wl = time.perf_counter() - t0
    t0 = time.perf_counter()
    ra = run_analytic(wl, topo, cost, model, config)
    t_an = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    rd = run_des(wl, topo, cost, model, config, quantum=quantum, rel_quantum=rel_quantum)
    t_des, c_des = time.perf_counter() - t0, time.process_time() - c0
    S = len(ra.step_time)
    return {
        "case": f"{model_name} on {topo_name} ({G} GPUs, {model.num_layers} MoE layers, "
                f"{tokens_per_gpu} tok/GPU, {S} steps)",
        "analytic_ms": float(np.mean(ra.step_time)) * 1e3, "des_ms": float(np.mean(rd.step_time)) * 1e3,
        "ratio": float(np.mean(rd.step_time) / np.mean(ra.step_time)),
        "workload_s": t_wl, "analytic_wall_s": t_an, "des_wall_per_step_s": t_des / S, "des_cpu_per_step_s": c_des / S,
        "analytic_layer_steps_per_s": S * model.num_layers / max(t_an, 1e-12),
        "flows": rd.extra.get("flows"), "recomputations": rd.extra.get("rate_recomputations"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 layers per model, one step")
    ap.add_argument("--quantum", type=float, default=DEFAULT_QUANTUM, help="flow network hand-over quantum, s")
    ap.add_argument("--rel-quantum", type=float, default=DEFAULT_REL_QUANTUM,
                    help="hand-over quantum as a fraction of the median remaining transfer time")
    ap.add_argument("--tokens", type=int, default=None, help="decode tokens per GPU (default: 64)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, topo_name, tok, steps in CASES:
            r = bench_case(model_name, topo_name, args.tokens or tok, 1 if args.quick else steps, args.quantum,
                           4 if args.quick else None, Path(tmp), args.rel_quantum)
            print(r["case"])
            print(f"  step time   analytic {r['analytic_ms']:9.3f} ms   des {r['des_ms']:9.3f} ms   "
                  f"des/analytic {r['ratio']:.3f}")
            print(f"  wall        analytic {r['analytic_wall_s'] * 1e3:9.1f} ms "
                  f"({r['analytic_layer_steps_per_s']:,.0f} layer-steps/s)   des {r['des_wall_per_step_s']:.2f} s/step "
                  f"(cpu {r['des_cpu_per_step_s']:.2f} s) "
                  f"({r['flows']} flows, {r['recomputations']} rate recomputations)   "
                  f"workload build {r['workload_s'] * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
