"""Launch configurations of the fused MoE kernels: tuned JSON files per (shape, device, dtype), else a heuristic.

A file ``kernels/configs/E=8,H=4096,F=14336,device=NVIDIA_H100_80GB_HBM3,dtype=bfloat16.json`` (written by
``python -m moesim.kernels.tune``) holds, per token count, the best configuration found on that device::

    {"format": "moesim.fused-moe-configs", "version": 1, "device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16",
     "num_experts": 8, "hidden_size": 4096, "ffn_size": 14336, "top_k": 2, "tuned_with": {...},
     "configs": {"16": {"BLOCK_M": 16, "w13": {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4,
                                              "num_stages": 4},
                         "w2": {..., "SPLIT_K": 4}, "seconds": 1.1e-4}, ...}}

Both GEMMs share BLOCK_M (one alignment of the slots serves both); everything else is per GEMM. At run time the
entry whose token count is nearest (in log scale, after rescaling by top-k) is used. Unlike vLLM we do not key by
"M" alone: the file also names H, since the best tiles depend on the reduction length.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
FORMAT = "moesim.fused-moe-configs"
VERSION = 1
_GEMM_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "SPLIT_K")


class ConfigError(ValueError):
    """A malformed launch-configuration file or dict (one-line message)."""


def _pow2(name: str, v: Any, lo: int = 1) -> int:
    if not isinstance(v, int) or v < lo or v & (v - 1):
        raise ConfigError(f"{name} must be a power of two >= {lo}, got {v!r}")
    return v


@dataclass(frozen=True)
class GemmConfig:
    """Tiles of one grouped GEMM. SPLIT_K > 1 (down projection only) splits the reduction over programs, writing
    fp32 partials that the combine kernel sums: it fills the GPU when few tokens give few output tiles."""

    BLOCK_N: int = 64
    BLOCK_K: int = 64
    GROUP_M: int = 1
    num_warps: int = 4
    num_stages: int = 3
    SPLIT_K: int = 1

    def __post_init__(self) -> None:
        _pow2("BLOCK_N", self.BLOCK_N, 16)
        _pow2("BLOCK_K", self.BLOCK_K, 16)
        _pow2("num_warps", self.num_warps)
        _pow2("SPLIT_K", self.SPLIT_K)
        if not isinstance(self.GROUP_M, int) or self.GROUP_M < 1:
            raise ConfigError(f"GROUP_M must be a positive integer, got {self.GROUP_M!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ConfigError(f"num_stages must be a positive integer, got {self.num_stages!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], what: str) -> GemmConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{what} must be an object, got {type(d).__name__}")
        unknown = set(d) - set(_GEMM_KEYS)
        if unknown:
            raise ConfigError(f"{what} has unknown keys {sorted(unknown)}; allowed: {list(_GEMM_KEYS)}")
        return cls(**d)


@dataclass(frozen=True)
class MoEConfig:
    BLOCK_M: int = 64
    w13: GemmConfig = field(default_factory=GemmConfig)
    w2: GemmConfig = field(default_factory=GemmConfig)

    def __post_init__(self) -> None:
        _pow2("BLOCK_M", self.BLOCK_M, 16)
        if self.w13.SPLIT_K != 1:
            raise ConfigError("w13.SPLIT_K must be 1: SiLU(gate) × up needs the whole reduction")

    def to_dict(self) -> dict[str, Any]:
        return {"BLOCK_M": self.BLOCK_M, "w13": asdict(self.w13), "w2": asdict(self.w2)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoEConfig:
        if isinstance(d, MoEConfig):
            return d
        if not isinstance(d, dict) or "BLOCK_M" not in d:
            raise ConfigError(f"a fused-MoE config needs BLOCK_M, w13 and w2, got {d!r}")
        return cls(d["BLOCK_M"], GemmConfig.from_dict(d.get("w13", {}), "w13"),
                   GemmConfig.from_dict(d.get("w2", {}), "w2"))


def device_name(device: torch.device | None = None) -> str:
    """The name configs are keyed by: the CUDA device name, or "interpreter" off the GPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "interpreter"


def config_filename(num_experts: int, hidden: int, ffn: int, device: str, dtype: torch.dtype | str) -> str:
    dt = str(dtype).replace("torch.", "")
    dev = re.sub(r"[^A-Za-z0-9.-]+", "_", device).strip("_")
    return f"E={num_experts},H={hidden},F={ffn},device={dev},dtype={dt}.json"


def num_sms(device: torch.device | None) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM; only used to shape the heuristic off the GPU


