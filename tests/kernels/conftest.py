"""Kernel tests: run Triton under the interpreter when there is no CUDA GPU, and poison every output.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, i.e. before moesim.kernels.router /
moesim.kernels.align / kernels.fused_moe are imported; this conftest is imported before the test modules.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer the kernels allocate starts as NaN / -7 so an element nobody wrote is caught."""
    monkeypatch.setenv("MOESIM_KERNELS_POISON", "1")
