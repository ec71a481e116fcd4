"""Streaming trace writer: buffers steps, appends each chunk with one sequential write."""

from __future__ import annotations

import json
import math
import mmap
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import TraceError
from moesim.io import remove_stale_temporaries
from moesim.models import ModelSpec
from moesim.trace import format as fmt

DEFAULT_CHUNK_BYTES = 32 << 20


class TraceWriter:
    """Append routing steps (or load counts) and timing records to a trace file.

    ``atomic=True`` writes to a temporary file renamed into place on :meth:`close` (for whole-trace outputs
    such as ``moesim trace synth``); otherwise chunks land in ``path`` as they are flushed, so a recorder
    that is killed leaves every flushed chunk readable. ``append=True`` continues an existing trace,
    dropping a partial chunk at its end.
    """

    def __init__(self, path: str | Path, model: ModelSpec, *, kind: str = "tokens", weights: bool = False,
                 weights_dtype: str = "float16", origin: bool = False, num_ranks: int | None = None,
                 timing_phases: Sequence[str] = fmt.DEFAULT_TIMING_PHASES, meta: dict[str, Any] | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, fsync: bool = False, atomic: bool = False,
                 append: bool = False) -> None:
        if kind not in fmt.KINDS:
            raise TraceError(f"trace kind must be one of {fmt.KINDS}, got {kind!r}")
        self.path = Path(path)
        self.model = model
        self.kind = kind
        self.weights_dtype = np.dtype(weights_dtype).newbyteorder("<") if weights else None
        if weights and self.weights_dtype.str not in fmt.ARRAY_DTYPES["weights"]:
            raise TraceError(f"weights_dtype must be float16 or float32, got {weights_dtype!r}")
        self.origin = origin
        self.num_ranks = num_ranks
        self.ids_dtype = fmt.id_dtype(model.num_experts)
        self.origin_dtype = fmt.origin_dtype(num_ranks)
        self.timing_phases = tuple(timing_phases)
        self.chunk_bytes = chunk_bytes
        self.fsync = fsync
        self._steps: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int]] = []
        self._timings: list[tuple[tuple[int, int, int], np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self._closed = False
        self._reserved: _Reserved | None = None
        self.header = {"format": "moesim.trace", "version": fmt.VERSION, "kind": kind, "model": model.to_dict(),
                       "ids_dtype": self.ids_dtype.str,
                       "weights_dtype": None if self.weights_dtype is None else self.weights_dtype.str,
                       "has_origin": origin, "num_ranks": num_ranks, "timing_phases": list(self.timing_phases),
                       "meta": meta or {}}
        if atomic and append:
            raise TraceError("a trace cannot be both atomic and appended to")
        self._final = self.path
        if atomic:
            if not self.path.parent.is_dir():
                raise TraceError(f"cannot write {self.path}: directory {self.path.parent} does not exist")
            remove_stale_temporaries(self.path.parent, self.path.name)  # left by a killed writer of this file
            self.path = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        if append and self._final.exists():
            self._open_for_append()
        else:
            self._create()

    # -- file set-up ------------------------------------------------------------------------------
    def _create(self) -> None:
        body = json.dumps(self.header, separators=(",", ":")).encode()
        head = fmt.FILE_HEAD.pack(fmt.MAGIC, fmt.VERSION, len(body))
        try:
            self._file = open(self.path, "w+b")  # noqa: SIM115 - closed in close(); readable for reserve_step
        except OSError as exc:
            raise TraceError(f"cannot write trace {self.path}: {exc.strerror}") from None
        self._file.write(head + body + b"\0" * fmt.pad(len(head) + len(body)))
        self._file.flush()
        self.next_step = 0

    def _open_for_append(self) -> None:
        from moesim.trace.reader import Trace

        existing = Trace.open(self.path, require_steps=False, allow_truncated=True)
        if existing.model != self.model or existing.kind != self.kind:
            existing.close()
            raise TraceError(f"cannot append to {self.path}: it records {existing.kind} of model "
                             f"{existing.model.name!r}, not {self.kind} of {self.model.name!r}")
        # chunks must carry the arrays the header announces, in the header's dtypes
        for key in ("ids_dtype", "weights_dtype", "has_origin", "num_ranks", "timing_phases"):
            if existing.header.get(key) != self.header[key]:
                existing.close()
                raise TraceError(f"cannot append to {self.path}: its {key} is {existing.header.get(key)!r}, "
                                 f"this writer's is {self.header[key]!r}")
        self.header = existing.header
        self.next_step = existing.num_steps
        end = existing.end_offset
        existing.close()
        self._file = open(self.path, "r+b")  # noqa: SIM115 - closed in close()
        self._file.truncate(end)
        self._file.seek(end)

    # -- adding data --------------------------------------------------------------------------------
    def add_step(self, ids: np.ndarray, weights: np.ndarray | None = None, origin: np.ndarray | None = None,
                 phase: str | None = None, kv_len: float | None = None, handed_over: bool = False) -> int:
        """Buffer one step: ids [layers, tokens, top_k]; returns the step's index in the trace.

        ``kv_len``: KV-cache positions each of the step's tokens attends to (mean), when known. ``handed_over``:
        the caller will not touch the arrays again, so ids already in the trace's dtype are buffered as they are
        (a synthetic step is ~1 GB; otherwise they are copied, as a caller may reuse its buffers)."""
        if self.kind != "tokens":
            raise TraceError("this trace holds load counts; use add_counts")
        m = self.model
        ids = np.asarray(ids)
        if ids.ndim != 3 or ids.shape[0] != m.num_layers or ids.shape[2] != m.top_k:
            raise TraceError(f"step ids must have shape [{m.num_layers}, tokens, {m.top_k}], got {list(ids.shape)}")
        if ids.size and (ids.min() < 0 or ids.max() >= m.num_experts):
            raise TraceError(f"expert id out of range [0, {m.num_experts}) in step {self.next_step}")
        T = ids.shape[1]
        w = None
        if self.weights_dtype is not None:
            if weights is None:
                raise TraceError("this trace records router weights; pass weights")
            w = np.asarray(weights, dtype=self.weights_dtype)
            if w.shape != ids.shape:
                raise TraceError(f"weights shape {list(w.shape)} differs from ids shape {list(ids.shape)}")
        o = None
        if self.origin:
            if origin is None:
                raise TraceError("this trace records origin ranks; pass origin")
            o = np.asarray(origin)
            if o.shape != (T,):
                raise TraceError(f"origin must have shape [{T}], got {list(o.shape)}")
            if T and (o.min() < 0 or (self.num_ranks is not None and o.max() >= self.num_ranks)):
                raise TraceError(f"origin rank out of range [0, {self.num_ranks}) in step {self.next_step}")
            o = o.astype(self.origin_dtype)
        if self._reserved is not None:  # filled in place: its chunk ends with it
            self._add_reserved(ids, w, o, fmt.PHASES.get(phase, 255), _kv_len(kv_len))
            self._buffered = self.chunk_bytes
            return self._advance()
        self._steps.append((ids.astype(self.ids_dtype, copy=not handed_over), w, o, fmt.PHASES.get(phase, 255),
                            _kv_len(kv_len)))
        self._buffered += ids.size * self.ids_dtype.itemsize * (2 if w is not None else 1)
        return self._advance()

    def reserve_step(self, tokens: int, phase: str | None = None, kv_len: float | None = None,
                     ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Room for the next step inside the file: (ids, weights or None) [layers, tokens, top_k] views of the
        chunk it will end, memory-mapped, for the caller to fill and then pass to :meth:`add_step` (with the same
        phase and kv_len) before anything else. None where the step is better buffered as usual: a streaming
        writer (a mapped chunk is not complete until the step is), or a step that would not close its chunk.

        Why: a generator filling a ~1 GB step straight into the file's pages saves the copy ``write`` makes
        (seconds for a large synthetic step); the bytes written are the ones :meth:`add_step` would write."""
        if self._reserved is not None:
            raise TraceError("reserve_step: the step reserved before has not been added yet")
        m = self.model
        step_bytes = m.num_layers * tokens * m.top_k * self.ids_dtype.itemsize * (2 if self.weights_dtype else 1)
        if (self.path == self._final or self.kind != "tokens" or self._timings or tokens < 1
                or self._buffered + step_bytes < self.chunk_bytes):
            return None
        prior = self._steps
        T0 = sum(s[0].shape[1] for s in prior)
        T = T0 + tokens
        heads = _step_heads([s[3] for s in prior] + [fmt.PHASES.get(phase, 255)],
                            [s[4] for s in prior] + [_kv_len(kv_len)])
        heads["step_tokens"] = np.array([s[0].shape[1] for s in prior] + [tokens], dtype="<i8")
        specs = {name: (a.dtype, a.shape) for name, a in heads.items()}
        shape = (m.num_layers, T, m.top_k)
        specs["ids"] = (self.ids_dtype, shape)
        if self.weights_dtype is not None:
            specs["weights"] = (self.weights_dtype, shape)
        if self.origin:
            specs["origin"] = (self.origin_dtype, (T,))
        self._file.flush()
        start = self._file.tell()
        first = self.next_step - len(prior)
        directory, offsets, payload = _layout(first, len(prior) + 1, specs, start)
        data_start = start + fmt.CHUNK_HEAD.size + len(directory)
        end = data_start + payload
        fd = self._file.fileno()
        try:  # blocks allocated now: a full disk is an error here, not a SIGBUS when a page is filled
            os.posix_fallocate(fd, start, end - start)
        except OSError as exc:
            os.ftruncate(fd, start)
            raise TraceError(f"cannot write trace {self.path}: {exc.strerror}") from None
        base = start - start % mmap.ALLOCATIONGRANULARITY
        buf = np.frombuffer(mmap.mmap(fd, end - base, offset=base), dtype=np.uint8)
        payload_view = buf[data_start - base:]

        def array(name: str) -> np.ndarray:
            dtype, shp = specs[name]
            n = dtype.itemsize * math.prod(shp)
            return payload_view[offsets[name]:offsets[name] + n].view(dtype).reshape(shp)

        buf[data_start - base - len(directory):data_start - base] = np.frombuffer(directory, dtype=np.uint8)
        for name, a in heads.items():
            array(name)[...] = a
        arrays = {name: array(name) for name in ("ids", "weights", "origin") if name in specs}
        for i, name in enumerate(("ids", "weights", "origin")):  # the buffered steps go first in the chunk
            if name in arrays:
                t = 0
                for s in prior:
                    part = s[0] if i == 0 else s[i]
                    if name == "origin":
                        arrays[name][t:t + len(part)] = part
                    else:
                        arrays[name][:, t:t + part.shape[1]] = part
                    t += s[0].shape[1]
        self._reserved = _Reserved(start, directory, buf[data_start - base - len(directory):], end, arrays, T0,
                                   fmt.PHASES.get(phase, 255), _kv_len(kv_len))
        w = arrays.get("weights")
        return arrays["ids"][:, T0:], None if w is None else w[:, T0:]

    def _add_reserved(self, ids: np.ndarray, weights: np.ndarray | None, origin: np.ndarray | None, phase: int,
                      kv_len: float) -> None:
        """add_step of the reserved step: checks that it is the reserved one, places its origin ranks."""
        r = self._reserved
        assert r is not None
        if not (_same_view(ids, r.arrays["ids"][:, r.first_token:]) and phase == r.phase
                and (kv_len == r.kv_len or (math.isnan(kv_len) and math.isnan(r.kv_len)))):
            raise TraceError("add_step: a step was reserved with reserve_step; add it (same phase and kv_len) first")
        w = r.arrays.get("weights")
        if w is not None and not _same_view(weights, w[:, r.first_token:]):
            w[:, r.first_token:] = weights
        if origin is not None:
            r.arrays["origin"][r.first_token:] = origin
        r.added = True

    def _finish_reserved(self) -> None:
        """Seal the reserved chunk: checksum over its directory and payload, then its head (the file is a
        temporary until close renames it, so its head is written last)."""
        r = self._reserved
        assert r is not None
        crc = zlib.crc32(r.body)
        payload = r.end - r.start - fmt.CHUNK_HEAD.size - len(r.directory)
        os.pwrite(self._file.fileno(), fmt.CHUNK_HEAD.pack(fmt.CHUNK_MAGIC, len(r.directory), payload, crc, 0),
                  r.start)
        self._file.seek(r.end)
        if self.fsync:
            os.fsync(self._file.fileno())
        self._reserved = None
        self._steps.clear()
        self._buffered = 0

    def add_counts(self, counts: np.ndarray, phase: str | None = None, kv_len: float | None = None) -> int:
        """Buffer one step of a load-only trace: counts [layers, experts] of token-choices per expert."""
        if self.kind != "counts":
            raise TraceError("this trace holds per-token ids; use add_step")
        m = self.model
        c = np.asarray(counts)
        if c.shape != (m.num_layers, m.num_experts):
            raise TraceError(f"counts must have shape [{m.num_layers}, {m.num_experts}], got {list(c.shape)}")
        if c.size and c.min() < 0:
            raise TraceError(f"negative count in step {self.next_step}")
        self._steps.append((c.astype("<i8"), None, None, fmt.PHASES.get(phase, 255), _kv_len(kv_len)))
        self._buffered += c.nbytes
        return self._advance()

    def add_timing(self, step: int, layer: int, rank: int, phases: Sequence[float],
                   experts: Sequence[int] = (), tokens: Sequence[int] = ()) -> None:
        """Buffer one timing record: seconds per phase (header order) and tokens per local expert slot."""
        if len(phases) != len(self.timing_phases):
            raise TraceError(f"timing needs {len(self.timing_phases)} phases {self.timing_phases}, got {len(phases)}")
        if len(experts) != len(tokens):
            raise TraceError("timing experts and tokens differ in length")
        self._timings.append(((step, layer, rank), np.asarray(phases, "<f8"), np.asarray(experts, "<i4"),
                              np.asarray(tokens, "<i4")))
        self._buffered += 64

    def _advance(self) -> int:
        index = self.next_step
        self.next_step += 1
        if self._buffered >= self.chunk_bytes:
            self.flush()
        return index

    # -- writing ------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write everything buffered as one chunk (nothing if the buffer is empty)."""
        if self._reserved is not None:
            if self._reserved.added:
                self._finish_reserved()
            return  # the reserved step is still being filled: its chunk ends with it
        if not self._steps and not self._timings:
            return
        arrays: dict[str, np.ndarray] = {}
        n_steps = len(self._steps)
        if n_steps:
            arrays.update(_step_heads([s[3] for s in self._steps], [s[4] for s in self._steps]))
            if self.kind == "counts":
                arrays["counts"] = np.stack([s[0] for s in self._steps])
            else:
                arrays["step_tokens"] = np.array([s[0].shape[1] for s in self._steps], dtype="<i8")
                arrays["ids"] = _join([s[0] for s in self._steps], axis=1)
                if self.weights_dtype is not None:
                    arrays["weights"] = _join([s[1] for s in self._steps], axis=1)
                if self.origin:
                    arrays["origin"] = _join([s[2] for s in self._steps], axis=0)
        if self._timings:
            width = max(len(t[2]) for t in self._timings)
            n = len(self._timings)
            arrays["timing_index"] = np.array([t[0] for t in self._timings], dtype="<i4").reshape(n, 3)
            arrays["timing_phases"] = np.stack([t[1] for t in self._timings])
            experts = np.full((n, width), -1, dtype="<i4")
            tokens = np.zeros((n, width), dtype="<i4")
            for i, t in enumerate(self._timings):
                experts[i, :len(t[2])] = t[2]
                tokens[i, :len(t[3])] = t[3]
            arrays["timing_experts"] = experts
            arrays["timing_tokens"] = tokens
        self._write_chunk(self.next_step - n_steps, n_steps, arrays)
        self._steps.clear()
        self._timings.clear()
        self._buffered = 0

    def _write_chunk(self, first_step: int, n_steps: int, arrays: dict[str, np.ndarray]) -> None:
        start = self._file.tell()
        directory, _, payload = _layout(first_step, n_steps, {k: (a.dtype, a.shape) for k, a in arrays.items()},
                                        start)
        crc = zlib.crc32(directory)
        pieces = []
        for arr in arrays.values():
            data = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # also for empty arrays
            crc = zlib.crc32(data, crc)
            padding = b"\0" * fmt.pad(arr.nbytes)
            crc = zlib.crc32(padding, crc)
            pieces += [data, padding]
        self._file.write(fmt.CHUNK_HEAD.pack(fmt.CHUNK_MAGIC, len(directory), payload, crc, 0))
        self._file.write(directory)
        for piece in pieces:
            self._file.write(piece)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._closed:
            return
        if self._reserved is not None and not self._reserved.added:
            self.abort()
            raise TraceError(f"{self._final}: a step reserved with reserve_step was never added; trace not written")
        self.flush()
        self._file.close()
        self._closed = True
        if self.path != self._final:
            os.replace(self.path, self._final)

    def abort(self) -> None:
        """Drop an atomic trace that failed half-way; a streaming one keeps every step added so far."""
        if self._closed:
            return
        if self.path == self._final:
            self.flush()  # buffered steps are complete: keep them
        self._closed = True
        self._reserved = None  # its mapping goes with the last view the caller holds
        self._file.close()
        if self.path != self._final and self.path.exists():
            self.path.unlink()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class _Reserved:
    """A chunk mapped in the file for a step being filled in place (TraceWriter.reserve_step)."""

    start: int  # byte of the chunk head in the file
    directory: bytes
    body: np.ndarray  # directory + payload, mapped
    end: int  # byte after the payload
    arrays: dict[str, np.ndarray]  # ids, weights, origin of the whole chunk, mapped
    first_token: int  # the reserved step's first token in the chunk (after the buffered steps)
    phase: int
    kv_len: float
    added: bool = False


def _same_view(a: Any, b: np.ndarray) -> bool:
    """``a`` is the array ``b`` (the same memory, shape and strides), not a copy of it."""
    return (isinstance(a, np.ndarray) and a.shape == b.shape and a.strides == b.strides
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


def _step_heads(phases: list[int], kv_lens: list[float]) -> dict[str, np.ndarray]:
    """The per-step arrays that lead a chunk of steps: phase, and kv_len where any step knows it."""
    heads = {"phase": np.array(phases, dtype="|u1")}
    kv = np.array(kv_lens, dtype="<f4")
    if not np.isnan(kv).all():
        heads["kv_len"] = kv
    return heads


def _layout(first_step: int, n_steps: int, specs: dict[str, tuple[np.dtype, tuple[int, ...]]],
            start: int) -> tuple[bytes, dict[str, int], int]:
    """(padded directory, payload offset of each array, payload bytes) of a chunk written at byte ``start``."""
    offset = 0
    layout, offsets = {}, {}
    for name, (dtype, shape) in specs.items():
        layout[name] = [dtype.str, [int(n) for n in shape], offset]
        offsets[name] = offset
        nbytes = dtype.itemsize * math.prod(shape)
        offset += nbytes + fmt.pad(nbytes)
    directory = json.dumps({"first_step": first_step, "num_steps": n_steps, "arrays": layout},
                           separators=(",", ":")).encode()
    directory += b" " * fmt.pad(start + fmt.CHUNK_HEAD.size + len(directory))
    return directory, offsets, offset


def _join(parts: list[np.ndarray], axis: int) -> np.ndarray:
    """The steps' arrays of one chunk side by side; a chunk of one step (a large synthetic step: up to ~1 GB) is
    written as it is, without the copy a concatenation makes."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


def _kv_len(value: float | None) -> float:
    if value is None:
        return float("nan")
    v = float(value)
    if not (np.isfinite(v) and v >= 0):
        raise TraceError(f"kv_len must be a finite number >= 0, got {value!r}")
    return v
