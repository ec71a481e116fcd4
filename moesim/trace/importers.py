"""Importers: routing statistics users already have → moesim traces.

Why: a placement study should start from the load a real deployment saw. Each reader below turns one public
format into an :class:`Imported` (token steps where the source has per-token expert ids, else load counts per
step), and :func:`import_trace` writes it as a ``.mtrace`` atomically. Every malformed input raises a one-line
:class:`TraceError`. ``.pt`` files are read with ``torch.load(weights_only=True)`` only (no pickled code runs);
``.npy``/``.npz`` with ``allow_pickle=False``.

Formats (field names as the producing projects write them):

- **SGLang expert-distribution recorder** (``sglang/srt/eplb/expert_distribution.py``, saved with torch.save):
  ``stat`` mode → ``{"rank", "logical_count": [buffer rows, layers, logical experts], ...}`` (the circular
  buffer as it lies: unrolled to time order, unfilled rows dropped, see :func:`_stat_in_order`);
  ``per_pass`` / ``per_token`` modes, one file per rank →
  ``{"records": [{"forward_pass_id", "rank", "global_physical_count": [layers, physical experts],
  per_token only: "topk_ids_of_layer": [layers, tokens, 8] physical ids padded with -1, "input_ids",
  "positions", "extend_seq_lens", "forward_mode"}], "last_physical_to_logical_map": [layers, physical]}``.
  Records of the same forward pass from several ranks are merged into one step (origin = rank).
  ``forward_mode`` 1 (EXTEND) → prefill, 2 (DECODE) → decode. Where every rank routed the same tokens
  (tensor-parallel attention), identical per-token records of a pass are kept once; ``stat`` and ``per_pass``
  counts cannot be told apart that way and are taken as summed (SGLang all-reduces ``stat`` counts over ranks).
- **vLLM EPLB** (``vllm/distributed/eplb/eplb_state.py``; vLLM gives no dump command: save these fields of its EPLB
  state with torch.save / json / np.savez): ``global_expert_load_window`` — already per *logical* expert
  ([window, layers, experts], or [layers, experts] where vLLM summed the window) and all-reduced over the EP
  ranks — is taken as it is; a rank's ``expert_load_window`` [window, layers, physical] (or ``expert_load_pass``
  [layers, physical]) is folded with ``physical_to_logical_map`` [layers, physical] (-1: an empty slot, which must
  carry no load), and several ranks' files are summed; ``expert_load_window_step`` (the next slot the circular
  window writes: the oldest entry) restores time order. A bare ``.npy`` holds the load alone; its phy2log comes from
  ``--mapping`` (or is the identity when physical = logical experts). Note: vLLM documents that with naive
  all-to-all the recorded load is multiplied by the DP size.
- **Megatron-Core router trace** (``--moe-routing-trace-path DIR``: ``DIR/router_trace_rank{N}.jsonl``): reader
  in :mod:`moesim.trace.megatron`.
- **counts** (reader in :mod:`moesim.trace.sources`): any ``[layers, experts]`` or ``[steps, layers, experts]``
  table: ``.npy``, ``.csv`` (one row per layer), ``.json`` (a bare nested list or ``{"load": ...}``
  as ``moesim trace load`` writes).
- **parquet**: a routing table as ``moesim trace export --format parquet`` writes it (:mod:`moesim.trace.parquet`).
- **Real statistics** in ``shared/data/routing`` (see its README; readers in :mod:`moesim.trace.datasets`):
  ``mixtral-csv``, ``olmoe``, ``switch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import MoesimError, TraceError
from moesim.io import read_json
from moesim.models import ModelSpec
from moesim.trace.datasets import read_mixtral_csv, read_olmoe, read_switch
from moesim.trace.megatron import read_megatron
from moesim.trace.parquet import read_parquet
from moesim.trace.sources import (
    Imported,
    TokenStep,
    as_array,
    check_totals,
    drop_dense,
    drop_empty_steps,
    fold_physical,
    get_field,
    load_any,
    read_counts,
    resolve_model,
    write_imported,
)

# -- SGLang -----------------------------------------------------------------------------------------------
SGLANG_FORWARD_MODES = {1: "prefill", 2: "decode"}  # ForwardMode.EXTEND, ForwardMode.DECODE (IntEnum auto())


def read_sglang(paths: Sequence[Path], model: ModelSpec | None = None, buffer_start: int | None = None) -> Imported:
    """SGLang expert-distribution recorder dump(s): ``stat`` → counts in time order (see :func:`_stat_in_order`;
    ``buffer_start``: the oldest row of a full buffer); ``per_pass`` / ``per_token`` records."""
    if not paths:
        raise TraceError("no SGLang dump given")
    dumps = [(p, load_any(Path(p), "SGLang dump")) for p in paths]
    if all(isinstance(d, dict) and "logical_count" in d for _, d in dumps):
        if len(dumps) > 1:
            raise TraceError("SGLang stat dumps are already summed over ranks (rank 0 writes one file); give one")
        path, d = dumps[0]
        counts = as_array(d["logical_count"], f"{path.name}: logical_count", (2, 3))
        if counts.ndim == 2:
            counts = counts[None]
        if counts.min() < 0:
            raise TraceError(f"{path.name}: logical_count holds negative counts")
        _, L, E = counts.shape
        model, dense = resolve_model(model, L, E, f"{path.name}")
        notes: list[str] = []
        counts = drop_dense(counts, dense, 1, path.name, notes)
        counts, first = _stat_in_order(counts, buffer_start, notes, path.name)
        check_totals(counts, model, notes)
        meta = {"source": "sglang:stat", "files": [str(path)], "oldest_row": first}
        return Imported(model, counts=counts, meta=meta, notes=notes)
    for path, d in dumps:
        get_field(d, "records", f"SGLang dump {path.name}")
        if not isinstance(d["records"], list):
            raise TraceError(f"SGLang dump {path.name}: records is not a list")
    return _sglang_records(dumps, model)


def _stat_in_order(counts: np.ndarray, buffer_start: int | None, notes: list[str],
                   name: str) -> tuple[np.ndarray, int | None]:
    """The rows of a ``stat`` dump [buffer, L, E] in time order, unfilled rows dropped; returns (rows, oldest row).

    SGLang's ``_StatAccumulator.dump`` saves its ``_CircularBuffer`` as it lies (``logical_count`` is the whole
    buffer, not rotated), and the dump does not hold the write index. ``append`` writes row ``i`` then moves to
    ``(i + 1) % size``; ``reset`` zeroes the rows but keeps the index. So the filled rows are one cyclic run
    and the oldest is the first filled row after the empty ones (a dump that wrapped once after a reset looks
    like ``[c3, c4, 0, 0, c1, c2]``). A full buffer carries no such mark: its oldest row is the write index
    (passes recorded modulo the buffer size), which only the user knows (``buffer_start``); without it the rows
    keep buffer order and a note says so.
    """
    n = len(counts)
    filled = counts.reshape(n, -1).any(axis=1)
    if not filled.any():
        raise TraceError(f"{name}: logical_count holds no load (every buffer row is zero)")
    if buffer_start is not None:
        if not 0 <= buffer_start < n:
            raise TraceError(f"--buffer-start {buffer_start} is not a row of the {n}-row recorder buffer")
        first = buffer_start
    elif filled.all():
        notes.append(f"the recorder's {n}-row circular buffer is full and SGLang's dump does not say where it "
                     "wrapped: rows kept in buffer order (give --buffer-start: passes recorded modulo the buffer "
                     "size)")
        return counts, None
    else:
        starts = [i for i in range(n) if filled[i] and not filled[i - 1]]
        gaps = []
        for s in starts:  # empty rows before each run, cyclically
            g = 0
            while not filled[(s - 1 - g) % n]:
                g += 1
            gaps.append(g)
        first = starts[int(np.argmax(gaps))]
        if len(starts) > 1:
            notes.append(f"the buffer holds {len(starts)} runs of filled rows; time order taken from row {first}, "
                         "after the longest empty stretch")
        elif first:
            notes.append(f"circular buffer unrolled: the oldest step is buffer row {first}")
    order = np.roll(np.arange(n), -first)
    kept = order[filled[order]]
    if len(kept) < n:
        notes.append(f"dropped {n - len(kept)} all-zero steps (unfilled recorder buffer)")
    return counts[kept], first


def _sglang_records(dumps: list[tuple[Path, Any]], model: ModelSpec | None) -> Imported:
    by_pass: dict[int, list[tuple[int, dict[str, Any], np.ndarray]]] = {}
    p2l = None
    for path, d in dumps:
        m = d.get("last_physical_to_logical_map")
        if m is not None:
            this = as_array(m, f"{path.name}: last_physical_to_logical_map", (2,))
            if p2l is not None and not np.array_equal(p2l, this):
                raise TraceError("the dumps hold different physical_to_logical maps; import them separately")
            p2l = this
        for i, rec in enumerate(d["records"]):
            where = f"{path.name} record {i}"
            fid = get_field(rec, "forward_pass_id", where)
            rank = rec.get("rank", 0)
            if not isinstance(fid, int) or not isinstance(rank, int) or rank < 0:
                raise TraceError(f"{where}: forward_pass_id and rank must be integers")
            count = as_array(get_field(rec, "global_physical_count", where), f"{where}: global_physical_count", (2,))
            by_pass.setdefault(fid, []).append((rank, rec, count))
    if not by_pass:
        raise TraceError("the SGLang dump holds no records")
    first = next(iter(by_pass.values()))[0][2]
    L, P = first.shape
    if p2l is None:
        p2l = np.tile(np.arange(P), (L, 1))
    E = int(p2l.max()) + 1
    model, dense = resolve_model(model, L, E, "SGLang records")
    notes: list[str] = []
    if not np.array_equal(p2l, np.tile(np.arange(P), (L, 1))):
        notes.append("physical ids folded to logical with the dump's last_physical_to_logical_map")
    per_token = all("topk_ids_of_layer" in rec for recs in by_pass.values() for _, rec, _ in recs)
    ranks = sorted({r for recs in by_pass.values() for r, _, _ in recs})
    meta = {"source": "sglang:per_token" if per_token else "sglang:per_pass", "files": [str(p) for p, _ in dumps],
            "forward_pass_ids": sorted(by_pass)}
    if not per_token:
        counts, phases = [], []
        for fid in sorted(by_pass):
            recs = by_pass[fid]
            total = sum(c for _, _, c in recs)
            if total.shape != (L, P):
                raise TraceError(f"forward pass {fid}: global_physical_count shape {list(total.shape)} != {[L, P]}")
            counts.append(fold_physical(total, p2l, E))
            phases.append(_sglang_phase(recs))
        arr = drop_dense(np.stack(counts), dense, 1, "SGLang records", notes)
        check_totals(arr, model, notes)
        return Imported(model, counts=arr, phases=phases, meta=meta, notes=notes)
    steps: list[TokenStep] = []
    for fid in sorted(by_pass):
        ids_parts, origin_parts, seen = [], [], []
        for rank, rec, _ in sorted(by_pass[fid], key=lambda r: r[0]):
            where = f"forward pass {fid} rank {rank}"
            topk = as_array(rec["topk_ids_of_layer"], f"{where}: topk_ids_of_layer", (3,))
            if topk.shape[0] != L:
                raise TraceError(f"{where}: topk_ids_of_layer has {topk.shape[0]} layers, expected {L}")
            n = len(rec["input_ids"]) if isinstance(rec.get("input_ids"), (list, tuple)) else topk.shape[1]
            topk = topk[:, :n]
            topk = drop_dense(topk + 1, dense, 0, where, notes) - 1  # dense layers hold only -1 padding
            ids = _sglang_topk(topk, p2l[dense:], model, where)
            key = (rec.get("input_ids"), ids.tobytes())
            if ids.shape[1] and key in seen:  # tensor-parallel attention: every rank routes the same tokens
                notes.append("ranks that recorded identical tokens in a forward pass (tensor-parallel attention) "
                             "were kept once")
                continue
            seen.append(key)
            ids_parts.append(ids)
            origin_parts.append(np.full(topk.shape[1], rank, dtype=np.int64))
        steps.append((np.concatenate(ids_parts, axis=1), None, np.concatenate(origin_parts),
                      _sglang_phase(by_pass[fid])))
    notes = sorted(set(notes), key=notes.index)
    return Imported(model, steps=steps, num_ranks=max(ranks) + 1, meta=meta, notes=notes)


def _sglang_topk(topk: np.ndarray, p2l: np.ndarray, model: ModelSpec, where: str) -> np.ndarray:
    """[L, T, 8] physical ids padded with -1 → [L, T, top_k] logical ids."""
    k = model.top_k
    valid = topk >= 0
    if np.any(valid[:, :, k:]):
        raise TraceError(f"{where}: tokens choose more than top_k={k} experts")
    if not np.all(valid[:, :, :k]):
        raise TraceError(f"{where}: tokens choose fewer than top_k={k} experts (-1 entries)")
    phys = topk[:, :, :k]
    if phys.max(initial=0) >= p2l.shape[1]:
        raise TraceError(f"{where}: physical expert id {int(phys.max())} >= {p2l.shape[1]} physical experts")
    return np.take_along_axis(p2l[:, None, :], phys.reshape(len(p2l), 1, -1), axis=2).reshape(phys.shape)


def _sglang_phase(recs: list[tuple[int, dict[str, Any], np.ndarray]]) -> str | None:
    modes = {rec.get("forward_mode") for _, rec, _ in recs}
    if len(modes) == 1:
        mode = modes.pop()
        return SGLANG_FORWARD_MODES.get(mode) if isinstance(mode, int) else None
    return None


# -- vLLM EPLB --------------------------------------------------------------------------------------------
VLLM_KEYS = ("global_expert_load_window", "expert_load_window", "expert_load_pass")


def read_vllm_eplb(paths: Sequence[Path], model: ModelSpec | None = None,
                   mapping: str | Path | None = None) -> Imported:
    """vLLM EPLB load (see the module docstring): logical windows as they are, physical ones folded with phy2log;
    several ranks' physical windows summed."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise TraceError("no vLLM EPLB file given")
    notes: list[str] = []
    loads, maps, steps, key = [], [], [], None
    for path in paths:
        data = load_any(path, "vLLM EPLB load")
        if isinstance(data, dict):
            this = next((k for k in VLLM_KEYS if k in data), None)
            if this is None:
                get_field(data, "expert_load_window", f"vLLM EPLB file {path.name}")
            load = as_array(data[this], f"{path.name}: {this}", (2, 3))
            maps.append(data.get("physical_to_logical_map"))
            steps.append(data.get("expert_load_window_step"))
        else:
            this, load = "array", as_array(data, f"{path.name}", (2, 3))
            maps.append(None)
            steps.append(None)
        if key is not None and this != key:
            raise TraceError(f"{path.name} holds {this} but {paths[0].name} holds {key}: import them apart")
        key = this
        if load.min() < 0:
            raise TraceError(f"{path.name}: negative expert load")
        loads.append(load[None] if load.ndim == 2 else load)
    if len({x.shape for x in loads}) != 1:
        raise TraceError(f"the ranks' windows differ in shape: {sorted({tuple(x.shape) for x in loads})}")
    if key == "global_expert_load_window":
        if len(paths) > 1:
            raise TraceError("global_expert_load_window is already all-reduced over the EP ranks: give one file")
        return _vllm_logical(loads[0], paths[0], model, notes)
    load = np.sum(loads, axis=0)
    if len(paths) > 1:
        notes.append(f"summed the {key} of {len(paths)} ranks")
    W, L, P = load.shape
    p2l = _one_map(maps, paths)
    if mapping is not None:
        if p2l is not None:
            notes.append("--mapping replaces the file's physical_to_logical_map")
        p2l = _mapping_table(mapping)
    if p2l is None:
        p2l = np.tile(np.arange(P), (L, 1))
        if model is not None and model.num_experts != P:
            raise TraceError(f"{paths[0].name}: {P} physical experts per layer but {model.num_experts} logical; "
                             "pass --mapping with the physical_to_logical map")
    p2l = as_array(p2l, "physical_to_logical_map", (2,))
    if np.any(p2l < 0):
        notes.append(f"{int((p2l < 0).sum())} empty physical slots (-1) in physical_to_logical_map")
    E = model.num_experts if model is not None else int(p2l.max()) + 1
    model, dense = resolve_model(model, L, E, paths[0].name)
    step = _window_step(steps, paths, W)
    if step is not None:
        load = np.roll(load, -step, axis=0)  # oldest first
        notes.append(f"window unrolled from expert_load_window_step={step} (oldest step first)")
    counts = fold_physical(load, p2l, E)
    counts = drop_dense(counts, dense, 1, paths[0].name, notes)
    counts = drop_empty_steps(counts, notes, "window entries (not yet recorded)",
                              f"{paths[0].name}: the expert load window holds no load")
    check_totals(counts, model, notes)
    return Imported(model, counts=counts, meta={"source": f"vllm-eplb:{key}", "files": [str(p) for p in paths]},
                    notes=notes)


