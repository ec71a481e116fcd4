"""Close the loop: live run → fit → simulate → place → live remap → measure how right the simulator was.

1. **Calibration run**: the live runtime (``moesim run``) with the initial mapping records trace + timings.
2. **Fit**: the cost model from the recorded kernel timings (:meth:`moesim.cost.CostModel.fit`); the network
   and the per-step overhead from the same run (:mod:`moesim.calibration`).
3. **Place**: algorithm A computes a new mapping from the recorded expert load.
4. **Validation run**: the same prompts and weights again, the new mapping applied *live* with
   ``--remap-at K`` (weights move between ranks mid-run), recorded.
5. **Predict** the validation run with the simulator — the initial mapping before step K, the new one after —
   from the validation run's own routing, with nothing fitted on it, and compare with what was measured:
   step time, per-rank MoE time, busiest/mean load, before and after the remap.

Runs launch ``torchrun`` through :mod:`runtime.launch` (torch is imported only by the workers).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesim.calibration import NetworkFit, OverheadFit, fastest_rank_phase, fit_network, fit_overhead
from moesim.errors import MoesimError
from moesim.io import atomic_write_text, read_json, write_json
from moesim.mapping import ExpertMapping
from moesim.models import ModelSpec
from moesim.trace import Trace


@dataclass
class ValidateConfig:
    nproc: int = 2
    preset: str = "small"
    algo: str = "eplb"
    steps: int = 24
    remap_at: int | None = None  # default: half-way
    batch: int = 32
    prompt_len: int = 16
    seed: int = 0
    backend: str = "all2all"
    slots_per_gpu: int | None = None  # > experts / nproc: redundant slots the algorithm may fill
    engine: str = "analytic"
    device: str = "cpu"
    threads: int = 1
    out: str = "moesim-validate"
    quiet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def remap_step(self) -> int:
        return self.remap_at if self.remap_at is not None else max(1, self.steps // 2)


def check_config(cfg: ValidateConfig) -> None:
    """Everything that can be refused before a process starts."""
    from moesim.placement import ALGORITHMS
    from runtime.launch import require_torch

    require_torch()

    if cfg.algo not in ALGORITHMS:
        raise MoesimError(f"unknown placement algorithm {cfg.algo!r}; known: {', '.join(ALGORITHMS)}")
    if cfg.steps < 4:
        raise MoesimError(f"--steps must be at least 4 (a prefill, decode steps before and after the remap), "
                          f"got {cfg.steps}")
    if not 2 <= cfg.remap_step <= cfg.steps - 2:
        raise MoesimError(f"--remap-at {cfg.remap_step} must leave at least 2 steps on each side of "
                          f"the remap (steps 2..{cfg.steps - 2})")
    if cfg.engine not in ("analytic", "des"):
        raise MoesimError(f"--engine must be analytic or des, got {cfg.engine!r}")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise MoesimError(f"--out {out} exists and is not a directory")


# -- the two live runs ------------------------------------------------------------------------------------

def _run_config(cfg: ValidateConfig, record: Path, mapping: Path, remap: Path | None) -> Any:
    from runtime.config import RunConfig

    return RunConfig(preset=cfg.preset, nproc=cfg.nproc, backend=cfg.backend, mapping=str(mapping),
                     steps=cfg.steps, batch=cfg.batch, prompt_len=cfg.prompt_len, seed=cfg.seed,
                     record=str(record), remap_at=[] if remap is None else [(cfg.remap_step, str(remap))],
                     device=cfg.device)


def _launch(run_cfg: Any, cfg: ValidateConfig, label: str) -> None:
    import subprocess

    from runtime.launch import launch

    if not cfg.quiet:
        print(f"moesim validate: {label} run", flush=True)
    kwargs: dict[str, Any] = {"stdout": subprocess.DEVNULL} if cfg.quiet else {}
    rc = launch(run_cfg, threads=cfg.threads, **kwargs)
    if rc != 0:
        raise MoesimError(f"the {label} run failed (torchrun exit code {rc}); see the rank errors above")


# -- measurements -----------------------------------------------------------------------------------------

@dataclass
class Measured:
    """What a recorded run measured, per step (S) and rank (G)."""

    step_time: np.ndarray  # [S] seconds (max over ranks, the runtime's wall clock)
    phase: list[str | None]
    tokens: np.ndarray  # [S]
    moe_time: np.ndarray  # [S, G] expert compute per rank, summed over layers
    rank_load: np.ndarray  # [S, G] token-choices computed per rank, summed over layers
    phase_time: np.ndarray  # [S, L, G, P] seconds per recorded phase


def measure(run_dir: Path, trace: Trace) -> Measured:
    doc = read_json(run_dir / "run.json", "run record")
    steps = doc.get("steps") or []
    S = min(len(steps), trace.num_steps)
    if S == 0:
        raise MoesimError(f"{run_dir} recorded no complete step")
    world = int(doc["world_size"])
    L = trace.model.num_layers
    tm = trace.timings()
    P = len(tm.phase_names)
    phase_time = np.full((S, L, world, P), np.nan)
    load = np.zeros((S, world))
    idx = tm.index
    keep = idx[:, 0] < S
    phase_time[idx[keep, 0], idx[keep, 1], idx[keep, 2]] = tm.phases[keep]
    np.add.at(load, (idx[keep, 0], idx[keep, 2]), tm.tokens[keep].sum(axis=1))
    expert = phase_time[..., tm.phase_names.index("expert")]
    return Measured(step_time=np.array([s["wall_s"] for s in steps[:S]]), phase=[s["phase"] for s in steps[:S]],
                    tokens=np.array([s["tokens"] for s in steps[:S]], dtype=float),
                    moe_time=np.nansum(expert, axis=1), rank_load=load, phase_time=phase_time)


# -- the simulator's side ---------------------------------------------------------------------------------

def sim_model(trace: Trace, dtype_bytes: int) -> ModelSpec:
    """The traced model with the bytes per parameter the run really used (float32 on CPU)."""
    return trace.model.with_(bytes_per_param=dtype_bytes)


def busiest_link_bytes(workload: Any, model: ModelSpec, num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """[S, L] bytes on the busiest rank link for dispatch and for combine, on a flat (one-switch) network."""
    send = workload.send_tokens * model.token_bytes  # [S, L, G, G]
    off = send * (1 - np.eye(num_gpus))
    out_b, in_b = off.sum(axis=3), off.sum(axis=2)
    dispatch = np.maximum(out_b.max(axis=2), in_b.max(axis=2))
    return dispatch, dispatch  # combine sends the same rows back: the same busiest link, reversed


def fit_all(trace: Trace, measured: Measured, mapping: ExpertMapping, model: ModelSpec, config: Any,
            engine: str) -> tuple[Any, Any, NetworkFit, OverheadFit, dict[str, Any]]:
    """Fit cost model, network and overhead on the calibration run; return (cost, topology, ...)."""
    from moesim.cost import CostModel
    from moesim.sim import simulate
    from moesim.sim.workload import build_workload
    from moesim.topology import DEVICES, Topology

    S = len(measured.step_time)
    cost, cost_info = CostModel.fit(trace.timings(), model)
    workload = build_workload(trace, mapping, config, 0, S)
    disp_b, comb_b = busiest_link_bytes(workload, model, mapping.num_gpus)
    tm = trace.timings()
    world = mapping.num_gpus
    disp_t = fastest_rank_phase(tm, "dispatch", S, model.num_layers, world)
    comb_t = fastest_rank_phase(tm, "combine", S, model.num_layers, world)
    net = fit_network(np.concatenate([disp_t.ravel(), comb_t.ravel()]),
                      np.concatenate([disp_b.ravel(), comb_b.ravel()]))
    topology = Topology.flat(world, net.bandwidth, net.latency, DEVICES["cpu"], name=f"fitted-{world}rank")
    result = simulate(workload, topology, mapping, cost, model, config, engine=engine)
    residual = measured.step_time - result.step_time
    overhead = fit_overhead(measured.phase, measured.tokens, residual)
    return cost, topology, net, overhead, cost_info


def predict(trace: Trace, segments: list[tuple[int, int, ExpertMapping]], topology: Any, cost: Any,
            model: ModelSpec, config: Any, engine: str, overhead: OverheadFit,
            measured: Measured) -> dict[str, np.ndarray]:
    """Simulate each (start, stop, mapping) segment of the trace; add the fitted per-step overhead."""
    from moesim.sim import simulate
    from moesim.sim.workload import build_workload

    step_time, moe_time, load = [], [], []
    for start, stop, mapping in segments:
        wl = build_workload(trace, mapping, config, start, stop)
        res = simulate(wl, topology, mapping, cost, model, config, engine=engine)
        step_time.append(res.step_time)
        moe_time.append(res.moe_time)
        slot_gpu = mapping.slot_gpu()
        per_slot = wl.slot_tokens.sum(axis=1)  # [S, slots]
        load.append(np.stack([per_slot[:, slot_gpu == g].sum(axis=1) for g in range(mapping.num_gpus)], axis=1))
    layers = np.concatenate(step_time)
    return {"layers": layers, "step_time": layers + overhead.predict(measured.phase, measured.tokens),
            "moe_time": np.concatenate(moe_time), "rank_load": np.concatenate(load)}


def _rel(pred: Any, meas: Any) -> Any:
    return np.abs(pred - meas) / np.maximum(np.abs(meas), 1e-12)


def compare(measured: Measured, predicted: dict[str, np.ndarray], remap_step: int) -> dict[str, Any]:
    """Measured vs predicted per window (before / after the remap) and per step."""
    S = len(measured.step_time)
    windows = {"before": slice(1, remap_step), "after": slice(remap_step, S), "all": slice(0, S)}
    out: dict[str, Any] = {}
    for name, w in windows.items():
        m_step, p_step = measured.step_time[w], predicted["step_time"][w]
        m_moe, p_moe = measured.moe_time[w].mean(axis=0), predicted["moe_time"][w].mean(axis=0)
        m_load, p_load = measured.rank_load[w].sum(axis=0), predicted["rank_load"][w].sum(axis=0)
        out[name] = {
            "steps": [int(w.start), int(w.stop)],
            "step_time_measured_median_s": float(np.median(m_step)),
            "step_time_predicted_median_s": float(np.median(p_step)),
            "step_time_median_rel_error": float(np.median(_rel(p_step, m_step))),
            "median_step_time_rel_error": float(_rel(np.median(p_step), np.median(m_step))),
            "moe_time_per_rank_measured_s": m_moe.tolist(),
            "moe_time_per_rank_predicted_s": p_moe.tolist(),
            "moe_time_rel_error": _rel(p_moe, m_moe).tolist(),
            "busiest_over_mean_load_measured": float(m_load.max() / max(m_load.mean(), 1e-12)),
            "busiest_over_mean_load_predicted": float(p_load.max() / max(p_load.mean(), 1e-12)),
            "rank_load_measured": m_load.tolist(),
            "rank_load_predicted": p_load.tolist(),
        }
    out["per_step"] = [{"step": i, "phase": measured.phase[i], "measured_s": float(measured.step_time[i]),
                        "predicted_s": float(predicted["step_time"][i]),
                        "rel_error": float(_rel(predicted["step_time"][i:i + 1], measured.step_time[i:i + 1])[0])}
                       for i in range(S)]
    return out


# -- the whole loop ---------------------------------------------------------------------------------------

def run_validation(cfg: ValidateConfig) -> dict[str, Any]:
    """Run the loop of the module docstring; write DIR/report.{json,md} and plots; return the report."""
    from moesim.models import get_model
    from moesim.placement import lower_bound, place
    from moesim.replica import ReplicaPolicy
    from moesim.sim.config import SimConfig

    check_config(cfg)
    model = get_model(cfg.preset)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    spg = cfg.slots_per_gpu
    initial = ExpertMapping.linear(model.num_layers, model.num_experts, cfg.nproc, spg)
    initial.save(out / "mapping_initial.json")

    # 1. calibration run
    run1 = out / "calibration"
    _launch(_run_config(cfg, run1, out / "mapping_initial.json", None), cfg, "calibration")
    dtype_bytes = 4 if cfg.device == "cpu" else 2
    config = SimConfig(layout="ep", policy=ReplicaPolicy("round_robin"), dedup=True)
    with Trace.open(run1 / "trace.mtrace") as trace1:
        m1 = measure(run1, trace1)
        smodel = sim_model(trace1, dtype_bytes)
        cost, topology, net, overhead, cost_info = fit_all(trace1, m1, initial, smodel, config, cfg.engine)
        in_sample = predict(trace1, [(0, len(m1.step_time), initial)], topology, cost, smodel, config,
                            cfg.engine, overhead, m1)
        load = trace1.load().sum(axis=0).astype(float)  # [L, E] over the calibration run

    # 2. place from the recorded load
    placed = place(load, cfg.algo, num_gpus=cfg.nproc, num_slots=initial.num_slots, gpus_per_node=cfg.nproc,
                   seed=cfg.seed)
    new = placed.mapping
    new.save(out / "mapping_new.json")

    # 3. validation run: same prompts, the new mapping applied live at the remap step
    run2 = out / "validation"
    _launch(_run_config(cfg, run2, out / "mapping_initial.json", out / "mapping_new.json"), cfg, "validation")
    doc2 = read_json(run2 / "run.json", "run record")
    remaps = doc2.get("remaps") or []
    if not remaps or not remaps[0].get("ok", True):
        raise MoesimError(f"the live remap did not take effect: {remaps[0].get('error') if remaps else 'no record'}")
    with Trace.open(run2 / "trace.mtrace") as trace2:
        m2 = measure(run2, trace2)
        S, K = len(m2.step_time), cfg.remap_step
        pred = predict(trace2, [(0, K, initial), (K, S, new)], topology, cost, smodel, config, cfg.engine,
                       overhead, m2)
    bound = lower_bound(load, cfg.nproc, initial.num_slots)
    report = {
        "format": "moesim.validate", "version": 1, "config": asdict(cfg),
        "model": smodel.to_dict(), "engine": cfg.engine,
        "fit": {"cost_model": cost.to_dict(), "cost_fit": _jsonable(cost_info), "network": net.to_dict(),
                "overhead_s": overhead.to_dict()},
        "placement": {"algo": cfg.algo, "seconds": placed.seconds, "info": _jsonable(placed.info),
                      "lower_bound_busiest_load": float(np.sum(bound))},
        "remap": remaps[0],
        "calibration_in_sample": compare(m1, in_sample, K),
        "validation": compare(m2, pred, K),
    }
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    plot(report, out)
    return report


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def render_markdown(report: dict[str, Any]) -> str:
    cfg, v = report["config"], report["validation"]
    net = report["fit"]["network"]
    bw = (f"{net['bandwidth'] / 1e9:.2f} GB/s per rank link" if net["bandwidth"] < 1e14
          else "no measurable bandwidth term (latency-bound)")
    lines = [f"# moesim validate: {cfg['preset']} on {cfg['nproc']} ranks ({cfg['device']}), algorithm "
             f"`{cfg['algo']}`, engine `{report['engine']}`", "",
             f"Calibration run fitted the cost model, a network of latency {net['latency'] * 1e6:.0f} µs and "
             f"{bw} (median fit error "
             f"{net['median_rel_error']:.0%}), and the per-step overhead. The validation run applied the "
             f"new mapping live before step {cfg['remap_at'] or max(1, cfg['steps'] // 2)} "
             f"({report['remap'].get('moved_experts', '?')} experts moved); every prediction below is out of "
             "sample.", "",
             "| window | steps | step time measured (median) | predicted (median) | error of the median | "
             "median per-step error | busiest/mean load measured | predicted |", "|---|---|---|---|---|---|---|---|"]
    for name in ("before", "after", "all"):
        w = v[name]
        lines.append(f"| {name} | {w['steps'][0]}..{w['steps'][1] - 1} | "
                     f"{w['step_time_measured_median_s'] * 1e3:.2f} ms | "
                     f"{w['step_time_predicted_median_s'] * 1e3:.2f} ms | {w['median_step_time_rel_error']:.1%} | "
                     f"{w['step_time_median_rel_error']:.1%} | "
                     f"{w['busiest_over_mean_load_measured']:.3f} | {w['busiest_over_mean_load_predicted']:.3f} |")
    lines += ["", "Per-rank MoE (expert compute) time per step, mean over the window:", "",
              "| window | rank | measured | predicted | rel. error |", "|---|---|---|---|---|"]
    for name in ("before", "after"):
        w = v[name]
        for r, (a, b, e) in enumerate(zip(w["moe_time_per_rank_measured_s"], w["moe_time_per_rank_predicted_s"],
                                          w["moe_time_rel_error"], strict=True)):
            lines.append(f"| {name} | {r} | {a * 1e3:.3f} ms | {b * 1e3:.3f} ms | {e:.1%} |")
    lines += ["", "![step time](step_time.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["validation"]["per_step"]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [r["measured_s"] * 1e3 for r in rows], "o-", label="measured")
    ax.plot(steps, [r["predicted_s"] * 1e3 for r in rows], "s--", label="predicted (simulator)")
    k = report["config"]["remap_at"] or max(1, report["config"]["steps"] // 2)
    ax.axvline(k - 0.5, color="grey", lw=1, ls=":", label="live remap")
    ax.set_xlabel("step")
    ax.set_ylabel("step time (ms)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("validation run: measured vs predicted")
    fig.tight_layout()
    from moesim.io import atomic_path

    with atomic_path(out / "step_time.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def print_summary(report: dict[str, Any], file: Any = sys.stdout) -> None:
    v = report["validation"]
    print("step time (median over the window's steps), measured vs predicted by the simulator:", file=file)
    print(f"{'window':8s} {'measured':>12s} {'predicted':>12s} {'error':>8s} {'per-step':>9s} "
          f"{'load max/mean meas/pred':>24s}", file=file)
    for name in ("before", "after", "all"):
        w = v[name]
        print(f"{name:8s} {w['step_time_measured_median_s'] * 1e3:10.2f}ms "
              f"{w['step_time_predicted_median_s'] * 1e3:10.2f}ms"
              f" {w['median_step_time_rel_error']:8.1%} {w['step_time_median_rel_error']:9.1%}"
              f" {w['busiest_over_mean_load_measured']:17.3f}"
              f"/{w['busiest_over_mean_load_predicted']:.3f}", file=file)
