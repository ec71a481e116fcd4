"""The live runtime on one device, side by side in one run: graphs vs eager vs GPU busy vs roofline vs transformers.

    python benchmarks/bench_runtime.py --device cuda --short        # ~2 minutes on an H200
    python benchmarks/bench_runtime.py --device cuda                # olmoe, qwen3, mixtral x batch x context
    python benchmarks/bench_runtime.py --device cpu --smoke         # the same pipeline on the tiny preset (CI)

For each (preset, batch, context) the script runs ``moesim run --nproc 1 --record`` (world of one):

- **graphs**: the runtime as it serves (CUDA graphs where the runtime has them), decode step = median wall of the
  decode steps in run.json; prefill = the prefill steps' (chunks') walls summed; start = process wall minus the
  steps (imports, weights, warm-up; run.json's own ``warmup`` figure is shown when the runtime writes one);
- **eager**: the same with ``--no-graphs`` (a runtime without that flag has only its eager path: the column then
  says so and the default run is the eager one);
- **busy**: a short ``--profile`` run (eager: the same kernels a graph replays); per decode step, the union of the
  GPU kernel/memcpy/memset intervals launched in that step (steps found by the runtime's ``moesim.attention``
  ranges, one per layer and step), median over the decode steps;
- **roofline**: the simulator's uncalibrated roofline (:meth:`moesim.cost.CostModel.roofline` on a one-GPU
  topology of this GPU's datasheet) replaying the recorded trace: the same routing, token counts and KV lengths;
- **HF**: transformers' eager model of the same architecture holding the same seeded weights (``hf_moe.py``),
  prefill and decode timed with a KV cache; when transformers is installed.

Ratios: step/busy, step/roofline, HF/ours (decode), prefill/roofline. Writes Markdown (for commit) and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moesim.errors import MoesimError
from moesim.io import atomic_write_text, read_json
from moesim.models import ModelSpec, get_model

FULL = {"presets": ["olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b"], "batch": [1, 32, 128, 256],
        "context": [256, 2048], "steps": 32, "hf": ["olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b"]}
# ~2 minutes on an H200: the issue's acceptance point (olmoe, 128 x 256) in full, qwen3 at the same shape, and
# Mixtral-8x7B's start (47 B parameters drawn on the device) at one small shape
SHORT = {"cells": [("olmoe-1b-7b", 128, 256), ("qwen3-30b-a3b", 128, 256), ("mixtral-8x7b", 32, 256)],
         "steps": 16, "hf": ["olmoe-1b-7b"], "eager": ["olmoe-1b-7b", "qwen3-30b-a3b"],
         "profile": ["olmoe-1b-7b", "qwen3-30b-a3b"]}
SMOKE = {"cells": [("tiny", 2, 16)], "steps": 4, "hf": ["tiny"], "eager": ["tiny"], "profile": ["tiny"]}
GPU_KINDS = ("kernel", "gpu_memcpy", "gpu_memset")


# -- this runtime --------------------------------------------------------------------------------------------

def runtime_flags() -> set[str]:
    """The flags ``moesim run`` knows (to degrade clearly where one, e.g. --no-graphs, does not exist yet)."""
    out = subprocess.run([sys.executable, "-m", "moesim", "run", "--help"], capture_output=True, text=True,
                         timeout=120)
    return {w.strip(",[]") for w in out.stdout.split() if w.startswith("--")}


def run_ours(preset: str, batch: int, context: int, steps: int, device: str, out: Path, *, eager: bool = False,
             profile: bool = False, timeout: float = 300.0) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "moesim", "run", "--nproc", "1", "--device", device, "--preset", preset,
           "--batch", str(batch), "--prompt-len", str(context), "--steps", str(steps), "--record", str(out)]
    cmd += (["--no-graphs"] if eager else []) + (["--profile"] if profile else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise MoesimError(f"moesim run exited {proc.returncode}: {tail}")
    return summarize_run(read_json(out / "run.json", "run record"), wall)


def summarize_run(doc: dict[str, Any], process_wall: float | None = None) -> dict[str, Any]:
    """Decode median, prefill total (all prefill chunks) and start from a run.json document."""
    steps = [s for s in doc.get("steps") or [] if not s.get("warmup", False)]
    decode_steps = [s for s in steps if s.get("phase") == "decode"]
    # under CUDA graphs every N-th decode step runs eagerly to record phase timings: the served step is a replay
    replayed = [s["wall_s"] for s in decode_steps if s.get("graph")]
    decode = [s["wall_s"] for s in decode_steps]
    prefill = [s["wall_s"] for s in steps if s.get("phase") == "prefill"]  # every chunk
    if not decode or not prefill:
        raise MoesimError("the run recorded no prefill or no decode step")
    warm = doc.get("warmup_s", doc.get("warmup"))
    res: dict[str, Any] = {"decode_s": float(np.median(replayed or decode)), "decode_all_s": decode,
                           "replayed_steps": len(replayed), "prefill_s": float(np.sum(prefill)),
                           "prefill_chunks": len(prefill), "warmup": warm, "execution": doc.get("execution")}
    if process_wall is not None:
        res["start_s"] = process_wall - sum(s["wall_s"] for s in doc.get("steps") or [])
    return res


# -- GPU busy time from a torch.profiler Chrome trace ---------------------------------------------------------

def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by [start, end) intervals (overlaps counted once)."""
    total, end = 0.0, -np.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def busy_per_step(trace_doc: dict[str, Any], num_layers: int, decode_steps: int) -> list[float]:
    """[decode_steps - 1] GPU busy seconds of each decode step but the last (whose window has no end marker).

    A step is the span from its first ``moesim.attention`` CPU range to the next step's; the decode steps are the
    last ``decode_steps * num_layers`` such ranges (the prefill before them may have any number of chunks). A GPU
    event belongs to the step whose span holds the CPU call that launched it (``args.correlation``).
    """
    ev = trace_doc.get("traceEvents", trace_doc) if isinstance(trace_doc, dict) else trace_doc
    att = sorted(e["ts"] for e in ev if e.get("name") == "moesim.attention" and e.get("cat") == "user_annotation")
    if len(att) < decode_steps * num_layers or decode_steps < 2:
        raise MoesimError(f"the profile holds {len(att)} attention ranges, fewer than {decode_steps} decode steps "
                          f"x {num_layers} layers")
    starts = att[len(att) - decode_steps * num_layers::num_layers]
    launch = {e["args"]["correlation"]: e["ts"] for e in ev
              if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    per: list[list[tuple[float, float]]] = [[] for _ in range(decode_steps - 1)]
    for e in ev:
        if e.get("cat") not in GPU_KINDS or e.get("ph") != "X":
            continue
        t = launch.get(e.get("args", {}).get("correlation"))
        if t is None:
            continue
        k = int(np.searchsorted(starts, t, side="right")) - 1
        if 0 <= k < decode_steps - 1:
            per[k].append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    return [union_length(iv) * 1e-6 for iv in per]


def profiled_busy(out: Path, spec: ModelSpec, decode_steps: int) -> float | None:
    path = out / "profile-rank0.json"
    if not path.is_file():
        return None
    busy = busy_per_step(json.loads(path.read_text()), spec.num_layers, decode_steps)
    return float(np.median(busy)) if busy and max(busy) > 0 else None


# -- the simulator's roofline of the recorded trace ----------------------------------------------------------

def datasheet(device: str) -> str:
    """moesim device preset for this machine: cpu, or the GPU's name (h100, h200, ...)."""
    if device == "cpu":
        return "cpu"
    import torch

    from moesim.validate import GPU_NAMES

    name = torch.cuda.get_device_name(0).lower()
    for key, dev in GPU_NAMES:
        if key in name:
            return dev
    return "h100"


def roofline(record: Path, dev: str, bytes_per_param: int) -> dict[str, float]:
    """The uncalibrated roofline's prefill total and median decode step for the recorded trace."""
    from moesim.cost import CostModel
    from moesim.mapping import ExpertMapping
    from moesim.replica import ReplicaPolicy
    from moesim.sim import simulate
    from moesim.sim.config import SimConfig
    from moesim.topo import Topology, get_device
    from moesim.trace import Trace
    from moesim.validate import UNCALIBRATED_LINK

    doc = read_json(record / "run.json", "run record")
    phases = [s.get("phase") for s in doc["steps"]]
    with Trace.open(record / "trace.mtrace") as trace:
        model = trace.model.with_(bytes_per_param=bytes_per_param)
        bw, lat = UNCALIBRATED_LINK["cpu" if dev == "cpu" else "gpu"]
        topo = Topology.flat(1, bw, lat, get_device(dev), name=f"one-{dev}")
        mapping = ExpertMapping.linear(model.num_layers, model.num_experts, 1)
        cost = CostModel.roofline(model, topo.device, context_len=int(doc["config"].get("prompt_len", 1024)))
        config = SimConfig(layout="ep", policy=ReplicaPolicy("round_robin"), dedup=True)
        res = simulate(trace, topo, mapping, cost, model, config, stop=len(phases))
    st = np.asarray(res.step_time)
    pre = [i for i, p in enumerate(phases) if p == "prefill"]
    dec = [i for i, p in enumerate(phases) if p == "decode"]
    return {"prefill_s": float(st[pre].sum()), "decode_s": float(np.median(st[dec]))}


# -- the grid ------------------------------------------------------------------------------------------------

def fits(spec: ModelSpec, batch: int, context: int, steps: int, device: str) -> str | None:
    """None if weights + KV cache + a prefill's activations fit the device's memory, else why not."""
    if device == "cpu":
        return None
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    from moesim.runtime.config import expected_tensors

    weights = 2 * sum(int(np.prod(s)) for s in expected_tensors(spec).values())  # bfloat16
    kv = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 2 * batch * (context + steps)
    act = batch * context * (spec.hidden_size * 12 + spec.top_k * spec.ffn_size * 6) * 2
    need = weights + kv + act
    return None if need < 0.9 * total else f"needs ~{need / 2**30:.0f} GiB of {total / 2**30:.0f}"


def cells(a: argparse.Namespace) -> tuple[list[tuple[str, int, int]], dict[str, Any]]:
    if a.smoke:
        return list(SMOKE["cells"]), SMOKE
    if a.short:
        return list(SHORT["cells"]), SHORT
    presets = a.presets or FULL["presets"]
    grid = [(p, b, c) for p in presets for c in (a.context or FULL["context"]) for b in (a.batch or FULL["batch"])]
    return grid, {"hf": presets, "eager": presets, "profile": presets}


def measure_preset(preset: str, shapes: list[tuple[int, int]], a: argparse.Namespace, plan: dict[str, Any],
                   flags: set[str], tmp: Path, rows: list[dict[str, Any]], save: Any) -> None:
    """Measure every shape of one preset into ``rows`` (shared), calling ``save()`` after each row."""
    spec = get_model(preset)
    has_graphs = "--no-graphs" in flags
    mine = []
    for batch, ctx in shapes:
        row: dict[str, Any] = {"preset": preset, "batch": batch, "context": ctx, "graphs_mode": has_graphs}
        rows.append(row)
        mine.append(row)
        why = fits(spec, batch, ctx, a.steps, a.device)
        if why:
            row["skipped"] = why
            continue
        base = tmp / f"{preset}-{batch}-{ctx}"
        base.mkdir(parents=True, exist_ok=True)
        try:  # most telling first, saved after each: a run cut short keeps what it measured
            row["ours"] = run_ours(preset, batch, ctx, a.steps, a.device, base / "graphs", timeout=a.run_timeout)
            row["roofline"] = roofline(base / "graphs", datasheet(a.device), 4 if a.device == "cpu" else 2)
            save()
            if preset in plan["profile"]:
                try:
                    prof = run_ours(preset, batch, ctx, 4, a.device, base / "prof", eager=has_graphs, profile=True,
                                    timeout=a.run_timeout)
                    row["busy_s"] = profiled_busy(base / "prof", spec, len(prof["decode_all_s"]))
                except (MoesimError, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as exc:
                    row["busy_error"] = str(exc).splitlines()[0][:300]
                save()
            if has_graphs and preset in plan["eager"]:
                row["eager"] = run_ours(preset, batch, ctx, a.steps, a.device, base / "eager", eager=True,
                                        timeout=a.run_timeout)
        except (MoesimError, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as exc:
            row["error"] = str(exc).splitlines()[0][:300]
        print(one_line(row), flush=True)
        save()
    if preset in plan["hf"] and not a.no_hf:
        hf_rows(spec, [r for r in mine if "ours" in r], a)
        save()


def hf_rows(spec: ModelSpec, rows: list[dict[str, Any]], a: argparse.Namespace) -> None:
    """Time transformers' eager model on every measured shape of one preset (built once, freed after)."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        for r in rows:
            r["hf_error"] = "transformers not installed"
        return
    from hf_moe import build_hf_model, time_hf
    from moesim.runtime.weights import SeededWeights

    dev = "cuda" if a.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    max_pos = max(r["context"] for r in rows) + a.steps + 1 if rows else 16
    try:
        t0 = time.perf_counter()
        model, kept = build_hf_model(spec, SeededWeights(spec, 0, device=dev), dev, dtype, max_pos)
        build_s = time.perf_counter() - t0
    except (MoesimError, RuntimeError, TypeError, ValueError) as exc:  # OOM, config changes
        for r in rows:
            r["hf_error"] = f"build: {str(exc).splitlines()[0][:200]}"
        return
    for r in rows:
        try:
            t = time_hf(model, r["batch"], r["context"], min(a.steps, 8), dev)
            r["hf"] = {"prefill_s": t["prefill_s"], "decode_s": float(np.median(t["decode_s"][1:] or t["decode_s"])),
                       "build_s": build_s, "class": type(model).__name__, "kept_init": kept}
        except (RuntimeError, ValueError) as exc:
            r["hf_error"] = str(exc).splitlines()[0][:200]
        if dev == "cuda":
            torch.cuda.empty_cache()
        print(f"  HF {r['preset']} b{r['batch']} c{r['context']}: "
              f"{_ms(r.get('hf', {}).get('decode_s'))} ms/step {r.get('hf_error', '')}", flush=True)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()


# -- reporting -----------------------------------------------------------------------------------------------

def _ms(x: float | None) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x * 1e3:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if not a or not b else f"{a / b:.2f}×"


def ratios(r: dict[str, Any]) -> dict[str, float | None]:
    ours, eager, roof, hf = r.get("ours", {}), r.get("eager", {}), r.get("roofline", {}), r.get("hf", {})
    step, busy = ours.get("decode_s"), r.get("busy_s")

    def div(x: float | None, y: float | None) -> float | None:
        return x / y if x and y else None

    return {"step_over_busy": div(step, busy), "step_over_roofline": div(step, roof.get("decode_s")),
            "eager_over_graphs": div(eager.get("decode_s"), step) if r.get("graphs_mode") else None,
            "hf_over_ours": div(hf.get("decode_s"), step),
            "prefill_over_roofline": div(ours.get("prefill_s"), roof.get("prefill_s"))}


def one_line(r: dict[str, Any]) -> str:
    head = f"{r['preset']:>14s} b{r['batch']:<4d} c{r['context']:<5d}"
    if "skipped" in r or "error" in r:
        return f"{head} {r.get('skipped') or 'error: ' + r['error']}"
    q = ratios(r)
    return (f"{head} decode {_ms(r['ours']['decode_s'])} ms (eager {_ms(r.get('eager', {}).get('decode_s'))}, busy "
            f"{_ms(r.get('busy_s'))}, roofline {_ms(r['roofline']['decode_s'])})  step/busy "
            f"{_fmt(q['step_over_busy'])} step/roofline {_fmt(q['step_over_roofline'])}  prefill "
            f"{_ms(r['ours']['prefill_s'])} ms / roofline {_fmt(q['prefill_over_roofline'])}")


def _warm(ours: dict[str, Any]) -> str:
    w, ex = ours["warmup"], ours.get("execution") or {}
    head = f"{w:.2f} s" if isinstance(w, (int, float)) else json.dumps(w)
    return head + (f" ({json.dumps(ex)})" if ex else "")


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    graphs = meta["graphs_flag"]
    lines = [f"# bench_runtime: the live runtime on one {meta['device_name']}", "",
             f"`{meta['command']}` — {meta['date']}; torch {meta['torch']}, transformers {meta['transformers']}, "
             f"roofline datasheet `{meta['datasheet']}`, {meta['steps']} steps per run (one prefill, then decode).", "",
             ("Columns: *decode* = this runtime's median decode step "
              + ("with CUDA graphs (replayed steps; on a CPU there are none: both columns run eagerly); *eager* = "
                 "`--no-graphs`" if graphs else
                 "(this runtime has no `--no-graphs` flag yet: its only path, eager; no graphs column)")
              + "; *busy* = GPU kernel busy time of a profiled decode step (union of intervals); *roofline* = the "
              "simulator's uncalibrated roofline of the recorded trace on one GPU; *HF* = transformers' eager model "
              "of the same architecture with the same weights; *start* = process wall minus the steps (imports, "
              "weights drawn on the device, warm-up)."), "",
             "| model | batch | context | decode ms | eager ms | busy ms | roofline ms | HF ms | step/busy | "
             "step/roofline | HF/ours | prefill ms | roofline prefill ms | prefill/roofline | HF prefill ms | "
             "start s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['preset']} | {r['batch']} | {r['context']} |"
        if "skipped" in r or "error" in r:
            lines.append(f"{head} {r.get('skipped') or 'error: ' + r['error']} |" + " |" * 12)
            continue
        o, q, hf = r["ours"], ratios(r), r.get("hf", {})
        lines.append(f"{head} {_ms(o['decode_s'])} | {_ms(r.get('eager', {}).get('decode_s'))} | "
                     f"{_ms(r.get('busy_s'))} | {_ms(r['roofline']['decode_s'])} | {_ms(hf.get('decode_s'))} | "
                     f"{_fmt(q['step_over_busy'])} | {_fmt(q['step_over_roofline'])} | {_fmt(q['hf_over_ours'])} | "
                     f"{_ms(o['prefill_s'])} | {_ms(r['roofline']['prefill_s'])} | "
                     f"{_fmt(q['prefill_over_roofline'])} | {_ms(hf.get('prefill_s'))} | "
                     f"{o.get('start_s', float('nan')):.1f} |")
    notes = sorted({f"{r['preset']}: HF {r['hf_error']}" for r in rows if r.get("hf_error")})
    kept = sorted({f"{r['preset']}: {len(r['hf']['kept_init'])} HF-only parameters at their initial value "
                   "(q_norm/k_norm: the runtime's decoder has none)" for r in rows
                   if r.get("hf", {}).get("kept_init")})
    busy = sorted({f"{r['preset']} b{r['batch']} c{r['context']}: no busy time ({r['busy_error']})"
                   for r in rows if r.get("busy_error")})
    warm = sorted({f"{r['preset']} b{r['batch']} c{r['context']}: warm-up before step 0 {_warm(r['ours'])}"
                   for r in rows if r.get("ours", {}).get("warmup")})
    if notes or kept or warm or busy:
        lines += ["", *[f"- {n}" for n in notes + kept + warm + busy]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--short", action="store_true", help="the ~2-minute grid (see SHORT)")
    p.add_argument("--smoke", action="store_true", help="the tiny preset, a few steps (CPU CI)")
    p.add_argument("--presets", nargs="+", help=f"default {' '.join(FULL['presets'])}")
    p.add_argument("--batch", type=int, nargs="+", help=f"default {FULL['batch']}")
    p.add_argument("--context", type=int, nargs="+", help=f"prompt lengths; default {FULL['context']}")
    p.add_argument("--steps", type=int, help="steps per run (one prefill, the rest decode)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--run-timeout", type=float, default=300.0, help="seconds per moesim run")
    p.add_argument("--out", help="Markdown file (JSON beside it); default benchmarks/results/bench_runtime_<dev>.md")
    a = p.parse_args(argv)
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("bench_runtime: --device cuda, but torch sees no CUDA device (use --device cpu --smoke)",
                  file=sys.stderr)
            return 2
    grid, plan = cells(a)
    a.steps = a.steps or plan.get("steps") or FULL["steps"]
    if a.steps < 3:
        print("bench_runtime: --steps must be at least 3 (a prefill and two decode steps)", file=sys.stderr)
        return 2
    flags = runtime_flags()
    if "--no-graphs" not in flags:
        print("bench_runtime: this runtime has no --no-graphs flag: measuring its only (eager) path; no graphs "
              "column", flush=True)
    meta = _meta(a, "--no-graphs" in flags)
    out = Path(a.out) if a.out else Path(__file__).resolve().parent / "results" / f"bench_runtime_{a.device}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    def save() -> None:  # after every row: a run cut short by a timeout keeps what it measured
        atomic_write_text(out, markdown(rows, meta))
        atomic_write_text(out.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))

    with tempfile.TemporaryDirectory(prefix="bench_runtime-") as tmp:
        for preset in dict.fromkeys(c[0] for c in grid):
            measure_preset(preset, [(b, c) for q, b, c in grid if q == preset], a, plan, flags, Path(tmp), rows,
                           save)
    save()
    print(f"written: {out} and {out.with_suffix('.json').name}")
    return 0


def _meta(a: argparse.Namespace, graphs_flag: bool) -> dict[str, Any]:
    import torch

    try:
        import transformers

        tv = transformers.__version__
    except ImportError:
        tv = "not installed"
    name = torch.cuda.get_device_name(0) if a.device == "cuda" else platform.processor() or "CPU"
    return {"device": a.device, "device_name": name, "torch": torch.__version__, "transformers": tv,
            "datasheet": datasheet(a.device), "steps": a.steps, "graphs_flag": graphs_flag,
            "command": "python benchmarks/bench_runtime.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


if __name__ == "__main__":
    sys.exit(main())
