"""Bounds on what a request may ask for, so an absurd flag or header is refused in one line, never allocated.

The memory budget (``MOESIM_MEMORY_BUDGET``: bytes, or with a K/M/G/T suffix; default half the machine's memory)
is what one command may plan to hold in its largest arrays. Commands check their biggest allocation against it
before making it; a request over it is an error naming the flag, not a MemoryError minutes later.
"""

from __future__ import annotations

import argparse
import os
import re

from moesim.errors import MoesimError

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _machine_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def memory_budget() -> int:
    """Bytes one command may plan to allocate (``MOESIM_MEMORY_BUDGET``, default half the machine's memory)."""
    text = os.environ.get("MOESIM_MEMORY_BUDGET", "").strip().upper()
    if not text:
        return _machine_memory() // 2
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?", text)
    if not m or float(m.group(1)) <= 0:
        raise MoesimError(f"MOESIM_MEMORY_BUDGET={text!r} is not a size such as 2G or 500M")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def human(nbytes: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def check_memory(nbytes: float, what: str) -> None:
    """Refuse ``what`` when it needs more than the memory budget (``nbytes`` may be a Python int of any size)."""
    budget = memory_budget()
    if nbytes > budget:
        raise MoesimError(f"{what} would need about {human(nbytes)}, more than the memory budget of {human(budget)} "
                          "(set MOESIM_MEMORY_BUDGET to change it)")


def bounded_int(lo: int, hi: int | None = None) -> type:
    """An argparse ``type`` accepting integers in [lo, hi]; the message names the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is outside {lo}..{hi if hi is not None else 'inf'}")
        return value

    parse.__name__ = "integer"
    return parse  # type: ignore[return-value]


def finite_float(lo: float | None = None, hi: float | None = None, *, open_lo: bool = False) -> type:
    """An argparse ``type`` accepting finite floats in [lo, hi] ((lo, hi] with ``open_lo``): never NaN or inf."""
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or (lo is not None and (value <= lo if open_lo else value < lo)) or \
                (hi is not None and value > hi):
            lo_txt = "-inf" if lo is None else f"{lo:g}"
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if open_lo else '['}{lo_txt}, "
                                             f"{'inf' if hi is None else f'{hi:g}'}]")
        return value

    parse.__name__ = "number"
    return parse  # type: ignore[return-value]