def _vllm_logical(load: np.ndarray, path: Path, model: ModelSpec | None, notes: list[str]) -> Imported:
    """``global_expert_load_window``: already per logical expert ([window, layers, experts] or its sum over the
    window, [layers, experts]) and summed over ranks; vLLM builds it oldest first (eplb_state.py)."""
    _, L, E = load.shape
    model, dense = resolve_model(model, L, E, path.name)
    counts = drop_dense(load, dense, 1, path.name, notes)
    counts = drop_empty_steps(counts, notes, "window entries (not yet recorded)",
                              f"{path.name}: the expert load window holds no load")
    check_totals(counts, model, notes)
    return Imported(model, counts=counts, meta={"source": "vllm-eplb:global_expert_load_window",
                                                "files": [str(path)]}, notes=notes)


def _one_map(maps: list[Any], paths: list[Path]) -> np.ndarray | None:
    """The ranks' physical_to_logical_map (they must agree)."""
    given = [(p, as_array(m, f"{p.name}: physical_to_logical_map", (2,))) for p, m in zip(paths, maps)
             if m is not None]
    for p, m in given[1:]:
        if not np.array_equal(m, given[0][1]):
            raise TraceError(f"{p.name} and {given[0][0].name} hold different physical_to_logical maps")
    return given[0][1] if given else None


