"""Per-GPU peaks the cost model and topology presets share.

Sources (dense, no sparsity; per GPU):
- H100 SXM5 80 GB: 989 TFLOP/s bf16 tensor, 3.35 TB/s HBM3 — NVIDIA H100 Tensor Core GPU datasheet.
- H200 SXM 141 GB: 989 TFLOP/s bf16 tensor, 4.8 TB/s HBM3e — NVIDIA H200 datasheet.
- H800 SXM 80 GB: the H100 die with reduced NVLink; same 989 TFLOP/s and 3.35 TB/s (NVIDIA H800 product
  brief; DeepSeek-V3 technical report, section 3.1).
- H100 PCIe 80 GB: 756 TFLOP/s bf16 tensor (1,513 with sparsity), 2.0 TB/s HBM2e — NVIDIA H100 datasheet.
- A100 SXM 80 GB: 312 TFLOP/s bf16 tensor, 2.039 TB/s HBM2e — NVIDIA A100 datasheet.
- Dense FP8 tensor peaks (half the "with sparsity" figures of the same datasheets): H100 / H200 / H800 SXM
  1,979 TFLOP/s, H100 PCIe 1,513 TFLOP/s; A100 has no FP8 tensor cores (its GEMMs on FP8 weights dequantise to
  bf16: the bf16 peak applies). Used for the GEMMs of FP8-weight models (DeepGEMM / CUTLASS FP8 block-scaled).
- Kernel launch ~5 µs: the usual CUDA launch + scheduling overhead of a small kernel on Hopper (NVIDIA CUDA
  best-practices guide quotes a few µs; vLLM/SGLang capture decode in CUDA graphs to hide it).
- "cpu": a *nominal* CPU rank for gloo test runs (two AVX2 cores, ~100 GFLOP/s fp32 and ~20 GB/s of DRAM
  bandwidth each); only a placeholder: fit the cost model from the run's timings (``CostModel.fit``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from moesim.errors import MoesimError


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator: dense bf16 (and FP8) peak, HBM bandwidth and capacity, fixed cost of a kernel launch."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bw: float  # bytes/s
    hbm_bytes: float  # bytes
    kernel_launch: float = 5e-6  # s per kernel launch
    peak_flops_fp8: float | None = None  # dense FP8 FLOP/s; None: no FP8 tensor cores (bf16 peak applies)

    def __post_init__(self) -> None:
        for field in ("peak_flops", "hbm_bw", "hbm_bytes"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise MoesimError(f"device {self.name!r}: {field} must be a positive finite number, got {v!r}")
        v = self.kernel_launch
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise MoesimError(f"device {self.name!r}: kernel_launch must be a finite number >= 0, got {v!r}")
        v = self.peak_flops_fp8
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or v <= 0):
            raise MoesimError(f"device {self.name!r}: peak_flops_fp8 must be a positive finite number or null, "
                              f"got {v!r}")

    def gemm_peak(self, fp8: bool) -> float:
        """FLOP/s of a GEMM whose operands are FP8 (``fp8``) or bf16."""
        return float(self.peak_flops_fp8) if fp8 and self.peak_flops_fp8 else self.peak_flops

    @property
    def ridge_intensity(self) -> float:
        """FLOPs per HBM byte where the roofline turns from memory- to compute-bound."""
        return self.peak_flops / self.hbm_bw

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> DeviceSpec:
        """A device from a JSON object, or a preset name (a string)."""
        if isinstance(data, str):
            return get_device(data)
        if not isinstance(data, dict):
            raise MoesimError("device must be a preset name or a JSON object")
        known = {"name", "peak_flops", "hbm_bw", "hbm_bytes", "kernel_launch", "peak_flops_fp8"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MoesimError(f"device has unknown fields: {', '.join(unknown)}")
        missing = [k for k in ("name", "peak_flops", "hbm_bw", "hbm_bytes") if k not in data]
        if missing:
            raise MoesimError(f"device lacks fields: {', '.join(missing)}")
        if not isinstance(data["name"], str):
            raise MoesimError("device name must be a string")
        return cls(**data)


DEVICES: dict[str, DeviceSpec] = {
    "h100": DeviceSpec("h100", peak_flops=989e12, hbm_bw=3.35e12, hbm_bytes=80e9, peak_flops_fp8=1979e12),
    "h200": DeviceSpec("h200", peak_flops=989e12, hbm_bw=4.8e12, hbm_bytes=141e9, peak_flops_fp8=1979e12),
    "h800": DeviceSpec("h800", peak_flops=989e12, hbm_bw=3.35e12, hbm_bytes=80e9, peak_flops_fp8=1979e12),
    "h100-pcie": DeviceSpec("h100-pcie", peak_flops=756e12, hbm_bw=2.0e12, hbm_bytes=80e9, peak_flops_fp8=1513e12),
    "a100": DeviceSpec("a100", peak_flops=312e12, hbm_bw=2.039e12, hbm_bytes=80e9),
    "cpu": DeviceSpec("cpu", peak_flops=1e11, hbm_bw=2e10, hbm_bytes=16e9, kernel_launch=2e-6),
}


def get_device(name: str) -> DeviceSpec:
    try:
        return DEVICES[name.lower()]
    except KeyError:
        raise MoesimError(f"unknown device {name!r}; known: {', '.join(DEVICES)}") from None
