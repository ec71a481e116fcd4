"""The live runtime's rows of the fidelity table: measured vs predicted step and MoE (expert) time.

Three sources, every row marked ``calibration`` (the ``moesim validate`` fit window, steps 0..C-1) or ``held out``
(steps C..S-1, never fitted on; an uncalibrated roofline fits nothing, so all its rows are held out):

- **this run**: ``moesim validate`` (moesim/validate.py) on this machine, 2 gloo ranks on CPU, the ``small``
  preset; beside the fitted prediction, the uncalibrated roofline that validate reports (its step and expert
  time: ``CostModel.roofline`` on the nominal ``cpu`` datasheet of moesim/topo/devices.py, nothing fitted).
- **recorded, CPU**: studies/validate_loop/results/report_seed0.json (that study's last full run, 96 steps × 64).
- **recorded, H200**: the project's one GPU run, copied verbatim from /work/shared/gpu/h200-2026-12-04/ into
  studies/fidelity/recorded/h200-2026-12-04/: ``validate_olmoe_report.md`` (``moesim validate --device cuda
  --nproc 1 --preset olmoe-1b-7b --steps 32 --batch 128 --prompt-len 256``; its Markdown as
  moesim.validate.render_markdown writes it) and ``README.md`` (the roofline's expert and step time on that trace
  against the torch profile's expert kernels and the measured decode steps).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import MoesimError

HERE = Path(__file__).resolve().parent
GPU_DIR = HERE / "recorded" / "h200-2026-12-04"
CPU_REPORT = HERE.parent / "validate_loop" / "results" / "report_seed0.json"


def _row(system: str, ep: int, phase: str, ref_ms: float, pred_ms: float, by: str, role: str,
         source: str) -> dict[str, Any]:
    return {"system": system, "EP": ep, "phase": phase, "metric": "ms", "reference": round(ref_ms, 3),
            "predicted": round(pred_ms, 3), "error": f"{pred_ms / ref_ms - 1:+.1%}", "by": by,
            "flat (before)": "", "row": role, "source": source}


def validate_rows(rep: dict[str, Any], system: str, source: str) -> list[dict[str, Any]]:
    """Rows of one ``moesim validate`` report (the dict of report.json): median step time in the calibration and
    held-out windows, mean per-rank MoE (expert) time over the held-out window, and the uncalibrated roofline's
    step and MoE time over the held-out window where the report has them (reports since issue 13)."""
    v, ep = rep["windows"], int(rep["config"]["nproc"])
    cal, held = v["calibration"], v["held_out"]
    span = f"steps {held['steps'][0]}..{held['steps'][1] - 1}"
    step, moe = f"step, median of {span}", f"MoE per rank, mean of {span}"
    moe_meas = 1e3 * float(np.mean(held["moe_time_per_rank_measured_s"]))
    rows = [_row(system, ep, f"step, median of steps 0..{cal['steps'][1] - 1}",
                 1e3 * cal["step_time_measured_median_s"], 1e3 * cal["step_time_predicted_median_s"],
                 "validate fit", "calibration", source),
            _row(system, ep, step, 1e3 * held["step_time_measured_median_s"],
                 1e3 * held["step_time_predicted_median_s"], "validate fit", "held out", source),
            _row(system, ep, moe, moe_meas, 1e3 * float(np.mean(held["moe_time_per_rank_predicted_s"])),
                 "validate fit", "held out", source)]
    by = "roofline (uncalibrated)"  # the device's datasheet (report["roofline"]["device"]), nothing fitted
    if "roofline_step_time_predicted_median_s" in held:
        rows.append(_row(system, ep, step, 1e3 * held["step_time_measured_median_s"],
                         1e3 * held["roofline_step_time_predicted_median_s"], by, "held out", source))
    if "roofline_moe_time_per_rank_predicted_s" in held:
        roof_moe = 1e3 * float(np.mean(held["roofline_moe_time_per_rank_predicted_s"]))
        rows.append(_row(system, ep, moe, moe_meas, roof_moe, by, "held out", source))
    return rows


def live_rows(runs: int, steps: int, batch: int, work: Path) -> list[dict[str, Any]]:
    """``runs`` fresh ``moesim validate`` runs (seeds 0..runs-1) on this machine, and their rows."""
    from moesim.validate import ValidateConfig, run_validation

    rows = []
    for seed in range(runs):
        out = work / f"validate{seed}"
        cfg = ValidateConfig(nproc=2, preset="small", algo="eplb", steps=steps, batch=batch, prompt_len=16,
                             seed=seed, out=str(out), quiet=True)
        rep = run_validation(cfg)
        rows += validate_rows(rep, "live CPU, gloo (this run)",
                              f"moesim validate --preset small --steps {steps} --batch {batch} --seed {seed}")
    return rows


def recorded_cpu_rows(path: Path = CPU_REPORT) -> list[dict[str, Any]]:
    """The validate_loop study's recorded seed-0 report (no trace kept: no roofline row)."""
    if not path.is_file():
        raise MoesimError(f"{path}: recorded validate report not found (run studies/validate_loop/run.py)")
    rep = json.loads(path.read_text())
    c = rep["config"]
    return validate_rows(rep, "live CPU, gloo (recorded)",
                         f"studies/validate_loop/results/report_seed0.json ({c['steps']} steps x {c['batch']})")


