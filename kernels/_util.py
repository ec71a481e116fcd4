"""Small helpers shared by the Triton wrappers: buffer allocation (poisonable for tests) and block sizes."""

from __future__ import annotations

import os

import torch


def interpret_without_gpu() -> None:
    """Turn the Triton interpreter on when this machine has no CUDA device and nobody chose a mode.

    Called at the top of each Triton module, before its ``@triton.jit`` decorators run (Triton reads
    TRITON_INTERPRET there). Without a GPU compiled kernels cannot launch at all, so the interpreter is the only
    useful mode; an explicit TRITON_INTERPRET=0 (``moesim.kernels.aot`` compiling for sm_90 on a CPU) is respected.
    """
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


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
