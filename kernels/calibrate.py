"""Measurement helpers shared by the tuner and the benchmark, and the kernel-calibration JSON they feed the
simulator's cost model (``moesim.cost.CostModel.from_calibration``).

Calibration file (format agreed in the project's INTERFACES; extra keys per entry are informative)::

    {"format": "moesim.kernel-calibration", "version": 1, "device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16",
     "entries": [{"hidden_size": 4096, "ffn_size": 14336, "num_experts": 8, "top_k": 2, "tokens": 16,
                  "seconds": 1.2e-4, "reference_seconds": 3.4e-4, "active_experts": 8, ...}]}
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moesim.kernel_calibration import CALIBRATION_FORMAT
from moesim.kernel_calibration import read_calibration as moesim_read_calibration

CALIBRATION_VERSION = 1


@dataclass(frozen=True)
class MoEShape:
    """Expert shapes of one MoE layer: E routed experts, hidden H, expert FFN F, top-k."""

    name: str
    num_experts: int
    hidden: int
    ffn: int
    top_k: int


SHAPES: dict[str, MoEShape] = {
    # Mixtral-8x7B: 8 experts, hidden 4096, expert FFN 14336, top-2 (Mistral AI model card / HF config)
    "mixtral-8x7b": MoEShape("mixtral-8x7b", 8, 4096, 14336, 2),
    # DeepSeek-V3: 256 routed experts, hidden 7168, moe_intermediate_size 2048, top-8 (DeepSeek-V3 config.json)
    "deepseek-v3": MoEShape("deepseek-v3", 256, 7168, 2048, 8),
    # Qwen3-30B-A3B: 128 experts, hidden 2048, expert FFN 768, top-8
    "qwen3-30b-a3b": MoEShape("qwen3-30b-a3b", 128, 2048, 768, 8),
    # tiny: what --interpret-smoke runs on CPU (sizes deliberately not multiples of the blocks)
    "tiny": MoEShape("tiny", 4, 40, 56, 2),
}

# (dense bf16 tensor FLOP/s, HBM bytes/s): NVIDIA H100 SXM / H200 / H800 datasheets (see shared DESIGN.md)
DEVICE_PEAKS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "H800": (989e12, 3.35e12),
}


def device_peaks(name: str) -> tuple[float, float] | None:
    """(peak FLOP/s, peak HBM B/s) for a CUDA device name, or None when unknown."""
    for key, peaks in DEVICE_PEAKS.items():
        if key in name:
            return peaks
    return None


def make_inputs(shape: MoEShape, tokens: int, dtype: torch.dtype, device: str | torch.device, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random activations and weights (scaled so outputs stay O(1)) and a balanced router: each token picks k
    distinct experts uniformly at random. Returns hidden [T,H], w13 [E,2F,H], w2 [E,H,F], weights [T,k], ids [T,k].
    """
    g = torch.Generator(device=device).manual_seed(seed)
    e, h, f, k = shape.num_experts, shape.hidden, shape.ffn, shape.top_k
    kw = {"generator": g, "device": device}
    hidden = torch.randn(tokens, h, **kw).to(dtype)
    w13 = torch.empty(e, 2 * f, h, dtype=dtype, device=device)
    w2 = torch.empty(e, h, f, dtype=dtype, device=device)
    for i in range(e):  # one expert at a time: no fp32 copy of all weights (DeepSeek-V3 is 22 GB in bf16)
        w13[i] = torch.randn(2 * f, h, **kw) / math.sqrt(h)
        w2[i] = torch.randn(h, f, **kw) / math.sqrt(f)
    ids = torch.rand(tokens, e, **kw).topk(k, dim=1).indices
    weights = torch.softmax(torch.randn(tokens, k, **kw), dim=1)
    return hidden, w13, w2, weights, ids


def moe_flops(slots: int, hidden: int, ffn: int) -> float:
    """FLOPs of the expert FFN for ``slots`` token-choices: three GEMMs of H×F per slot, 2 FLOPs per MAC."""
    return 2.0 * slots * 3 * hidden * ffn


def moe_min_bytes(active_experts: int, tokens: int, hidden: int, ffn: int, elem: int) -> float:
    """The HBM traffic no implementation can avoid: every active expert's weights read once, activations in and
    out once. Intermediates are not counted, so GB/s against this is a strict efficiency measure."""
    return float(elem) * (active_experts * 3 * hidden * ffn + 2 * tokens * hidden)


def time_call(fn: Callable[[], Any], device: torch.device, rep_ms: int = 100, cpu_reps: int = 3) -> float:
    """Seconds per call: triton.testing.do_bench (CUDA events, L2 flushed between runs) on a GPU; the median wall
    time of a few calls off the GPU (only meaningful as a smoke test there)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms)) / 1e3
    fn()
    samples = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def write_json_atomic(path: str | Path, doc: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_ENTRY_KEYS = ("hidden_size", "ffn_size", "num_experts", "top_k", "tokens", "seconds")


def write_calibration(path: str | Path, device: str, dtype: torch.dtype, entries: list[dict[str, Any]]) -> None:
    """Write a kernel-calibration file atomically; every entry needs the INTERFACES keys."""
    for i, ent in enumerate(entries):
        missing = [k for k in _ENTRY_KEYS if k not in ent]
        if missing:
            raise ValueError(f"calibration entry {i} lacks {missing}")
    write_json_atomic(path, {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "device": device,
                             "dtype": str(dtype).replace("torch.", ""), "entries": entries})


def read_calibration(path: str | Path) -> dict[str, Any]:
    """Read and validate a kernel-calibration file: the simulator's reader (one format, one reader; one-line
    MoesimError, a ValueError, on any problem)."""
    return moesim_read_calibration(path)