def heuristic_config(num_tokens: int, num_experts: int, hidden: int, ffn: int, top_k: int,
                     sms: int = 132) -> MoEConfig:
    """A reasonable configuration without tuning, shaped for Hopper.

    Few slots per expert (decode) are memory-bound: small BLOCK_M wastes little padding, deep pipelines keep many
    weight loads in flight, and split-K gives the down projection (only H/BLOCK_N tiles per expert) enough
    programs to occupy every SM. Many slots per expert (prefill) are compute-bound: 128×128 tiles on 8 warps
    feed the tensor cores, with grouped (GROUP_M) launch order so that neighbouring programs share weight tiles
    in L2.
    """
    slots = max(1, num_tokens * top_k)
    active = max(1, min(num_experts, slots))
    per_expert = slots / active
    if per_expert <= 16:
        block_m = 16
    elif per_expert <= 32:
        block_m = 32
    elif per_expert <= 96:
        block_m = 64
    else:
        block_m = 128
    if block_m <= 32:
        w13 = GemmConfig(BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
        blocks_m = active * math.ceil(per_expert / block_m)
        tiles = blocks_m * math.ceil(hidden / 64)
        split = 1
        while split < 8 and tiles * split < 2 * sms and ffn // (128 * split * 2) >= 1:
            split *= 2
        w2 = GemmConfig(BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4, SPLIT_K=split)
    elif block_m == 64:
        w13 = GemmConfig(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
        w2 = GemmConfig(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    else:
        w13 = GemmConfig(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
        w2 = GemmConfig(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    return MoEConfig(block_m, w13, w2)


@functools.lru_cache(maxsize=64)
def _load_table(path: str, mtime: float) -> tuple[int, dict[int, MoEConfig]]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read launch configs {path}: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ConfigError(f"{path} is not a {FORMAT} v{VERSION} file")
    try:
        table = {int(k): MoEConfig.from_dict(v) for k, v in doc["configs"].items()}
        top_k = int(doc["top_k"])
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{path}: bad entry ({err})") from None
    if not table:
        raise ConfigError(f"{path} holds no configs")
    return top_k, table


def load_table(path: str | Path) -> tuple[int, dict[int, MoEConfig]]:
    """(top_k the file was tuned for, {num_tokens: MoEConfig}) from a config file; cached by path and mtime."""
    p = Path(path)
    return _load_table(str(p), p.stat().st_mtime)


def get_config(num_tokens: int, num_experts: int, hidden: int, ffn: int, top_k: int, dtype: torch.dtype,
               device: torch.device | None = None, config_dir: str | Path | None = None) -> MoEConfig:
    """The tuned config for this shape/device/dtype (nearest token count), else ``heuristic_config``.

    ``config_dir`` defaults to $MOESIM_KERNEL_CONFIGS or kernels/configs.
    """
    folder = str(config_dir or os.environ.get("MOESIM_KERNEL_CONFIGS") or CONFIG_DIR)
    return _lookup(num_tokens, num_experts, hidden, ffn, top_k, dtype, device, folder)


@functools.lru_cache(maxsize=4096)
def _lookup(num_tokens: int, num_experts: int, hidden: int, ffn: int, top_k: int, dtype: torch.dtype,
            device: torch.device | None, folder: str) -> MoEConfig:
    """Cached: fused_moe asks once per layer per step, and a file stat plus a device query each time would show
    at decode. (A config file written while a process runs is seen by new processes.)"""
    path = Path(folder) / config_filename(num_experts, hidden, ffn, device_name(device), dtype)
    if path.is_file():
        file_k, table = load_table(path)
        want = max(1.0, num_tokens * top_k / file_k)
        best = min(table, key=lambda m: (abs(math.log(m) - math.log(want)), m))
        return table[best]
    return heuristic_config(num_tokens, num_experts, hidden, ffn, top_k, num_sms(device))


def write_table(path: str | Path, *, device: str, dtype: torch.dtype, num_experts: int, hidden: int, ffn: int,
                top_k: int, configs: dict[int, tuple[MoEConfig, float | None]], tuned_with: dict[str, str]) -> None:
    """Write a config file atomically (a crash never leaves a half-written file that get_config would read)."""
    doc = {
        "format": FORMAT, "version": VERSION, "device": device, "dtype": str(dtype).replace("torch.", ""),
        "num_experts": num_experts, "hidden_size": hidden, "ffn_size": ffn, "top_k": top_k,
        "tuned_with": tuned_with,
        "configs": {str(m): {**cfg.to_dict(), "seconds": sec} for m, (cfg, sec) in sorted(configs.items())},
    }
    # the reader ignores the extra "seconds" key per entry
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