_WINDOW = re.compile(r"^\| (calibration|before|after|held_out) \| (\d+)\.\.(\d+) \| ([\d.]+) ms \| ([\d.]+) ms \|",
                     re.M)
_MOE = re.compile(r"^\| (before|after) \| (\d+) \| ([\d.]+) ms \| ([\d.]+) ms \|", re.M)
_ROOF_EXPERT = re.compile(r"experts ([\d.]+) ms \(the profile's expert kernels: ([\d.]+) ms\)")
_ROOF_STEP = re.compile(r"roofline on the recorded trace .*?decode ([\d.]+)[–-]([\d.]+) ms per step", re.S)


def recorded_gpu_rows(folder: Path = GPU_DIR) -> list[dict[str, Any]]:
    """Rows of the H200 run: validate's windows and per-rank MoE time (validate_olmoe_report.md), the roofline's
    expert time against the profile's expert kernels and its decode step against the held-out median (README.md)."""
    report, readme = folder / "validate_olmoe_report.md", folder / "README.md"
    for p in (report, readme):
        if not p.is_file():
            raise MoesimError(f"{p}: recorded GPU file not found")
    text, notes = report.read_text(), readme.read_text()
    windows = {m[0]: (int(m[1]), int(m[2]), float(m[3]), float(m[4])) for m in _WINDOW.findall(text)}
    moe = {m[0]: (float(m[2]), float(m[3])) for m in _MOE.findall(text) if m[1] == "0"}
    roof_e, roof_s = _ROOF_EXPERT.search(notes), _ROOF_STEP.search(notes)
    if not {"calibration", "held_out"} <= windows.keys() or not {"before", "after"} <= moe.keys() or not (
            roof_e and roof_s):
        raise MoesimError(f"{folder}: the recorded GPU files do not have the expected tables/lines")
    sysname, src = "live H200, olmoe-1b-7b (recorded)", "recorded/h200-2026-12-04/validate_olmoe_report.md"
    rows = []
    for name, role in (("calibration", "calibration"), ("held_out", "held out")):
        a, b, meas, pred = windows[name]
        rows.append(_row(sysname, 1, f"step, median of steps {a}..{b}", meas, pred, "validate fit", role, src))
    for name in ("before", "after"):
        a, b = windows[name][:2]
        rows.append(_row(sysname, 1, f"MoE rank 0, mean of steps {a}..{b}", *moe[name], "validate fit", "held out",
                         src))
    lo, hi = roof_s[1], roof_s[2]
    a, b, meas, _ = windows["held_out"]
    readme_src = "recorded/h200-2026-12-04/README.md"
    rows.append(_row(sysname, 1, "expert kernels (GPU time in the profile)", float(roof_e[2]), float(roof_e[1]),
                     "roofline (uncalibrated)", "held out", readme_src))
    rows.append(_row(sysname, 1, f"step, median of steps {a}..{b}", meas, (float(lo) + float(hi)) / 2,
                     "roofline (uncalibrated)", "held out", f"{readme_src} (roofline {lo}-{hi} ms: midpoint)"))
    return rows
