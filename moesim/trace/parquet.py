"""Routing traces as Apache Parquet tables, so polars, DuckDB, pandas or Spark can open them.

Why: a ``.mtrace`` is read only through moesim; a Parquet file is one table any dataframe tool queries. The table
is long-form, one row per routing fact:

- token traces: one row per (step, layer, token): ``step`` int32, ``layer`` int32, ``token`` int32 (index in the
  step), ``expert_ids`` list<int32> (the top-k logical experts, in router order), ``weights`` list<float32> (null
  without router weights), ``origin`` int32 (null without origin ranks), ``phase`` string (prefill / decode /
  null), ``kv_len`` float32 (null where not recorded);
- load-only traces: one row per (step, layer, expert): ``step``, ``layer``, ``expert`` int32, ``count`` int64,
  ``phase``, ``kv_len``.

The schema's metadata key ``moesim`` holds JSON ``{"format": "moesim.parquet", "version": 1, "kind", "model",
"num_ranks", "has_weights", "has_origin", "meta", "steps": [{"tokens", "phase", "kv_len"}, ...]}``: it restores
what rows cannot say (the model shape, steps without tokens). A table written by another tool without it is read
with ``--model``; its steps are the distinct ``step`` values in order. Timing records stay in the ``.mtrace`` (not
exported). pyarrow is an optional dependency (``pip install 'moesim[parquet]'``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import TraceError
from moesim.io import atomic_path
from moesim.models import ModelSpec
from moesim.trace import format as fmt
from moesim.trace.reader import Trace
from moesim.trace.sources import Imported, TokenStep, check_path

FORMAT, VERSION = "moesim.parquet", 1
TOKEN_COLUMNS = ("step", "layer", "token", "expert_ids")
COUNT_COLUMNS = ("step", "layer", "expert", "count")


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise TraceError("Parquet needs pyarrow: pip install 'moesim[parquet]' (or pip install pyarrow)") from None
    return pa, pq


def _schema(pa: Any, kind: str) -> Any:
    common = [pa.field("step", pa.int32()), pa.field("layer", pa.int32())]
    tail = [pa.field("phase", pa.dictionary(pa.int8(), pa.string())), pa.field("kv_len", pa.float32())]
    if kind == "tokens":
        return pa.schema(common + [pa.field("token", pa.int32()), pa.field("expert_ids", pa.list_(pa.int32())),
                                   pa.field("weights", pa.list_(pa.float32())), pa.field("origin", pa.int32())] + tail)
    return pa.schema(common + [pa.field("expert", pa.int32()), pa.field("count", pa.int64())] + tail)


def export_parquet(trace: Trace, out: str | Path, start: int = 0, stop: int | None = None) -> dict[str, Any]:
    """Write steps ``start .. stop-1`` of ``trace`` to ``out`` atomically (one row group per step); returns
    {rows, steps}."""
    pa, pq = _pyarrow()
    stop = trace.num_steps if stop is None else stop
    m, kind = trace.model, trace.kind
    kv = trace.kv_len(start, stop)
    steps_meta = [{"tokens": int(s.num_tokens), "phase": s.phase,
                   "kv_len": None if kv is None or np.isnan(kv[i]) else float(kv[i])}
                  for i, s in enumerate(trace.steps(start, stop))]  # memory-mapped views: no ids are copied
    if not steps_meta:
        raise TraceError(f"steps {start}..{stop - 1} of {trace.path} are empty")
    head = {"format": FORMAT, "version": VERSION, "kind": kind, "model": m.to_dict(), "num_ranks": trace.num_ranks,
            "has_weights": trace.has_weights, "has_origin": trace.has_origin, "meta": trace.meta, "steps": steps_meta}
    schema = _schema(pa, kind).with_metadata({"moesim": json.dumps(head)})
    rows = 0
    with atomic_path(out) as tmp, pq.ParquetWriter(str(tmp), schema) as writer:
        for i, step in enumerate(trace.steps(start, stop)):
            table = _step_table(pa, schema, step, i, steps_meta[i]["kv_len"], m)
            rows += table.num_rows
            if table.num_rows:
                writer.write_table(table)
    return {"rows": rows, "steps": len(steps_meta)}


def _step_table(pa: Any, schema: Any, step: Any, index: int, kv: float | None, m: ModelSpec) -> Any:
    """One step's rows, layer-major: [L * T] (tokens) or [L * E] (counts)."""
    if step.ids is not None:
        L, T, k = step.ids.shape
        n = L * T
        ids = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * k),
                                       pa.array(step.ids.reshape(-1).astype(np.int32)))
        if step.weights is not None:
            weights = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * k),
                                               pa.array(step.weights.reshape(-1).astype(np.float32)))
        else:
            weights = pa.nulls(n, pa.list_(pa.float32()))
        origin = pa.nulls(n, pa.int32()) if step.origin is None else pa.array(np.tile(step.origin, L).astype(np.int32))
        cols = {"step": np.full(n, index, np.int32), "layer": np.repeat(np.arange(L, dtype=np.int32), T),
                "token": np.tile(np.arange(T, dtype=np.int32), L), "expert_ids": ids, "weights": weights,
                "origin": origin}
    else:
        L, E = step.counts.shape
        n = L * E
        cols = {"step": np.full(n, index, np.int32), "layer": np.repeat(np.arange(L, dtype=np.int32), E),
                "expert": np.tile(np.arange(E, dtype=np.int32), L), "count": step.counts.reshape(-1).astype(np.int64)}
    cols["phase"] = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8) if step.phase else
                                                            pa.nulls(n, pa.int8())), pa.array([step.phase or ""]))
    cols["kv_len"] = pa.nulls(n, pa.float32()) if kv is None else pa.array(np.full(n, kv, np.float32))
    return pa.table({f.name: cols[f.name] for f in schema}, schema=schema)


