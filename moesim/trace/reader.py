"""Memory-mapped trace reader: scans chunk headers, hands out zero-copy views of steps and chunks."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import mmap
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import MoesimError, TraceError
from moesim.io import check_file
from moesim.models import ModelSpec
from moesim.trace import format as fmt
from moesim.trace.scan import MAX_COUNT, check_header, scan


@dataclass
class Step:
    """One step of a trace. Token traces fill ids (and weights/origin); load-only traces fill counts."""

    index: int
    phase: str | None
    ids: np.ndarray | None = None  # [L, T, k]
    weights: np.ndarray | None = None  # [L, T, k]
    origin: np.ndarray | None = None  # [T]
    counts: np.ndarray | None = None  # [L, E]
    num_tokens: int = 0


@dataclass
class Chunk:
    """Consecutive steps as whole arrays, for vectorised consumers (the analytic engine)."""

    first_step: int
    step_tokens: np.ndarray  # [S] (token traces) — tokens per step
    phase: np.ndarray  # [S] uint8
    ids: np.ndarray | None  # [L, T, k]
    weights: np.ndarray | None
    origin: np.ndarray | None  # [T]
    counts: np.ndarray | None  # [S, L, E] (load-only traces)
    arrays: dict[str, np.ndarray]

    @property
    def kv_len(self) -> np.ndarray | None:
        """[S] KV positions each token attends to (NaN where unknown); None when the chunk has none."""
        return self.arrays.get("kv_len")

    @property
    def num_steps(self) -> int:
        return len(self.phase)

    @property
    def step_offsets(self) -> np.ndarray:
        """[S+1] token offsets of each step inside ``ids``."""
        return np.concatenate([[0], np.cumsum(self.step_tokens)])


@dataclass
class Timings:
    """All timing records of a trace, concatenated. ``phases`` columns follow ``phase_names``."""

    phase_names: tuple[str, ...]
    index: np.ndarray  # [N, 3] step, layer, rank
    phases: np.ndarray  # [N, P] seconds
    experts: np.ndarray  # [N, W] logical expert per local slot, -1 padding
    tokens: np.ndarray  # [N, W]

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def in_steps(self, start: int, stop: int) -> Timings:
        """The records of steps ``start <= step < stop`` (fit on one window of a run, predict another)."""
        keep = (self.index[:, 0] >= start) & (self.index[:, 0] < stop)
        return Timings(self.phase_names, self.index[keep], self.phases[keep], self.experts[keep], self.tokens[keep])

    def phase(self, name: str) -> np.ndarray:
        try:
            return self.phases[:, self.phase_names.index(name)]
        except ValueError:
            raise MoesimError(f"trace timings have no phase {name!r} (they have {', '.join(self.phase_names)})") \
                from None


class Trace:
    """A trace file opened for reading. Use :meth:`open`; close it (or use ``with``) when done."""

    def __init__(self, path: Path, mm: mmap.mmap | None, header: dict[str, Any], chunks: list[dict[str, Any]],
                 end_offset: int, truncated: str | None) -> None:
        self.path = path
        self._mm = mm
        self.header = header
        self._chunks = chunks
        self.end_offset = end_offset
        self.truncated = truncated
        self.model = ModelSpec.from_dict(header["model"])
        self.kind: str = header["kind"]
        self.num_steps = sum(c["num_steps"] for c in chunks)
        self.phase_names = tuple(header.get("timing_phases") or ())

    # -- opening ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, require_steps: bool = True, allow_truncated: bool = False) -> Trace:
        """Open and check a trace. A file cut short, with trailing bytes or with a gap in its steps is refused
        unless ``allow_truncated`` (then the complete chunks before the damage are read and :attr:`truncated`
        says what was cut: a run killed mid-write, or a trace still being written)."""
        path = Path(path)
        try:
            check_file(path, "trace")
        except MoesimError as exc:
            raise TraceError(str(exc)) from None
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < fmt.FILE_HEAD.size:
                raise TraceError(f"{path} is not a moesim trace (too short: {size} bytes)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        magic, version, hlen = fmt.FILE_HEAD.unpack_from(mm, 0)
        if magic != fmt.MAGIC:
            mm.close()
            raise TraceError(f"{path} is not a moesim trace (bad magic bytes)")
        if version > fmt.VERSION or version < 1:
            mm.close()
            raise TraceError(f"{path} has trace format version {version}; this moesim reads versions 1..{fmt.VERSION}")
        start = fmt.FILE_HEAD.size
        if start + hlen > size:
            mm.close()
            raise TraceError(f"{path} is truncated inside its header")
        try:
            header = json.loads(bytes(mm[start:start + hlen]))
            check_header(header)
            if header.get("version") != version:
                raise MoesimError(f"its version {header.get('version')!r} differs from the file's {version}")
        except (ValueError, MoesimError) as exc:
            mm.close()
            raise TraceError(f"{path} has a malformed header: {exc}") from None
        offset = start + hlen + fmt.pad(start + hlen)
        chunks, end, truncated = scan(mm, offset, size, header)
        if truncated and not allow_truncated and not (require_steps and not any(c["num_steps"] for c in chunks)):
            mm.close()
            raise TraceError(f"trace {path} is damaged: {truncated}; pass --allow-truncated to use the complete "
                             "part (`moesim trace validate` lists every problem)")
        trace = cls(path, mm, header, chunks, end, truncated)
        if require_steps and trace.num_steps == 0:
            trace.close()
            why = f" ({truncated})" if truncated else ""
            raise TraceError(f"trace {path} holds no complete step{why}")
        return trace

    def close(self) -> None:
        if self._mm is not None:
            # arrays handed out may still view the map; then it closes when the last of them goes
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- properties ---------------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return len(self._chunks)

    @property
    def num_tokens(self) -> int:
        """Tokens over all steps (token traces), or token-choices / top_k (load-only traces)."""
        total = 0
        for c in self._chunks:
            if not c["num_steps"]:  # a chunk of timing records only
                continue
            if self.kind == "tokens":
                total += int(self._array(c, "step_tokens").sum())
            else:
                total += int(self._array(c, "counts")[:, 0, :].sum()) // self.model.top_k
        return total

    @property
    def has_weights(self) -> bool:
        return self.header.get("weights_dtype") is not None

    @property
    def has_origin(self) -> bool:
        return bool(self.header.get("has_origin"))

    @property
    def num_ranks(self) -> int | None:
        return self.header.get("num_ranks")

    @property
    def meta(self) -> dict[str, Any]:
        return self.header.get("meta") or {}

    @property
    def nbytes(self) -> int:
        return self.end_offset

    # -- data access ----------------------------------------------------------------------------------
    def _array(self, chunk: dict[str, Any], name: str) -> np.ndarray:
        if self._mm is None:
            raise TraceError(f"trace {self.path} is closed")
        if not chunk.get("crc_ok"):
            self._verify(chunk)
        dtype, shape, off = chunk["arrays"][name]
        count = math.prod(shape)
        return np.frombuffer(self._mm, dtype=np.dtype(dtype), count=count,
                             offset=chunk["payload"] + off).reshape(shape)

    def _verify(self, chunk: dict[str, Any]) -> None:
        """Check a chunk's CRC32 the first time any of its arrays is used (one pass over its bytes, ~4 GB/s).

        Why on every read, not only in ``trace validate``: a flipped bit in the ids still lies in range and
        would otherwise feed a replay or a placement unnoticed.
        """
        assert self._mm is not None
        body = memoryview(self._mm)[chunk["dir_start"]:chunk["payload"] + chunk["payload_len"]]
        try:
            ok = zlib.crc32(body) == chunk["crc"]
        finally:
            body.release()
        if not ok:
            last = chunk["first_step"] + chunk["num_steps"] - 1
            steps = f"steps {chunk['first_step']}..{last}" if chunk["num_steps"] else "timing records"
            raise TraceError(f"trace {self.path}: the chunk at byte {chunk['dir_start'] - fmt.CHUNK_HEAD.size} "
                             f"({steps}) fails its checksum; the file is corrupt")
        chunk["crc_ok"] = True

    def _get(self, chunk: dict[str, Any], name: str) -> np.ndarray | None:
        return self._array(chunk, name) if name in chunk["arrays"] else None

    def chunks(self) -> Iterator[Chunk]:
        """Every chunk holding steps, in order, as zero-copy views."""
        return self._chunks_in(0, self.num_steps)

    def _chunks_in(self, start: int, stop: int) -> Iterator[Chunk]:
        """The chunks holding any of steps ``start .. stop-1``; each one's ids are range-checked on first use."""
        for i, c in enumerate(self._chunks):
            if c["num_steps"] == 0 or c["first_step"] + c["num_steps"] <= start:
                continue
            if c["first_step"] >= stop:
                break
            arrays = {name: self._array(c, name) for name in c["arrays"]}
            if not c.get("checked"):
                self._check_values(i, c, arrays)
                c["checked"] = True
            counts = arrays.get("counts")
            step_tokens = arrays.get("step_tokens")
            if step_tokens is None:
                assert counts is not None
                step_tokens = counts[:, 0, :].sum(axis=1) // self.model.top_k
            yield Chunk(c["first_step"], step_tokens, arrays["phase"], arrays.get("ids"), arrays.get("weights"),
                        arrays.get("origin"), counts, arrays)

    def _check_values(self, i: int, c: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Refuse ids, origins or counts no consumer could index with (a corrupt or foreign file), in one line.

        Shapes were checked when the file was opened; values are checked here, once per chunk, because it
        needs a pass over the data (a max over uint16 ids is far cheaper than any use of them).
        """
        where = f"trace {self.path}: chunk {i} (steps {c['first_step']}..{c['first_step'] + c['num_steps'] - 1})"
        hint = "; the file is corrupt (`moesim trace validate` lists every problem)"
        ids = arrays.get("ids")
        if ids is not None and ids.size:
            lo, hi = int(ids.min()) if ids.dtype.kind == "i" else 0, int(ids.max())
            if lo < 0 or hi >= self.model.num_experts:
                bad = hi if hi >= self.model.num_experts else lo
                raise TraceError(f"{where} holds expert id {bad}, out of range [0, {self.model.num_experts}){hint}")
        origin = arrays.get("origin")
        if origin is not None and origin.size and self.num_ranks is not None and \
                (int(origin.max()) >= self.num_ranks or (origin.dtype.kind == "i" and int(origin.min()) < 0)):
            raise TraceError(f"{where} holds an origin rank out of range [0, {self.num_ranks}){hint}")
        counts = arrays.get("counts")
        if counts is not None and counts.size and int(counts.min()) < 0:
            raise TraceError(f"{where} holds a negative load count{hint}")
        if counts is not None and counts.size and int(counts.max()) > MAX_COUNT:
            raise TraceError(f"{where} holds the load count {int(counts.max())}, above {MAX_COUNT}{hint}")
        kv = arrays.get("kv_len")
        if kv is not None and kv.size and (np.isinf(kv).any() or np.nanmin(kv, initial=0.0) < 0):
            raise TraceError(f"{where} holds a negative or infinite kv_len{hint}")

    def steps(self, start: int = 0, stop: int | None = None) -> Iterator[Step]:
        """Steps ``start .. stop-1`` one at a time, without loading the whole trace."""
        stop = self.num_steps if stop is None else min(stop, self.num_steps)
        for chunk in self._chunks_in(start, stop):
            first, n = chunk.first_step, chunk.num_steps
            offsets = chunk.step_offsets
            for j in range(max(0, start - first), min(n, stop - first)):
                phase = fmt.PHASE_NAMES.get(int(chunk.phase[j]))
                if chunk.counts is not None:
                    yield Step(first + j, phase, counts=chunk.counts[j], num_tokens=int(chunk.step_tokens[j]))
                    continue
                sl = slice(int(offsets[j]), int(offsets[j + 1]))
                assert chunk.ids is not None
                yield Step(first + j, phase, ids=chunk.ids[:, sl],
                           weights=None if chunk.weights is None else chunk.weights[:, sl],
                           origin=None if chunk.origin is None else chunk.origin[sl], num_tokens=sl.stop - sl.start)

    def step(self, index: int) -> Step:
        if not 0 <= index < self.num_steps:
            raise MoesimError(f"step {index} is outside the trace's {self.num_steps} steps")
        return next(self.steps(index, index + 1))

    def load(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """[steps, layers, experts] int64: token-choices per expert, per layer, per step."""
        stop = self.num_steps if stop is None else min(stop, self.num_steps)
        L, E = self.model.num_layers, self.model.num_experts
        out = np.zeros((max(stop - start, 0), L, E), dtype=np.int64)
        for chunk in self._chunks_in(start, stop):
            first, n = chunk.first_step, chunk.num_steps
            lo, hi = max(start, first), min(stop, first + n)
            if lo >= hi:
                continue
            if chunk.counts is not None:
                out[lo - start:hi - start] = chunk.counts[lo - first:hi - first]
                continue
            assert chunk.ids is not None
            _bincount_steps(chunk.ids, chunk.step_tokens, chunk.step_offsets, lo - first, hi - first, E,
                            out[lo - start:hi - start])
        return out

    def kv_len(self, start: int = 0, stop: int | None = None) -> np.ndarray | None:
        """[S] KV-cache positions each token of steps ``start .. stop-1`` attends to (NaN where unknown), or None
        when the trace records none (the cost model then assumes its fixed context length)."""
        stop = self.num_steps if stop is None else min(stop, self.num_steps)
        out = np.full(max(stop - start, 0), np.nan)
        found = False
        for chunk in self._chunks_in(start, stop):
            if chunk.kv_len is None:
                continue
            lo, hi = max(start, chunk.first_step), min(stop, chunk.first_step + chunk.num_steps)
            out[lo - start:hi - start] = chunk.kv_len[lo - chunk.first_step:hi - chunk.first_step]
            found = True
        return out if found else None

    def timings(self) -> Timings:
        """Every timing record in the trace (empty arrays when none were recorded)."""
        parts = [(self._get(c, "timing_index"), self._get(c, "timing_phases"), self._get(c, "timing_experts"),
                  self._get(c, "timing_tokens")) for c in self._chunks if "timing_index" in c["arrays"]]
        P = len(self.phase_names)
        if not parts:
            return Timings(self.phase_names, np.zeros((0, 3), np.int32), np.zeros((0, P)), np.zeros((0, 0), np.int32),
                           np.zeros((0, 0), np.int32))
        width = max(p[2].shape[1] for p in parts)

        def widen(a: np.ndarray, fill: int) -> np.ndarray:
            return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill)

        return Timings(self.phase_names, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                       np.concatenate([widen(p[2], -1) for p in parts]),
                       np.concatenate([widen(p[3], 0) for p in parts]))

    # -- checking -------------------------------------------------------------------------------------
    def validate(self) -> list[str]:
        """Check checksums and contents of every chunk; return the problems found (empty when sound)."""
        problems = []
        if self.truncated:
            problems.append(self.truncated)
        m = self.model
        for i, c in enumerate(self._chunks):
            assert self._mm is not None
            try:
                self._verify(c)
            except TraceError:
                problems.append(f"chunk {i} (steps {c['first_step']}..) fails its checksum")
                continue
            arrays = {name: self._array(c, name) for name in c["arrays"]}
            n = c["num_steps"]
            if "ids" in arrays:
                ids = arrays["ids"]
                T = int(arrays["step_tokens"].sum())
                if ids.shape != (m.num_layers, T, m.top_k):
                    problems.append(f"chunk {i}: ids shape {list(ids.shape)} != [{m.num_layers}, {T}, {m.top_k}]")
                elif ids.size and (int(ids.max()) >= m.num_experts or int(ids.min()) < 0):
                    bad = int(ids.max()) if int(ids.max()) >= m.num_experts else int(ids.min())
                    problems.append(f"chunk {i}: expert id {bad} out of range [0, {m.num_experts})")
                for name in ("weights",):
                    if name in arrays and arrays[name].shape != ids.shape:
                        problems.append(f"chunk {i}: {name} shape differs from ids")
                if "origin" in arrays:
                    o = arrays["origin"]
                    if o.shape != (T,):
                        problems.append(f"chunk {i}: origin has {o.shape[0]} entries for {T} tokens")
                    elif self.num_ranks is not None and o.size and int(o.max()) >= self.num_ranks:
                        problems.append(f"chunk {i}: origin rank {int(o.max())} >= num_ranks {self.num_ranks}")
                if "weights" in arrays:
                    w = arrays["weights"]
                    if not np.all(np.isfinite(w)):
                        problems.append(f"chunk {i}: router weights include NaN or inf")
            if "counts" in arrays:
                counts = arrays["counts"]
                if counts.shape != (n, m.num_layers, m.num_experts):
                    problems.append(f"chunk {i}: counts shape {list(counts.shape)} != "
                                    f"[{n}, {m.num_layers}, {m.num_experts}]")
                elif counts.size and (int(counts.min()) < 0 or int(counts.max()) > MAX_COUNT):
                    problems.append(f"chunk {i}: a load count outside [0, {MAX_COUNT}]")
            if "kv_len" in arrays:
                kv = arrays["kv_len"]
                if kv.size and (np.isinf(kv).any() or np.nanmin(kv, initial=0.0) < 0):
                    problems.append(f"chunk {i}: negative or infinite kv_len")
            if "timing_index" in arrays:
                idx = arrays["timing_index"]
                if arrays["timing_phases"].shape != (idx.shape[0], len(self.phase_names)):
                    problems.append(f"chunk {i}: timing phases do not match the header's {len(self.phase_names)}")
                elif idx.size and (idx[:, 1].max() >= m.num_layers or idx.min() < 0):
                    problems.append(f"chunk {i}: timing record names a layer or step out of range")
                elif not np.all(np.isfinite(arrays["timing_phases"])) or arrays["timing_phases"].min() < 0:
                    problems.append(f"chunk {i}: timing phases include negative, NaN or inf seconds")
        return problems


def add_allow_truncated(parser: argparse.ArgumentParser) -> None:
    """The one flag every command that reads a trace takes."""
    parser.add_argument("--allow-truncated", action="store_true",
                        help="use the complete part of a trace that is cut short, has trailing bytes or a gap in its "
                             "steps (a warning says what was cut; replay records it in report.json)")


def open_trace(path: str | Path, args: argparse.Namespace | None = None, *, require_steps: bool = True) -> Trace:
    """Open a trace for a command: damage refused unless ``args.allow_truncated``, and then warned about."""
    allow = bool(getattr(args, "allow_truncated", False))
    trace = Trace.open(path, require_steps=require_steps, allow_truncated=allow)
    if trace.truncated:
        print(f"moesim: warning: trace {path} is damaged ({trace.truncated}); using its {trace.num_steps} "
              "complete steps", file=sys.stderr)
    return trace


LOAD_BINS = 1 << 16  # bins of one bincount in load(): the counts stay in the CPU cache (measured 3-6x faster)


def _bincount_steps(ids: np.ndarray, step_tokens: np.ndarray, offsets: np.ndarray, a: int, b: int, E: int,
                    out: np.ndarray) -> None:
    """Add token-choices per (step, layer, expert) of steps a..b-1 of one chunk into ``out`` [b-a, L, E].

    Why this shape: one bincount per layer over a group of steps whose [steps, E] counts fit in cache; a big
    step is counted straight from its uint16 ids, small (decode) steps share a bincount keyed by step.
    """
    L = ids.shape[0]
    group = max(1, LOAD_BINS // E)
    j = a
    while j < b:
        # a group: one step, or consecutive steps of at most `group` steps
        g = 1 if int(step_tokens[j]) * ids.shape[2] >= max(2048, E) else min(group, b - j)
        t0, t1 = int(offsets[j]), int(offsets[j + g])
        if t1 > t0:
            if g == 1:
                for layer in range(L):
                    out[j - a, layer] += np.bincount(ids[layer, t0:t1].ravel(), minlength=E)
            else:
                base = np.repeat(np.arange(g, dtype=np.int64) * E, np.asarray(step_tokens[j:j + g]) * ids.shape[2])
                for layer in range(L):
                    counts = np.bincount(base + ids[layer, t0:t1].ravel(), minlength=g * E)
                    out[j - a:j - a + g, layer] += counts.reshape(g, E)
        j += g