def _window_step(steps: list[Any], paths: list[Path], W: int) -> int | None:
    """expert_load_window_step (the next slot the circular window writes: the oldest entry); ranks agree."""
    vals = set()
    for p, step in zip(paths, steps):
        if step is None:
            continue
        if hasattr(step, "numpy") or isinstance(step, np.ndarray):  # a 0-d tensor / array (np.savez, torch.save)
            step = as_array(step, "expert_load_window_step", (0,)).item()
        if not isinstance(step, (int, np.integer)) or not 0 <= int(step) < max(W, 1):
            raise TraceError(f"{p.name}: expert_load_window_step {step!r} is not an index into the window")
        vals.add(int(step))
    if len(vals) > 1:
        raise TraceError(f"the ranks' expert_load_window_step differ: {sorted(vals)}")
    return vals.pop() if vals else None


def _mapping_table(mapping: str | Path) -> np.ndarray:
    """phy2log [L, P] from a moesim mapping JSON or SGLang's physical_to_logical_map JSON."""
    try:
        data = read_json(mapping, "mapping")
    except MoesimError as exc:
        raise TraceError(str(exc)) from None
    for key in ("phy2log", "physical_to_logical_map"):
        if isinstance(data, dict) and key in data:
            return as_array(data[key], f"mapping {key}", (2,))
    raise TraceError(f"mapping {mapping} has neither phy2log nor physical_to_logical_map")


