"""Optional compiled kernels (numba, the ``fast`` extra): imported on first use, so importing moesim never imports
numba; ``MOESIM_NO_JIT=1`` keeps every caller on its numpy code (which computes the same)."""

from __future__ import annotations

import importlib
import os
from typing import Any


def optional_module(module: str) -> Any:
    """The module of compiled kernels ``module``, or None where numba is missing or ``MOESIM_NO_JIT`` is set."""
    if os.environ.get("MOESIM_NO_JIT"):
        return None
    try:
        return importlib.import_module(module)
    except ImportError:  # numba is optional: the caller's numpy code runs instead
        return None


def optional_kernel(module: str, name: str) -> Any:
    """``module.name`` (a compiled kernel), or None where numba is missing or ``MOESIM_NO_JIT`` is set."""
    mod = optional_module(module)
    return None if mod is None else getattr(mod, name)
