"""Measuring and recording a live run: per-phase timers and the rank-0 trace/run.json writer.

Timing phases per (step, layer, rank), in the trace header's order: ``attention`` (the non-MoE part: norms,
attention, residuals), ``gate`` (router + replica choice), ``dispatch``, ``expert`` (fused MoE on the rows
received) and ``combine``. On CUDA each region is bracketed by CUDA events, read after the step's
synchronize (no host sync inside the step); on CPU by ``time.perf_counter``. Every region is also a
``torch.profiler.record_function`` range, so ``--profile`` traces show the same names (and an NVTX range
on CUDA, for Nsight Systems).

Rank 0 gathers every rank's routing and timings once per step, appends one trace step and flushes it, and
rewrites ``run.json`` atomically: a run killed at any point leaves a trace readable up to its last step.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moesim.io import write_json
from moesim.mapping import ExpertMapping
from moesim.models import ModelSpec
from moesim.trace import TraceWriter
from moesim.trace.format import DEFAULT_TIMING_PHASES

PHASES = DEFAULT_TIMING_PHASES  # ("attention", "gate", "dispatch", "expert", "combine")


class StepTimer:
    """Seconds per (layer, phase) of one step on this rank, and token-choices per local slot."""

    def __init__(self, num_layers: int, slots: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = np.zeros((num_layers, len(PHASES)))
        self.slot_tokens = np.zeros((num_layers, slots), dtype=np.int64)
        self._events: list[tuple[int, int, Any, Any]] = []
        self._counts: list[tuple[int, torch.Tensor]] = []

    @contextlib.contextmanager
    def region(self, layer: int, phase: str) -> Iterator[None]:
        p = PHASES.index(phase)
        with torch.profiler.record_function(f"moesim.{phase}"):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.nvtx.range_push(f"moesim.{phase}.L{layer}")  # for Nsight Systems timelines
                start.record()
                try:
                    yield
                finally:
                    end.record()
                    torch.cuda.nvtx.range_pop()
                self._events.append((layer, p, start, end))
            else:
                t0 = time.perf_counter()
                yield
                self.seconds[layer, p] += time.perf_counter() - t0

    def tokens(self, layer: int, counts: torch.Tensor) -> None:
        self._counts.append((layer, counts))

    def finish(self) -> None:
        """Resolve CUDA events and token counts (call after the step synchronised)."""
        if self.cuda:
            torch.cuda.synchronize()
        for layer, p, start, end in self._events:
            self.seconds[layer, p] += start.elapsed_time(end) / 1e3
        for layer, counts in self._counts:
            self.slot_tokens[layer] += counts.cpu().numpy()
        self._events.clear()
        self._counts.clear()


class Recorder:
    """Collects each step from every rank onto rank 0, which writes ``trace.mtrace`` and ``run.json``."""

    def __init__(self, out: str | Path | None, spec: ModelSpec, rank: int, world: int, config: dict[str, Any],
                 mapping: ExpertMapping) -> None:
        self.out = None if out is None else Path(out)
        self.rank, self.world, self.spec = rank, world, spec
        self.writer: TraceWriter | None = None
        self.doc: dict[str, Any] = {"format": "moesim.run", "version": 1, "config": config, "model": spec.to_dict(),
                                    "world_size": world, "mappings": [{"from_step": 0, **mapping.to_dict()}],
                                    "steps": [], "remaps": [], "status": "running",
                                    "launcher_pid": _launcher_pid()}
        if rank == 0 and self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            meta = {"source": "moesim run", "backend": config.get("backend"), "preset": spec.name,
                    "mapping": mapping.to_dict(), "policy": config.get("policy")}
            self.writer = TraceWriter(self.out / "trace.mtrace", spec, origin=True, num_ranks=world,
                                      weights=True, timing_phases=PHASES, meta=meta)
            self._write_doc()

    @property
    def mapping_index(self) -> int:
        return len(self.doc["mappings"]) - 1

    def note_remap(self, step: int, mapping: ExpertMapping | None, info: dict[str, Any]) -> None:
        """Record a remap attempt before ``step``; ``mapping`` is the new one when it took effect."""
        self.doc["remaps"].append({"step": step, **info})
        if mapping is not None:
            self.doc["mappings"].append({"from_step": step, **mapping.to_dict()})
        if self.rank == 0:
            self._write_doc()

    def note_awaiting(self, step: int | None, path: str | None = None) -> None:
        """Say in run.json that the run waits before ``step`` for a controller's mapping (None: not any more)."""
        self.doc["awaiting"] = None if step is None else {"step": step, "mapping": path}
        if self.rank == 0:
            self._write_doc()

    def record_step(self, step: int, phase: str, ids: torch.Tensor, weights: torch.Tensor, timer: StepTimer | None,
                    experts: list[list[int]], wall: float, tokens: int, kv_len: float | None = None,
                    **extra: Any) -> None:
        """ids/weights [L, T_local, k] of this rank; ``experts`` [L][S] logical expert per local slot;
        ``kv_len``: KV positions each token attended to (mean over the step's tokens). ``timer`` None: a step
        without phase timings (a replayed CUDA graph): it gets no timing records, and run.json says so."""
        extra["timed"] = timer is not None
        if self.out is None:  # nothing to write: rank 0 keeps the step for the summary, no gather
            if self.rank == 0:
                self._note_step(step, phase, tokens, wall, extra)
            return
        mine = (ids.cpu().numpy(), weights.float().cpu().numpy(), None if timer is None else timer.seconds,
                None if timer is None else timer.slot_tokens, np.asarray(experts, dtype=np.int64))
        gathered: list[Any] | None = [None] * self.world if self.rank == 0 else None
        if self.world > 1:
            dist.gather_object(mine, gathered, dst=0)
        elif gathered is not None:
            gathered[0] = mine
        if self.rank != 0:
            return
        assert gathered is not None
        self._note_step(step, phase, tokens, wall, extra)
        if self.writer is not None:
            all_ids = np.concatenate([g[0] for g in gathered], axis=1)
            all_w = np.concatenate([g[1] for g in gathered], axis=1)
            origin = np.concatenate([np.full(g[0].shape[1], r, dtype=np.int64) for r, g in enumerate(gathered)])
            index = self.writer.add_step(all_ids, all_w, origin, phase, kv_len=kv_len)
            for r, g in enumerate(gathered):
                if g[2] is None:
                    continue
                for layer in range(self.spec.num_layers):
                    self.writer.add_timing(index, layer, r, g[2][layer].tolist(), g[4][layer].tolist(),
                                           g[3][layer].tolist())
            self.writer.flush()
            self._write_doc()

    def _note_step(self, step: int, phase: str, tokens: int, wall: float, extra: dict[str, Any]) -> None:
        self.doc["steps"].append({"step": step, "phase": phase, "tokens": tokens, "wall_s": wall,
                                  "tokens_per_s": tokens / wall if wall > 0 else None, "mapping": self.mapping_index,
                                  **extra})

    def note_warmup(self, seconds: float, info: dict[str, Any]) -> None:
        """Warm-up (kernel compiles, graph capture) before step 0: kept out of every recorded step."""
        self.doc["warmup_s"] = seconds
        self.doc["execution"] = info
        if self.rank == 0:
            self._write_doc()

    def close(self, status: str = "done") -> dict[str, Any]:
        steps = self.doc["steps"]
        wall = sum(s["wall_s"] for s in steps)
        decode = [s for s in steps if s["phase"] == "decode"]
        self.doc["summary"] = {
            "steps": len(steps), "tokens": sum(s["tokens"] for s in steps), "wall_s": wall,
            "tokens_per_s": sum(s["tokens"] for s in steps) / wall if wall else None,
            "decode_tokens_per_s": (sum(s["tokens"] for s in decode) / sum(s["wall_s"] for s in decode)
                                    if decode else None)}
        self.doc["status"] = status
        if self.rank == 0:
            if self.writer is not None:
                self.writer.close()
            self._write_doc()
        return self.doc

    def _write_doc(self) -> None:
        if self.out is not None:
            write_json(self.out / "run.json", self.doc)


def _launcher_pid() -> int | None:
    """The ``moesim run`` process this run belongs to (so a later start can tell a killed run from a live one)."""
    text = os.environ.get("MOESIM_LAUNCHER_PID", "")
    return int(text) if text.isdigit() else None
