"""Close the loop in one live session: record → fit → simulate → place → remap live → measure the prediction.

One ``moesim run`` (torchrun, gloo on CPU / NCCL on GPUs) does all its steps; the runtime itself pauses before
step K (``--await-mapping``) while this controller works on what it recorded so far:

1. **Record**: steps 0..K-1 with the initial (linear) mapping; trace + per-phase timings, flushed per step.
2. **Fit** on the calibration window, steps 0..C-1 only: the cost model from the recorded kernel timings
   (:meth:`moesim.cost.CostModel.fit`), the network and the per-step overhead (:mod:`moesim.calibration`).
3. **Place**: algorithm A computes a new mapping from the expert load of steps 0..K-1 and writes it; the
   runtime applies it live (weights move between ranks, checksummed) and goes on with steps K..S-1.
4. **Predict** every step with the simulator (initial mapping before K, the new one after), from the run's own
   routing, and compare with what was measured: step time, per-rank MoE time, busiest/mean load, in the windows
   ``before`` (C..K-1) and ``after`` (K..S-1) — neither fitted on — and ``calibration`` (0..C-1, in sample).
   Beside it, the **uncalibrated** roofline (the device's datasheet peaks, nothing fitted, no overhead) predicts
   the same steps, so the report shows what calibration buys.

Warm-up never reaches the fit: the runtime compiles kernels and captures graphs before step 0 (its time is
run.json's ``warmup``); a step the run flags ``"warmup": true``, and step 0 of a CUDA run that reports no warm-up
(it compiled inside step 0), are left out of the fit too (:func:`warmup_steps`).

One session rather than two runs: the fitted overhead and network describe the machine as it is *now*; a second
process start on a shared machine lands on another spell of it (the run-to-run spread measured in
studies/validate_loop is as large as the errors being judged).

Runs launch ``torchrun`` through :mod:`moesim.runtime.launch` (torch is imported only by the workers).
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesim.calibration import NetworkFit, OverheadFit, fastest_rank_phase, fit_network, fit_overhead
from moesim.errors import MoesimError
from moesim.io import atomic_write_text, read_json, write_json
from moesim.mapping import ExpertMapping
from moesim.models import ModelSpec
from moesim.replica import ReplicaPolicy
from moesim.trace import Trace


@dataclass
class ValidateConfig:
    nproc: int = 2
    preset: str = "small"
    algo: str = "eplb"
    steps: int = 96  # enough steps per window that a slow spell of a shared machine does not decide a median
    remap_at: int | None = None  # default: half-way
    calibrate_steps: int | None = None  # the fit window 0..C-1; default: half of the steps before the remap
    batch: int = 64
    prompt_len: int = 16
    seed: int = 0
    backend: str = "all2all"
    slots_per_gpu: int | None = None  # > experts / nproc: redundant slots the algorithm may fill
    engine: str = "analytic"
    device: str = "cpu"
    threads: int = 1
    await_timeout_s: float = 600.0  # how long the paused run waits for this controller's mapping
    roofline_device: str | None = None  # datasheet of the uncalibrated roofline; None: cpu, or the GPU's own name
    out: str = "moesim-validate"
    quiet: bool = False
    comm: str = "flat"  # all-to-all backend the simulator prices the exchanges with (moesim.sim.comm)
    dispatch_dtype: str | None = None
    combine_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def remap_step(self) -> int:
        return self.remap_at if self.remap_at is not None else max(1, self.steps // 2)

    @property
    def calibration_steps(self) -> int:
        return self.calibrate_steps if self.calibrate_steps is not None else max(4, self.remap_step // 2)


def check_config(cfg: ValidateConfig) -> None:
    """Everything that can be refused before a process starts."""
    from moesim.placement import ALGORITHMS
    from moesim.runtime.launch import require_torch

    require_torch()

    if cfg.algo not in ALGORITHMS:
        raise MoesimError(f"unknown placement algorithm {cfg.algo!r}; known: {', '.join(ALGORITHMS)}")
    if cfg.steps < 8:
        raise MoesimError(f"--steps must be at least 8 (calibration, held-out steps before and after the remap), "
                          f"got {cfg.steps}")
    if not 6 <= cfg.remap_step <= cfg.steps - 2:
        raise MoesimError(f"--remap-at {cfg.remap_step} must leave at least 6 steps before the remap and 2 after "
                          f"(steps 6..{cfg.steps - 2})")
    if not 4 <= cfg.calibration_steps <= cfg.remap_step - 2:
        raise MoesimError(f"--calibrate-steps {cfg.calibration_steps} must be at least 4 (the prefill and three "
                          f"decode steps: one alone is no median) and leave 2 held-out steps before the remap at "
                          f"{cfg.remap_step}")
    if cfg.roofline_device is not None:
        from moesim.topo import get_device

        get_device(cfg.roofline_device)
    if cfg.engine not in ("analytic", "des"):
        raise MoesimError(f"--engine must be analytic or des, got {cfg.engine!r}")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise MoesimError(f"--out {out} exists and is not a directory")
    run_dir = out / "run"  # replaced by this run's record: only ever a previous validate's
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / "run.json").is_file():
        raise MoesimError(f"{run_dir} exists and is not a moesim run record; choose another --out")


# -- the live session -------------------------------------------------------------------------------------

def _run_config(cfg: ValidateConfig, record: Path, mapping: Path, awaited: Path) -> Any:
    from moesim.runtime.config import RunConfig

    return RunConfig(preset=cfg.preset, nproc=cfg.nproc, backend=cfg.backend, mapping=str(mapping),
                     steps=cfg.steps, batch=cfg.batch, prompt_len=cfg.prompt_len, seed=cfg.seed,
                     record=str(record), device=cfg.device, await_mapping=(cfg.remap_step, str(awaited)),
                     await_timeout_s=cfg.await_timeout_s)


def _wait_until_paused(proc: Any, run_json: Path, step: int) -> None:
    """Until the run says (in run.json) that it waits before ``step``; a run that ends first is an error."""
    import time

    while True:
        rc = proc.poll()
        if rc is not None:
            raise MoesimError(f"the live run ended (torchrun exit code {rc}) before it paused for the new mapping; "
                              "see the rank errors above")
        if run_json.is_file():
            try:
                awaiting = json.loads(run_json.read_text()).get("awaiting")
            except ValueError:  # never half-written (atomic), but be safe
                awaiting = None
            if awaiting and awaiting.get("step") == step:
                return
        time.sleep(0.02)


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
    timed: np.ndarray | None = None  # [S] bool: the step carries per-phase records (CUDA-graph replays do not)


def measure(run_dir: Path, trace: Trace, stop: int | None = None) -> Measured:
    """Steps 0..stop-1 (default: all recorded) of a recorded run."""
    doc = read_json(run_dir / "run.json", "run record")
    steps = doc.get("steps") or []
    S = min(len(steps), trace.num_steps, stop if stop is not None else trace.num_steps)
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
    timed = np.zeros(S, dtype=bool)
    timed[np.unique(idx[keep, 0])] = True  # a replayed CUDA graph records routing but no phases: not 0 s, unknown
    return Measured(step_time=np.array([s["wall_s"] for s in steps[:S]]), phase=[s["phase"] for s in steps[:S]],
                    tokens=np.array([s["tokens"] for s in steps[:S]], dtype=float),
                    moe_time=np.nansum(expert, axis=1), rank_load=load, phase_time=phase_time, timed=timed)


# -- the simulator's side ---------------------------------------------------------------------------------

def busiest_link_bytes(workload: Any, model: ModelSpec, num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """[S, L] bytes on the busiest rank link for dispatch and for combine, on a flat (one-switch) network."""
    send = workload.send_tokens * model.token_bytes  # [S, L, G, G]
    off = send * (1 - np.eye(num_gpus))
    out_b, in_b = off.sum(axis=3), off.sum(axis=2)
    dispatch = np.maximum(out_b.max(axis=2), in_b.max(axis=2))
    return dispatch, dispatch  # combine sends the same rows back: the same busiest link, reversed


def warmup_steps(run_doc: dict[str, Any]) -> int:
    """Leading steps of a run record that hold warm-up (compiling, capturing): never fitted on.

    Steps flagged ``"warmup": true`` (or phase ``warmup``); and step 0 of a CUDA run whose record reports no
    warm-up of its own: a runtime that does not warm up before step 0 JIT-compiles its Triton kernels inside it
    (1.75 s in layer 0's gate on an H200, issue 13)."""
    n = 0
    for s in run_doc.get("steps") or []:
        if not s.get("warmup", False) and s.get("phase") != "warmup":
            break
        n += 1
    reported = any(k.startswith("warmup") for d in (run_doc, run_doc.get("summary") or {}) for k in d)
    if n == 0 and not reported and (run_doc.get("config") or {}).get("device") == "cuda":
        return 1
    return n


def fit_all(trace: Trace, measured: Measured, mapping: ExpertMapping, model: ModelSpec, config: Any,
            engine: str, start: int = 0) -> tuple[Any, Any, NetworkFit, OverheadFit, dict[str, Any]]:
    """Fit cost model, network and overhead on steps start..S-1 (S: the steps ``measured`` holds) only."""
    from moesim.cost import CostModel, dense_tokens_from_trace, kv_len_of_records
    from moesim.sim import simulate
    from moesim.sim.workload import build_workload
    from moesim.topo import DEVICES, Topology

    S = len(measured.step_time)
    if not 0 <= start < S:
        raise MoesimError(f"the fit window {start}..{S - 1} holds no step (warm-up: {start} steps)")
    tm = trace.timings().in_steps(start, S)
    cost, cost_info = CostModel.fit(tm, model, dense_tokens=dense_tokens_from_trace(trace, tm),
                                    kv_len=kv_len_of_records(trace, tm))
    workload = build_workload(trace, mapping, config, start, S)
    disp_b, comb_b = busiest_link_bytes(workload, model, mapping.num_gpus)
    world = mapping.num_gpus
    with warnings.catch_warnings():  # the rows before ``start`` are all-NaN on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        disp_t = fastest_rank_phase(tm, "dispatch", S, model.num_layers, world)[start:]
        comb_t = fastest_rank_phase(tm, "combine", S, model.num_layers, world)[start:]
    net = fit_network(np.concatenate([disp_t.ravel(), comb_t.ravel()]),
                      np.concatenate([disp_b.ravel(), comb_b.ravel()]))
    topology = Topology.flat(world, net.bandwidth, net.latency, DEVICES["cpu"], name=f"fitted-{world}rank")
    result = simulate(workload, topology, mapping, cost, model, config, engine=engine)
    residual = measured.step_time[start:] - result.step_time
    overhead = fit_overhead(measured.phase[start:], measured.tokens[start:], residual)
    return cost, topology, net, overhead, cost_info


def predict(trace: Trace, segments: list[tuple[int, int, ExpertMapping]], topology: Any, cost: Any,
            model: ModelSpec, config: Any, engine: str, overhead: OverheadFit | None,
            measured: Measured) -> dict[str, np.ndarray]:
    """Simulate each (start, stop, mapping) segment of the trace with the fitted per-step overhead charged as the
    simulator's fixed costs (:func:`moesim.sim.fixed.from_overhead`: the same per-step term any replay can take);
    ``overhead`` None: no per-step term (the uncalibrated roofline)."""
    from dataclasses import replace

    from moesim.sim import simulate
    from moesim.sim.fixed import from_overhead
    from moesim.sim.workload import build_workload

    if overhead is not None:
        config = replace(config, fixed=from_overhead(overhead))
    step_time, layer_time, moe_time, load = [], [], [], []
    for start, stop, mapping in segments:
        wl = build_workload(trace, mapping, config, start, stop)
        res = simulate(wl, topology, mapping, cost, model, config, engine=engine)
        step_time.append(res.step_time)
        layer_time.append(res.step_time - res.extra.get("fixed_time", 0.0))
        moe_time.append(res.moe_time)
        slot_gpu = mapping.slot_gpu()
        per_slot = wl.slot_tokens.sum(axis=1)  # [S, slots]
        load.append(np.stack([per_slot[:, slot_gpu == g].sum(axis=1) for g in range(mapping.num_gpus)], axis=1))
    return {"layers": np.concatenate(layer_time), "step_time": np.concatenate(step_time),
            "moe_time": np.concatenate(moe_time), "rank_load": np.concatenate(load)}


# The uncalibrated network between GPUs of one node: NVLink 4 (H100/H200: 450 GB/s each way per GPU) and a few µs;
# between CPU ranks (gloo over loopback) a guess of the same kind. Datasheet figures, not fitted.
UNCALIBRATED_LINK = {"gpu": (450e9, 5e-6), "cpu": (10e9, 20e-6)}
GPU_NAMES = (("h200", "h200"), ("h100 pcie", "h100-pcie"), ("h100", "h100"), ("h800", "h800"), ("a100", "a100"))


def roofline_device(cfg: ValidateConfig) -> str:
    """The datasheet the uncalibrated roofline uses: ``cfg.roofline_device``, else cpu or this machine's GPU."""
    if cfg.roofline_device is not None:
        return cfg.roofline_device.lower()
    if cfg.device == "cpu":
        return "cpu"
    import torch

    name = torch.cuda.get_device_name(0).lower() if torch.cuda.is_available() else ""
    for key, dev in GPU_NAMES:
        if key in name:
            return dev
    raise MoesimError(f"no datasheet for GPU {name!r}; give --roofline-device (one of h100, h200, h800, a100)")


def roofline_cost(cfg: ValidateConfig, model: ModelSpec, world: int) -> tuple[Any, Any]:
    """(cost model, topology) of the uncalibrated roofline: datasheet peaks of the device, nothing fitted."""
    from moesim.cost import CostModel
    from moesim.topo import Topology, get_device

    name = roofline_device(cfg)
    bw, lat = UNCALIBRATED_LINK["cpu" if name == "cpu" else "gpu"]
    topology = Topology.flat(world, bw, lat, get_device(name), name=f"roofline-{name}-{world}")
    return CostModel.roofline(model, topology.device, context_len=cfg.prompt_len), topology


def _mean0(a: np.ndarray) -> np.ndarray:
    """Mean over axis 0; NaN (null in JSON) where there are no rows."""
    return a.mean(axis=0) if len(a) else np.full(a.shape[1:], np.nan)


def _rel(pred: Any, meas: Any) -> Any:
    return np.abs(pred - meas) / np.maximum(np.abs(meas), 1e-12)


WINDOWS = ("calibration", "before", "after", "held_out")


def compare(measured: Measured, predicted: dict[str, np.ndarray], calibration: int,
            remap_step: int, roofline: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Measured vs predicted per window (see :data:`WINDOWS`) and per step; ``roofline``: the uncalibrated
    prediction, reported beside the calibrated one."""
    S = len(measured.step_time)
    windows = {"calibration": slice(0, calibration), "before": slice(calibration, remap_step),
               "after": slice(remap_step, S), "held_out": slice(calibration, S)}
    out: dict[str, Any] = {}
    for name, w in windows.items():
        m_step, p_step = measured.step_time[w], predicted["step_time"][w]
        # per-rank MoE time and load: only steps with per-phase records, on both sides (graph replays have none)
        t = np.ones(w.stop - w.start, bool) if measured.timed is None else measured.timed[w]
        m_moe, p_moe = _mean0(measured.moe_time[w][t]), _mean0(predicted["moe_time"][w][t])
        m_load, p_load = measured.rank_load[w][t].sum(axis=0), predicted["rank_load"][w][t].sum(axis=0)
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
        if roofline is not None:
            r_step = roofline["step_time"][w]
            out[name].update({
                "roofline_step_time_predicted_median_s": float(np.median(r_step)),
                "roofline_median_step_time_rel_error": float(_rel(np.median(r_step), np.median(m_step))),
                "roofline_step_time_median_rel_error": float(np.median(_rel(r_step, m_step))),
            })
            if "moe_time" in roofline:  # [S, G]: the datasheet's expert time per rank beside the measured one
                r_moe = _mean0(roofline["moe_time"][w][t])  # the same steps as the measured MoE time
                out[name].update({"roofline_moe_time_per_rank_predicted_s": r_moe.tolist(),
                                  "roofline_moe_time_rel_error": _rel(r_moe, m_moe).tolist()})
    out["per_step"] = [{"step": i, "phase": measured.phase[i], "measured_s": float(measured.step_time[i]),
                        "predicted_s": float(predicted["step_time"][i]),
                        "rel_error": float(_rel(predicted["step_time"][i:i + 1], measured.step_time[i:i + 1])[0]),
                        **({} if roofline is None else {"roofline_s": float(roofline["step_time"][i])})}
                       for i in range(S)]
    return out


# -- the whole loop ---------------------------------------------------------------------------------------

def run_validation(cfg: ValidateConfig) -> dict[str, Any]:
    """Run the loop of the module docstring; write DIR/report.{json,md} and plots; return the report."""
    import shutil
    import subprocess

    from moesim.models import get_model
    from moesim.runtime.launch import start
    from moesim.sim.config import SimConfig

    check_config(cfg)
    model = get_model(cfg.preset)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    initial = ExpertMapping.linear(model.num_layers, model.num_experts, cfg.nproc, cfg.slots_per_gpu)
    initial.save(out / "mapping_initial.json")
    run_dir, new_path = out / "run", out / "mapping_new.json"
    new_path.unlink(missing_ok=True)  # the paused run must not take a previous report's mapping for this one's
    if run_dir.exists():
        shutil.rmtree(run_dir)
    K, C = cfg.remap_step, cfg.calibration_steps
    config = SimConfig(layout="ep", policy=ReplicaPolicy("round_robin", cfg.nproc), dedup=True, comm=cfg.comm,
                       dispatch_dtype=cfg.dispatch_dtype, combine_dtype=cfg.combine_dtype)
    b = 4 if cfg.device == "cpu" else 2  # float32 on CPU, bfloat16 on GPUs: weights, activations and KV cache
    smodel = model.with_(bytes_per_param=b, act_bytes=b, kv_bytes=b)

    if not cfg.quiet:
        print(f"moesim validate: live run of {cfg.steps} steps; fit on steps 0..{C - 1}, remap before step {K}",
              flush=True)
    proc = start(_run_config(cfg, run_dir, out / "mapping_initial.json", new_path), threads=cfg.threads,
                 **({"stdout": subprocess.DEVNULL} if cfg.quiet else {}))
    try:
        _wait_until_paused(proc, run_dir / "run.json", K)
        with Trace.open(run_dir / "trace.mtrace", allow_truncated=True) as trace:  # steps 0..K-1, flushed
            fit, W = fit_calibration(run_dir, trace, cfg, initial, smodel, config)
            load = trace.load(0, K).sum(axis=0).astype(float)  # [L, E] the expert load the rebalancer sees
        placed = place_new(load, cfg, initial)
        placed.mapping.save(new_path)  # atomic: the run sees the whole file or none
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        raise MoesimError(f"the live run failed after the remap (torchrun exit code {rc}); see the rank errors above")
    return _report(cfg, out, fit, placed, initial, smodel, config, load, W)


def fit_calibration(run_dir: Path, trace: Trace, cfg: ValidateConfig, mapping: ExpertMapping, model: ModelSpec,
                    config: Any) -> tuple[tuple[Any, ...], int]:
    """:func:`fit_all` on the calibration window only: steps W..C-1 (W: flagged warm-up steps). Returns (fit, W)."""
    W = warmup_steps(read_json(run_dir / "run.json", "run record"))
    C = cfg.calibration_steps
    if W >= C - 1:
        raise MoesimError(f"the run flagged {W} warm-up steps: none of the calibration steps 0..{C - 1} is left to "
                          "fit on; raise --calibrate-steps")
    return fit_all(trace, measure(run_dir, trace, stop=C), mapping, model, config, cfg.engine, start=W), W


def place_new(load: np.ndarray, cfg: ValidateConfig, initial: ExpertMapping) -> Any:
    from moesim.placement import place

    return place(load, cfg.algo, num_gpus=cfg.nproc, num_slots=initial.num_slots, gpus_per_node=cfg.nproc,
                 seed=cfg.seed)


def _report(cfg: ValidateConfig, out: Path, fit: tuple[Any, ...], placed: Any, initial: ExpertMapping,
            smodel: ModelSpec, config: Any, load: np.ndarray, warmup: int = 0) -> dict[str, Any]:
    from moesim.placement import lower_bound

    cost, topology, net, overhead, cost_info = fit
    run_dir = out / "run"
    doc = read_json(run_dir / "run.json", "run record")
    remaps = doc.get("remaps") or []
    if not remaps or not remaps[0].get("ok", False):
        raise MoesimError(f"the live remap did not take effect: {remaps[0].get('error') if remaps else 'no record'}")
    K, C = cfg.remap_step, cfg.calibration_steps
    with Trace.open(run_dir / "trace.mtrace") as trace:
        m = measure(run_dir, trace)
        if len(m.step_time) < cfg.steps:
            raise MoesimError(f"the live run recorded {len(m.step_time)} of {cfg.steps} steps")
        segments = [(0, K, initial), (K, cfg.steps, placed.mapping)]
        pred = predict(trace, segments, topology, cost, smodel, config, cfg.engine, overhead, m)
        roof_cost, roof_topo = roofline_cost(cfg, smodel, cfg.nproc)
        roof = predict(trace, segments, roof_topo, roof_cost, smodel, config, cfg.engine, None, m)
    bound = lower_bound(load, cfg.nproc, initial.num_slots)
    report = {
        "format": "moesim.validate", "version": 2, "config": asdict(cfg),
        "model": smodel.to_dict(), "engine": cfg.engine,
        "fit": {"steps": [warmup, C], "warmup_steps": warmup, "cost_model": cost.to_dict(),
                "cost_fit": _jsonable(cost_info), "network": net.to_dict(), "overhead_s": overhead.to_dict()},
        "roofline": {"device": roof_topo.device.to_dict(), "link_bw": UNCALIBRATED_LINK[
            "cpu" if roof_topo.device.name == "cpu" else "gpu"][0], "cost_model": roof_cost.to_dict()},
        "warmup": _jsonable({"seconds": doc["warmup_s"], "execution": doc.get("execution")}
                            if "warmup_s" in doc else doc.get("warmup")),
        "placement": {"algo": cfg.algo, "seconds": placed.seconds, "info": _jsonable(placed.info),
                      "load_steps": [0, K], "lower_bound_busiest_load": float(np.sum(bound))},
        "remap": remaps[0],
        "windows": compare(m, pred, C, K, roof),
    }
    from moesim.sim.fixed import from_overhead

    # the fitted per-step overhead as fixed costs: `moesim replay --fixed DIR/fixed_costs.json` charges it too
    write_json(out / "fixed_costs.json", from_overhead(overhead).to_dict())
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    plot(report, out)
    return report


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def render_markdown(report: dict[str, Any]) -> str:
    cfg, v = report["config"], report["windows"]
    net, remap = report["fit"]["network"], report["remap"]
    bw = (f"{net['bandwidth'] / 1e9:.2f} GB/s per rank link" if net["bandwidth"] < 1e14
          else "no measurable bandwidth term (latency-bound)")
    W, C = report["fit"]["steps"]
    K = report["placement"]["load_steps"][1]
    roof = report.get("roofline", {}).get("device", {}).get("name", "?")
    warm = report.get("warmup")
    warm_txt = (f" Warm-up before step 0 (not measured, not fitted): {json.dumps(warm)}." if warm else "")
    lines = [f"# moesim validate: {cfg['preset']} on {cfg['nproc']} ranks ({cfg['device']}), algorithm "
             f"`{cfg['algo']}`, engine `{report['engine']}`", "",
             f"One live run of {cfg['steps']} steps × {cfg['batch']} sequences per rank. Fitted on steps {W}..{C - 1}: "
             f"the cost model, a network of latency {net['latency'] * 1e6:.0f} µs and {bw} (median fit error "
             f"{net['median_rel_error']:.0%}), and the per-step overhead. `{cfg['algo']}` placed the load of steps "
             f"0..{K - 1} in {report['placement']['seconds']:.2f} s while the run waited "
             f"({remap.get('awaited_s', 0):.2f} s); the runtime applied it live before step {K} "
             f"({remap.get('moved_experts', '?')} experts, {remap.get('moved_bytes', 0) / 2**20:.1f} MiB moved in "
             f"{remap.get('seconds', 0) * 1e3:.0f} ms). Windows `before`, `after` and `held_out` were not fitted on."
             + warm_txt,
             "", f"Beside the calibrated prediction, the uncalibrated roofline of `{roof}` (datasheet peaks, nothing "
             "fitted, no per-step overhead) predicts the same steps.",
             "", "| window | steps | step time measured (median) | predicted (median) | error of the median | "
             "median per-step error | uncalibrated roofline (median) | its error of the median | "
             "its median per-step error | busiest/mean load measured | predicted |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in WINDOWS:
        w = v[name]
        r = (f"{w['roofline_step_time_predicted_median_s'] * 1e3:.2f} ms | "
             f"{w['roofline_median_step_time_rel_error']:.1%} | {w['roofline_step_time_median_rel_error']:.1%}"
             if "roofline_step_time_predicted_median_s" in w else "– | – | –")
        lines.append(f"| {name} | {w['steps'][0]}..{w['steps'][1] - 1} | "
                     f"{w['step_time_measured_median_s'] * 1e3:.2f} ms | "
                     f"{w['step_time_predicted_median_s'] * 1e3:.2f} ms | {w['median_step_time_rel_error']:.1%} | "
                     f"{w['step_time_median_rel_error']:.1%} | {r} | "
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

    from moesim.io import atomic_path

    rows = report["windows"]["per_step"]
    steps = [r["step"] for r in rows]
    C, K = report["fit"]["steps"][1], report["placement"]["load_steps"][1]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.axvspan(-0.5, C - 0.5, color="0.9", label="fitted on")
    ax.plot(steps, [r["measured_s"] * 1e3 for r in rows], "o-", ms=3, label="measured")
    ax.plot(steps, [r["predicted_s"] * 1e3 for r in rows], "s--", ms=3, label="predicted (simulator)")
    if rows and "roofline_s" in rows[0]:
        ax.plot(steps, [r["roofline_s"] * 1e3 for r in rows], ":", lw=1, label="uncalibrated roofline")
    ax.axvline(K - 0.5, color="grey", lw=1, ls=":", label="live remap")
    ax.set_xlabel("step")
    ax.set_ylabel("step time (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("one live run: measured vs predicted")
    fig.tight_layout()
    with atomic_path(out / "step_time.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def print_summary(report: dict[str, Any], file: Any = sys.stdout) -> None:
    v = report["windows"]
    print("step time (median over the window's steps), measured vs predicted by the simulator (calibrated) and by "
          "the uncalibrated roofline:", file=file)
    print(f"{'window':12s} {'steps':>7s} {'measured':>10s} {'predicted':>10s} {'error':>7s} {'per-step':>9s} "
          f"{'roofline':>10s} {'error':>7s} {'load max/mean meas/pred':>24s}", file=file)
    for name in WINDOWS:
        w = v[name]
        span = f"{w['steps'][0]}..{w['steps'][1] - 1}"
        roof = w.get("roofline_step_time_predicted_median_s", float("nan"))
        print(f"{name:12s} {span:>7s} {w['step_time_measured_median_s'] * 1e3:8.2f}ms "
              f"{w['step_time_predicted_median_s'] * 1e3:8.2f}ms"
              f" {w['median_step_time_rel_error']:7.1%} {w['step_time_median_rel_error']:9.1%}"
              f" {roof * 1e3:8.2f}ms {w.get('roofline_median_step_time_rel_error', float('nan')):7.1%}"
              f" {w['busiest_over_mean_load_measured']:17.3f}"
              f"/{w['busiest_over_mean_load_predicted']:.3f}", file=file)
