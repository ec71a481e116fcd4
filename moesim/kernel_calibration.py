"""Kernel-calibration files (written by kernels/calibrate.py on a GPU; read here without torch): the checked
document, the achievable-efficiency curve it implies (efficiency against FLOPs per byte), and a model's measured
fused-MoE table. The one reader of the format: the kernels' own tools call it too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moesim.errors import MoesimError
from moesim.models import ModelSpec
from moesim.topo.devices import DeviceSpec

CALIBRATION_FORMAT = "moesim.kernel-calibration"


_NEED = ("hidden_size", "ffn_size", "num_experts", "top_k", "tokens", "seconds")
_DTYPE_BYTES = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0}


def read_calibration(path: Any) -> dict[str, Any]:
    """The checked calibration file: format, version, and every entry's fields (one-line errors)."""
    from moesim.io import read_json

    doc = read_json(path, "kernel calibration")
    if not isinstance(doc, dict) or doc.get("format") != CALIBRATION_FORMAT:
        raise MoesimError(f"{path} is not a {CALIBRATION_FORMAT} file")
    if doc.get("version") != 1:
        raise MoesimError(f"{path}: unsupported calibration version {doc.get('version')!r}")
    entries = doc.get("entries")
    if not isinstance(entries, list) or not entries:
        raise MoesimError(f"{path}: 'entries' must be a non-empty list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or any(k not in e for k in _NEED):
            raise MoesimError(f"{path}: entry {i} needs {', '.join(_NEED)}")
        vals = [e[k] for k in _NEED]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in vals):
            raise MoesimError(f"{path}: entry {i} has a non-numeric or non-finite value")
        if (e["seconds"] <= 0 or e["tokens"] < 1 or e["num_experts"] < 1 or e["top_k"] < 1 or e["hidden_size"] < 1
                or e["ffn_size"] < 1):
            raise MoesimError(f"{path}: entry {i} needs seconds > 0 and tokens, num_experts, top_k, hidden_size, "
                              "ffn_size >= 1")
        choices = float(e["tokens"]) * e["top_k"]
        active = e.get("active_experts") or min(e["num_experts"], choices)
        if isinstance(active, bool) or not isinstance(active, (int, float)) or not 0 < active <= e["num_experts"]:
            raise MoesimError(f"{path}: entry {i} has active_experts {active!r} outside 1..num_experts")
    return doc


def _calibration_peaks(doc: dict[str, Any], device: DeviceSpec) -> tuple[DeviceSpec, bool]:
    """The measured device's peaks (by the file's device name, e.g. "NVIDIA H200"), else ``device``'s (False)."""
    from moesim.topo.devices import DEVICES

    name = str(doc.get("device") or "").lower()
    for key in sorted(DEVICES, key=len, reverse=True):  # "h100-pcie" before "h100"
        if key != "cpu" and all(part in name for part in key.split("-")):
            return DEVICES[key], True
    return device, False


def efficiency_curve(doc: dict[str, Any], device: DeviceSpec, source: str = "calibration",
                     bin_decades: float = 0.25) -> dict[str, Any]:
    """Achievable efficiency against arithmetic intensity, from the fused-MoE timings of a calibration file.

    Each entry: FLOPs = 2·3·H·F·token-choices, bytes = active experts' weights + choices' activations in and
    out (the roofline's own counts); efficiency = max(FLOPs / peak FLOP/s, bytes / peak HBM) / measured seconds,
    capped at 1; intensity = FLOPs / bytes. Points are grouped in bins of ``bin_decades`` of log10(intensity),
    median per bin. Returns ``{"x": [log10 intensity], "y": [efficiency], "device", "points", "source"}``.
    Peaks are the measured device's (matched by name), else ``device``'s.
    """
    peaks, matched = _calibration_peaks(doc, device)
    b = _DTYPE_BYTES.get(str(doc.get("dtype", "bfloat16")), 2.0)
    xs, ys = [], []
    for e in doc["entries"]:
        H, F = float(e["hidden_size"]), float(e["ffn_size"])
        choices = float(e["tokens"]) * e["top_k"]
        active = float(e.get("active_experts") or min(e["num_experts"], choices))
        flops = 2.0 * 3 * H * F * choices
        nbytes = active * 3 * H * F * b + choices * 2 * H * b
        ideal = max(flops / peaks.peak_flops, nbytes / peaks.hbm_bw)
        xs.append(math.log10(flops / nbytes))
        ys.append(min(1.0, ideal / float(e["seconds"])))
    x, y = np.asarray(xs), np.asarray(ys)
    key = np.floor(x / bin_decades)
    bins = np.unique(key)
    bx = np.array([float(np.median(x[key == k])) for k in bins])
    by = np.array([float(np.median(y[key == k])) for k in bins])
    return {"x": bx.tolist(), "y": by.tolist(), "device": doc.get("device"), "peaks_of": peaks.name,
            "peaks_matched": matched, "points": int(x.size), "source": source}


def read_calibration_table(path: Any, model: ModelSpec,
                            doc: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(expert table component, info): seconds per active expert against token-choices per active expert."""
    doc = doc if doc is not None else read_calibration(path)
    pts: dict[float, list[float]] = {}
    shapes = set()
    for e in doc["entries"]:
        shapes.add((int(e["hidden_size"]), int(e["ffn_size"])))
        if (e["hidden_size"], e["ffn_size"]) != (model.hidden_size, model.ffn_size):
            continue
        choices = float(e["tokens"]) * e["top_k"]
        active = float(e.get("active_experts") or min(e["num_experts"], choices))
        pts.setdefault(choices / active, []).append(float(e["seconds"]) / active)
    if not pts:
        have = ", ".join(f"H={h} F={f}" for h, f in sorted(shapes))
        raise MoesimError(f"{path} has no entries for {model.name} (H={model.hidden_size}, F={model.ffn_size}); "
                          f"it holds {have}")
    x = np.array(sorted(pts))
    y = np.array([float(np.median(pts[k])) for k in x])
    table = {"kind": "table", "x": x.tolist(), "y": y.tolist(), "launch": 0.0}
    return table, {"calibration": str(path), "calibration_device": doc.get("device"), "points": len(x)}
