"""Routing traces: what the router chose, per step and MoE layer, independent of the world size."""

from moesim.trace.reader import Chunk, Step, Timings, Trace, add_allow_truncated, open_trace
from moesim.trace.writer import TraceWriter

__all__ = ["Chunk", "Step", "Timings", "Trace", "TraceWriter", "add_allow_truncated", "open_trace"]
