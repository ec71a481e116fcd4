"""Compiled max-min solve for the DES's flow network (optional: needs ``numba``, ``pip install moesim[fast]``).

:func:`maxmin_rates_jit` runs the same algorithm as :func:`moesim.sim.maxmin.maxmin_rates` (parallel rounds
that freeze every link that is a local minimum of the fair share) with the same floating-point operations in
the same order, so both give bit-identical rates (tested); numpy spends ~100 calls of fixed overhead per solve,
which dominates the DES at 64+ GPUs (thousands of solves per step, a few hundred flows each).

:func:`update_core` is one batch point of :class:`moesim.sim.network.FlowNetwork` (move the flows forward, retire
the finished ones and count them towards their groups, take in new ones, solve, find the next hand-over) in one
call, in place over the network's flow buffers. Its rates come from :func:`maxmin_rates_classes`: flows whose
narrowest links are the same (eight PXN flows to one remote GPU) form one row of the solve; a certificate checks
that the wider links neither bind them nor serve a wider-tier flow more slowly, else the per-flow solve runs. The
allocation is the per-flow one up to round-off (tested), so the DES results equal the numpy path's to ~1e-12.

Without numba, all are None and the numpy code runs (:func:`set_active` switches between the two);
``MOESIM_NO_JIT=1`` disables the compiled code.
The first use compiles (about a second; cached on disk by numba afterwards).
"""

from __future__ import annotations

from typing import Any

from moesim.jit import optional_module

maxmin_rates_jit: Any = None
maxmin_rates_classes: Any = None
update_core: Any = None
start_core: Any = None
arrive_core: Any = None
active = False  # whether the flow network uses the compiled code (loaded, and not switched off)
_loaded = False
_available = False  # numba imported and the kernels defined


def load() -> bool:
    """Compile (or load numba's cache) on first use, so that importing the simulator never imports numba;
    returns whether the compiled code is in use."""
    global _loaded, _available, active, maxmin_rates_jit, maxmin_rates_classes, update_core, start_core, arrive_core
    if not _loaded:
        _loaded = True
        k = optional_module("moesim.sim._maxmin_kernels")  # None: numba missing or MOESIM_NO_JIT set
        if k is None:
            return False
        maxmin_rates_jit, update_core, arrive_core = k.maxmin_rates_jit, k.update_core, k.arrive_core
        start_core = k.start_core
        maxmin_rates_classes = k.maxmin_rates_classes
        _available = active = True
    return active


def set_active(on: bool) -> bool:
    """Use the compiled code (if numba is installed) or the numpy code; returns the previous setting. For
    benchmarks and tests that compare the two: same results up to round-off (the per-flow solve is bit-identical;
    the batch points' class-aggregated solve sums in another order), only the speed differs."""
    global active
    before = active
    load()
    active = _available and bool(on)
    return before
