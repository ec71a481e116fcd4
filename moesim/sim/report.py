"""Reports of a replay: a terminal table, report.json, steps.csv, a Chrome-trace timeline and PNG plots.

Every file is written atomically and holds no wall-clock data, so the same inputs give byte-identical reports.

- ``report.json``: ``{"format": "moesim.replay-report", "summary": SimResult.summary(), "inputs": {...}}``.
- ``steps.csv``: one row per step: latency, the phase split summed over layers, stall, bytes, busiest GPU.
- ``timeline.json``: Chrome trace (open in https://ui.perfetto.dev or chrome://tracing; written by
  :mod:`moesim.timeline`, integer microseconds, adjacent slices never overlap): one track per GPU, phases as
  slices. The discrete-event engine's own events (``result.extra["events"]``, ``(gpu, name, start, end)``
  seconds) are drawn when present; for the analytic engine each layer's phases are laid out one after another
  from the critical-path times, each GPU's compute slice lasting its own time (the idle gap to the next phase is
  the wait for the slowest GPU). Only the first steps are drawn (``TIMELINE_STEPS`` of the analytic
  engine, at most ``MAX_EVENTS`` slices).
- ``load_heatmap.png``: token-choices per GPU and layer over the replay, relative to the layer's mean.
- ``step_latency.png``: step latency over the steps (stalls marked).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import MoesimError
from moesim.io import atomic_path, atomic_write_text, write_json
from moesim.sim.result import PHASES, SimResult
from moesim.timeline import chrome_trace as chrome_trace_events

REPORT_FORMAT = "moesim.replay-report"
MAX_EVENTS = 200_000
FILES = ("report.json", "steps.csv", "timeline.json", "load_heatmap.png", "step_latency.png")


# -- terminal ---------------------------------------------------------------------------------------------------
def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _ms(x: float) -> str:
    return f"{x * 1e3:.3f} ms"


def format_table(summary: dict[str, Any]) -> str:
    """The headline figures of a summary as an aligned two-column table."""
    s = summary
    shares = s.get("phase_share", {})
    rows = [
        ("engine", str(s.get("engine"))),
        ("steps", f"{s['steps']} (from step {s.get('first_step', 0)}), {s['tokens']} tokens"),
        ("step latency p50", _ms(s["step_latency_p50_s"])),
        ("step latency p99", _ms(s["step_latency_p99_s"])),
        ("step latency mean", _ms(s["step_latency_mean_s"])),
        ("throughput", f"{s['tokens_per_s']:,.0f} tokens/s"),
        ("MoE share of step time", f"{100 * s['moe_share']:.1f} %"),
        ("  phases", " ".join(f"{n} {100 * shares.get(n, 0.0):.1f}%" for n in PHASES)),
        ("busiest GPU / mean load", f"{s['busiest_gpu_over_mean_load']:.3f}"),
        ("GPU busy (mean / max)", f"{100 * s.get('gpu_busy_share_mean', 0.0):.1f} % / "
                                  f"{100 * s.get('gpu_busy_share_max', 0.0):.1f} % of the time"),
        ("bytes intra-node / step", f"{_si(s['bytes_intra_node_per_step'], 'B')} "
                                    f"({_si(s['bytes_intra_node_per_token'], 'B')}/token)"),
        ("bytes inter-node / step", f"{_si(s['bytes_inter_node_per_step'], 'B')} "
                                    f"({_si(s['bytes_inter_node_per_token'], 'B')}/token)"),
    ]
    if s.get("busiest_link"):
        rows.append(("busiest link", f"{s['busiest_link']} ({_si(s['busiest_link_bandwidth'], 'B/s')}), "
                                     f"{100 * s['busiest_link_utilisation']:.1f} % utilised"))
    else:
        rows.append(("busiest link", "none (no bytes between GPUs)"))
    if s.get("stall_time_s"):
        rows.append(("rebalance stalls", f"{s.get('stalls', 0)} stalls, {_ms(s['stall_time_s'])}, "
                                         f"{_si(s.get('stall_bytes', 0.0), 'B')} moved"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# -- steps.csv -------------------------------------------------------------------------------------------------
def steps_csv(result: SimResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "phase", "tokens", "latency_s"] + [f"{p}_s" for p in PHASES] +
               ["dense_layers_s", "stall_s", "bytes_intra", "bytes_inter", "busiest_gpu", "busiest_gpu_busy_s",
                "busiest_gpu_moe_s"])
    pt = np.asarray(result.phase_time).sum(axis=1) if result.num_steps else np.zeros((0, len(PHASES)))
    dl = np.asarray(result.extra.get("dense_layer_time", np.zeros(result.num_steps)))
    if dl.shape != (result.num_steps,):
        dl = np.zeros(result.num_steps)
    names = {0: "decode", 1: "prefill"}
    for i in range(result.num_steps):
        g = int(np.argmax(result.gpu_busy[i])) if result.gpu_busy.shape[1] else 0
        w.writerow([result.first_step + i, names.get(int(result.phase[i]), ""), int(result.step_tokens[i]),
                    f"{result.step_time[i]:.9g}"] + [f"{x:.9g}" for x in pt[i]] +
                   [f"{dl[i]:.9g}", f"{result.stall_time[i]:.9g}", f"{result.bytes_intra[i]:.9g}",
                    f"{result.bytes_inter[i]:.9g}", g, f"{result.gpu_busy[i, g]:.9g}", f"{result.moe_time[i, g]:.9g}"])
    return buf.getvalue()


# -- timeline --------------------------------------------------------------------------------------------------
def _analytic_events(result: SimResult) -> list[tuple[int, str, float, float]]:
    d = result.extra.get("gpu_phase_times")
    if not d or not d.get("steps"):
        return []
    att, gate, exp = (np.asarray(d[k]) for k in ("attention", "gate", "expert"))  # [n, L, G]
    pt = np.asarray(d["phase_time"])  # [n, L, 5]
    dl_t, dl_busy = np.asarray(d["dense_layer_time"]), np.asarray(d["dense_layer_busy"])
    n, L, G = att.shape
    ev: list[tuple[int, str, float, float]] = []
    t = 0.0
    for s in range(n):
        step_end = t + float(result.step_time[s])
        if dl_t[s] > 0:
            ev.extend((g, "dense layers", t, t + float(dl_busy[s, g])) for g in range(G) if dl_busy[s, g] > 0)
            t += float(dl_t[s])
        for layer in range(L):
            p = pt[s, layer]
            for g in range(G):
                a, b = float(att[s, layer, g]), float(gate[s, layer, g])
                if a > 0:
                    ev.append((g, "attention", t, t + a))
                if b > 0:
                    ev.append((g, "gate", t + a, t + a + b))
            t1 = t + p[0] + p[1]
            if p[2] > 0:
                ev.extend((g, "dispatch", t1, t1 + p[2]) for g in range(G))
            t2 = t1 + p[2]
            ev.extend((g, "expert", t2, t2 + float(exp[s, layer, g])) for g in range(G) if exp[s, layer, g] > 0)
            t3 = t2 + p[3]
            if p[4] > 0:
                ev.extend((g, "combine", t3, t3 + p[4]) for g in range(G))
            t = t3 + p[4]
        stall = float(result.stall_time[s])
        if stall > 0:
            ev.extend((g, "rebalance stall", step_end - stall, step_end) for g in range(G))
        t = step_end
        if len(ev) > MAX_EVENTS:
            break
    return ev[:MAX_EVENTS]


def chrome_trace(result: SimResult, label: str = "moesim replay") -> dict[str, Any]:
    """Chrome trace-event JSON (:func:`moesim.timeline.chrome_trace`): one track per GPU, integer microseconds,
    slices that touch in time touch exactly."""
    events = result.extra.get("events")
    source = "des" if events else "analytic"
    ev = list(events)[:MAX_EVENTS] if events else _analytic_events(result)
    G = result.num_gpus
    # overlapped runs (DES --overlap) name the second micro-batch's slices ".../mb1": they get a track of their own
    second = any(str(name).endswith("/mb1") for _, name, _, _ in ev)
    tracks = [f"GPU {g}" for g in range(G)] + ([f"GPU {g} micro-batch 2" for g in range(G)] if second else [])
    order = [2 * g for g in range(G)] + ([2 * g + 1 for g in range(G)] if second else [])
    slices = [(int(g) + (G if str(name).endswith("/mb1") else 0), str(name), float(a), float(b))
              for g, name, a, b in ev]
    return chrome_trace_events(slices, tracks, label, order=order,
                               other={"source": source, "first_step": int(result.first_step), "slices": len(ev)})


# -- plots -----------------------------------------------------------------------------------------------------
def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})


def plot_load_heatmap(result: SimResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = np.asarray(result.gpu_load, dtype=float)  # [L, G]
    mean = load.mean(axis=1, keepdims=True)
    rel = np.divide(load, mean, out=np.ones_like(load), where=mean > 0)
    L, G = load.shape
    fig, ax = plt.subplots(figsize=(min(4 + G * 0.12, 16), min(2.5 + L * 0.12, 12)))
    im = ax.imshow(rel, aspect="auto", cmap="viridis", interpolation="nearest", origin="lower")
    ax.set_xlabel("GPU")
    ax.set_ylabel("MoE layer")
    ax.set_title("token-choices per GPU / layer mean")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_step_latency(result: SimResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result.first_step + np.arange(result.num_steps)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(steps, np.asarray(result.step_time) * 1e3, lw=1, marker="." if result.num_steps < 200 else None)
    stalled = np.flatnonzero(np.asarray(result.stall_time) > 0)
    if stalled.size:
        ax.scatter(steps[stalled], np.asarray(result.step_time)[stalled] * 1e3, color="red", zorder=3,
                   label="rebalance stall")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("latency (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title("step latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


# -- all of it -------------------------------------------------------------------------------------------------
def write_report(result: SimResult, out_dir: str | Path, inputs: dict[str, Any], topology: Any,
                 plots: bool = True) -> dict[str, Any]:
    """Write the files of the module docstring into ``out_dir`` (created if missing); return the summary."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MoesimError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary(topology)
    extra_info = {k: v for k, v in result.extra.items() if isinstance(v, (str, int, float, bool)) and k != "engine"}
    doc = {"format": REPORT_FORMAT, "version": 1, "summary": summary, "inputs": inputs, "engine_info": extra_info}
    if result.extra.get("stalls"):
        doc["stalls"] = result.extra["stalls"]
    if result.extra.get("migrations"):
        doc["migrations"] = result.extra["migrations"]
    atomic_write_text(out / "steps.csv", steps_csv(result))
    atomic_write_text(out / "timeline.json", json.dumps(chrome_trace(result), separators=(",", ":")) + "\n")
    if plots:
        plot_load_heatmap(result, out / "load_heatmap.png")
        plot_step_latency(result, out / "step_latency.png")
    write_json(out / "report.json", doc)
    return summary