# -- reading ----------------------------------------------------------------------------------------------
def read_parquet(path: str | Path, model: ModelSpec | None = None) -> Imported:
    """A Parquet routing table (as :func:`export_parquet` writes, or any table with its columns) → Imported."""
    pa, pq = _pyarrow()
    path = check_path(Path(path), "Parquet trace")
    try:
        table = pq.read_table(str(path))
    except (pa.ArrowException, OSError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(f"{path} is not a readable Parquet file: {msg[:200]}") from None
    head = _head(table.schema.metadata, path)
    names = set(table.column_names)
    if head.get("kind") in (None, "tokens") and set(TOKEN_COLUMNS) <= names:
        kind = "tokens"
    elif head.get("kind") in (None, "counts") and set(COUNT_COLUMNS) <= names:
        kind = "counts"
    else:
        raise TraceError(f"{path.name} has columns {sorted(names)}: a routing table needs {', '.join(TOKEN_COLUMNS)} "
                         f"(token trace) or {', '.join(COUNT_COLUMNS)} (load-only trace)")
    if model is None:
        if "model" not in head:
            raise TraceError(f"{path.name} carries no moesim model metadata: pass --model")
        try:
            model = ModelSpec.from_dict(head["model"])
        except (TypeError, ValueError, KeyError) as exc:
            raise TraceError(f"{path.name}: the model in its moesim metadata is malformed: {exc}") from None
    col = {n: table.column(n) for n in names}
    step_ids = _ints(col["step"], "step", path)
    layer = _ints(col["layer"], "layer", path)
    if len(layer) and (layer.min() < 0 or layer.max() >= model.num_layers):
        raise TraceError(f"{path.name}: layer outside [0, {model.num_layers}) of model {model.name!r}")
    steps_meta = head.get("steps")
    order_ids = np.unique(step_ids)
    if isinstance(steps_meta, list):
        if len(order_ids) and (order_ids.min() < 0 or order_ids.max() >= len(steps_meta)):
            raise TraceError(f"{path.name}: step numbers outside the {len(steps_meta)} steps its metadata lists")
        order_ids = np.arange(len(steps_meta))
    phase = _phases(col.get("phase"), step_ids, order_ids, steps_meta, path)
    kv = _kv(col.get("kv_len"), step_ids, order_ids, steps_meta, path)
    meta = dict(head.get("meta") or {})
    meta.update({"source": f"parquet:{meta.get('source', 'table')}", "files": [str(path)]})
    if kind == "counts":
        counts = _counts(col, step_ids, layer, order_ids, model, path)
        return Imported(model, counts=counts, phases=phase, kv_len=kv, meta=meta)
    steps = _token_steps(col, step_ids, layer, order_ids, model, path)
    if not len(step_ids):  # no rows: whether weights and origins exist only the metadata says
        steps = [(ids, np.zeros(ids.shape, np.float32) if head.get("has_weights") else None,
                  np.zeros(0, np.int64) if head.get("has_origin") else None, None) for ids, _, _, _ in steps]
    steps = [(ids, w, o, ph) for (ids, w, o, _), ph in zip(steps, phase)]
    with_origin = bool(steps) and steps[0][2] is not None
    ranks = head.get("num_ranks")
    if with_origin and not isinstance(ranks, int):
        ranks = 1 + max((int(s[2].max()) for s in steps if s[2].size), default=0)
    return Imported(model, steps=steps, num_ranks=ranks if with_origin else None, kv_len=kv, meta=meta)


def _head(metadata: dict[bytes, bytes] | None, path: Path) -> dict[str, Any]:
    raw = (metadata or {}).get(b"moesim")
    if raw is None:
        return {}
    try:
        head = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TraceError(f"{path.name}: its moesim metadata is not JSON") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise TraceError(f"{path.name}: its moesim metadata is not {FORMAT!r}")
    if head.get("version") != VERSION:
        raise TraceError(f"{path.name}: {FORMAT} version {head.get('version')!r} is not supported (this moesim "
                         f"reads version {VERSION})")
    return head


def _ints(column: Any, name: str, path: Path) -> np.ndarray:
    if column.null_count:
        raise TraceError(f"{path.name}: column {name!r} holds nulls")
    arr = column.to_numpy()
    if arr.dtype.kind not in "iu":
        raise TraceError(f"{path.name}: column {name!r} must hold integers, not {column.type}")
    if len(arr) and arr.min() < 0:
        raise TraceError(f"{path.name}: column {name!r} holds negative values")
    return arr.astype(np.int64)


def _per_step(column: Any, step_ids: np.ndarray, order_ids: np.ndarray, name: str, path: Path) -> list[Any]:
    """The one value all rows of each step hold (None for a step without rows)."""
    values = np.array(column.to_pylist(), dtype=object)
    steps, first, inverse = np.unique(step_ids, return_index=True, return_inverse=True)
    if np.any(values != values[first][inverse]):
        raise TraceError(f"{path.name}: the rows of a step disagree on {name}")
    by_step = dict(zip(steps.tolist(), values[first].tolist()))
    return [by_step.get(int(s)) for s in order_ids]


def _phases(column: Any, step_ids: np.ndarray, order_ids: np.ndarray, steps_meta: Any, path: Path) -> list[Any]:
    if isinstance(steps_meta, list):
        phases = [s.get("phase") if isinstance(s, dict) else None for s in steps_meta]
    elif column is None:
        phases = [None] * len(order_ids)
    else:
        phases = _per_step(column, step_ids, order_ids, "phase", path)
    bad = [p for p in phases if p not in fmt.PHASES]
    if bad:
        raise TraceError(f"{path.name}: phase {bad[0]!r} is not prefill, decode or null")
    return phases


def _kv(column: Any, step_ids: np.ndarray, order_ids: np.ndarray, steps_meta: Any, path: Path) -> list[Any]:
    if isinstance(steps_meta, list):
        kv = [s.get("kv_len") if isinstance(s, dict) else None for s in steps_meta]
    elif column is None:
        kv = [None] * len(order_ids)
    else:
        kv = _per_step(column, step_ids, order_ids, "kv_len", path)
    if any(v is not None and (not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0) for v in kv):
        raise TraceError(f"{path.name}: kv_len must be a non-negative number or null")
    return kv


def _counts(col: dict[str, Any], step_ids: np.ndarray, layer: np.ndarray, order_ids: np.ndarray,
            model: ModelSpec, path: Path) -> np.ndarray:
    expert, count = _ints(col["expert"], "expert", path), _ints(col["count"], "count", path)
    if len(expert) and expert.max() >= model.num_experts:
        raise TraceError(f"{path.name}: expert outside [0, {model.num_experts}) of model {model.name!r}")
    pos = np.searchsorted(order_ids, step_ids)
    if np.any(pos >= len(order_ids)) or np.any(order_ids[np.minimum(pos, len(order_ids) - 1)] != step_ids):
        raise TraceError(f"{path.name}: step numbers do not match the steps listed in its metadata")
    L, E = model.num_layers, model.num_experts
    flat = (pos * L + layer) * E + expert
    if len(np.unique(flat)) != len(flat):
        raise TraceError(f"{path.name}: a (step, layer, expert) appears in two rows")
    out = np.zeros(len(order_ids) * L * E, dtype=np.int64)
    out[flat] = count
    return out.reshape(len(order_ids), L, E)


def _lists(column: Any, name: str, n_rows: int, path: Path, integer: bool) -> tuple[np.ndarray, int] | None:
    """A list column as [rows, k] (all lists of one length k), or None where every entry is null."""
    if column.null_count == n_rows:
        return None
    if column.null_count:
        raise TraceError(f"{path.name}: column {name!r} is null in some rows only")
    arr = column.combine_chunks()
    lengths = np.diff(arr.offsets.to_numpy())
    if len(lengths) and np.any(lengths != lengths[0]):
        raise TraceError(f"{path.name}: the lists in {name!r} differ in length (one top-k per row)")
    values = arr.flatten().to_numpy(zero_copy_only=False)
    k = int(lengths[0]) if len(lengths) else 0
    if integer and values.dtype.kind not in "iu":
        raise TraceError(f"{path.name}: {name!r} must hold integers")
    if not integer and (values.dtype.kind != "f" or not np.all(np.isfinite(values))):
        raise TraceError(f"{path.name}: {name!r} must hold finite numbers")
    return values.reshape(n_rows, k), k


def _token_steps(col: dict[str, Any], step_ids: np.ndarray, layer: np.ndarray, order_ids: np.ndarray,
                 model: ModelSpec, path: Path) -> list[TokenStep]:
    n = len(step_ids)
    token = _ints(col["token"], "token", path)
    got = _lists(col["expert_ids"], "expert_ids", n, path, integer=True)
    if got is None and n:
        raise TraceError(f"{path.name}: column 'expert_ids' is null")
    ids = got[0] if got is not None else np.zeros((0, model.top_k), np.int64)
    if n and got[1] != model.top_k:
        raise TraceError(f"{path.name}: rows list {got[1]} experts; model {model.name!r} is top-{model.top_k}")
    if n and (ids.min() < 0 or ids.max() >= model.num_experts):
        raise TraceError(f"{path.name}: expert id outside [0, {model.num_experts}) of model {model.name!r}")
    wcol = col.get("weights")
    w = None if wcol is None else _lists(wcol, "weights", n, path, integer=False)
    weights = None if w is None else w[0]
    if weights is not None and weights.shape != ids.shape:
        raise TraceError(f"{path.name}: weights and expert_ids differ in length")
    ocol = col.get("origin")
    origin = None if ocol is None or ocol.null_count == n else _ints(ocol, "origin", path)
    order = np.lexsort((token, layer, step_ids))
    step_ids, layer, token, ids = step_ids[order], layer[order], token[order], ids[order]
    weights = None if weights is None else weights[order]
    origin = None if origin is None else origin[order]
    L, k = model.num_layers, model.top_k
    bounds = np.searchsorted(step_ids, order_ids), np.searchsorted(step_ids, order_ids, side="right")
    if bounds[1].sum() - bounds[0].sum() != n:
        raise TraceError(f"{path.name}: step numbers do not match the steps listed in its metadata")
    out: list[TokenStep] = []
    for s, a, b in zip(order_ids, *bounds):
        rows = b - a
        if rows % L:
            raise TraceError(f"{path.name}: step {s} has {rows} rows, not tokens x {L} layers")
        T = rows // L
        want_layer, want_token = np.repeat(np.arange(L), T), np.tile(np.arange(T), L)
        if not (np.array_equal(layer[a:b], want_layer) and np.array_equal(token[a:b], want_token)):
            raise TraceError(f"{path.name}: step {s} does not hold every (layer, token) pair once, tokens 0..{T - 1}")
        sid = ids[a:b].reshape(L, T, k)
        srt = np.sort(sid, axis=2)
        if np.any(srt[:, :, 1:] == srt[:, :, :-1]):
            raise TraceError(f"{path.name}: step {s}: a token chooses the same expert twice")
        o = None
        if origin is not None:
            per = origin[a:b].reshape(L, T)
            if np.any(per != per[:1]):
                raise TraceError(f"{path.name}: step {s}: a token's origin differs between layers")
            o = per[0]
        out.append((sid, None if weights is None else weights[a:b].reshape(L, T, k), o, None))
    return out