def read_import(fmt: str, paths: Sequence[Path], *, model: ModelSpec | None = None,
                mapping: str | Path | None = None, select: str | None = None,
                buffer_start: int | None = None) -> Imported:
    """Dispatch on the format name (see ``moesim trace import --help``)."""
    paths = [Path(p) for p in paths]
    if fmt not in ("sglang", "megatron", "vllm-eplb", "vllm") and len(paths) != 1:
        raise TraceError(f"format {fmt!r} reads one file, got {len(paths)}")
    if fmt == "sglang":
        return read_sglang(paths, model, buffer_start)
    if fmt in ("vllm-eplb", "vllm"):
        return read_vllm_eplb(paths, model, mapping)
    if fmt == "megatron":
        return read_megatron(paths, model, select)
    if fmt == "counts":
        return read_counts(paths[0], model)
    if fmt == "parquet":
        return read_parquet(paths[0], model)
    if fmt == "mixtral-csv":
        return read_mixtral_csv(paths[0], model)
    if fmt == "olmoe":
        return read_olmoe(paths[0], select, model)
    if fmt == "switch":
        return read_switch(paths[0], model)
    raise TraceError(f"unknown import format {fmt!r}")


def import_trace(fmt: str, paths: Sequence[Path], out: str | Path, *, model: ModelSpec | None = None,
                 mapping: str | Path | None = None, select: str | None = None,
                 buffer_start: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Read ``paths`` in format ``fmt`` and write ``out``; returns (path, summary for the CLI)."""
    imp = read_import(fmt, paths, model=model, mapping=mapping, select=select, buffer_start=buffer_start)
    path = write_imported(imp, out)
    if imp.steps is not None:
        steps, tokens = len(imp.steps), sum(s[0].shape[1] for s in imp.steps)
    else:
        assert imp.counts is not None
        steps, tokens = len(imp.counts), int(imp.counts[:, 0].sum()) // imp.model.top_k
    return path, {"kind": imp.kind, "model": imp.model.name, "steps": steps, "tokens": tokens, "notes": imp.notes}
