"""Optional compiled kernels (numba, the ``fast`` extra): imported on first use, so importing moesim never imports
numba; ``MOESIM_NO_JIT=1`` keeps every caller on its numpy code (which computes the same)."""

from __future__ import annotations

import importlib
import os
from typing import Any


def optional_kernel(module: str, name: str) -> Any:
    """``module.name`` (a compiled kernel), or None where numba is missing or ``MOESIM_NO_JIT`` is set."""
    if os.environ.get("MOESIM_NO_JIT"):
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:  # numba is optional: the caller's numpy code runs instead
        return None
