"""Small helpers shared by the Triton wrappers: buffer allocation (poisonable for tests) and block sizes."""

from __future__ import annotations

import os

import torch


def poisoning() -> bool:
    """True when MOESIM_KERNELS_POISON=1: tests set it so that an element no kernel wrote is caught."""
    return os.environ.get("MOESIM_KERNELS_POISON") == "1"


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a buffer full of NaN (floats) / -7 (ints) when poisoning is on."""
    if not poisoning():
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -7
    return torch.full(shape, fill, dtype=dtype, device=device)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
