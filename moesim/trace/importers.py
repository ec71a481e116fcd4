"""Importers: routing statistics users already have → moesim traces.

Why: a placement study should start from the load a real deployment saw. Each reader below turns one public
format into an :class:`Imported` (token steps where the source has per-token expert ids, else load counts per
step), and :func:`import_trace` writes it as a ``.mtrace`` atomically. Every malformed input raises a one-line
:class:`TraceError`. ``.pt`` files are read with ``torch.load(weights_only=True)`` only (no pickled code runs);
``.npy``/``.npz`` with ``allow_pickle=False``.

Formats (field names as the producing projects write them):

- **SGLang expert-distribution recorder** (``sglang/srt/eplb/expert_distribution.py``, saved with torch.save):
  ``stat`` mode → ``{"rank", "logical_count": [steps, layers, logical experts], ...}`` (all-zero steps of the
  circular buffer are dropped); ``per_pass`` / ``per_token`` modes, one file per rank →
  ``{"records": [{"forward_pass_id", "rank", "global_physical_count": [layers, physical experts],
  per_token only: "topk_ids_of_layer": [layers, tokens, 8] physical ids padded with -1, "input_ids",
  "positions", "extend_seq_lens", "forward_mode"}], "last_physical_to_logical_map": [layers, physical]}``.
  Records of the same forward pass from several ranks are merged into one step (origin = rank).
  ``forward_mode`` 1 (EXTEND) → prefill, 2 (DECODE) → decode. Where every rank routed the same tokens
  (tensor-parallel attention), identical per-token records of a pass are kept once; ``stat`` and ``per_pass``
  counts cannot be told apart that way and are taken as summed (SGLang all-reduces ``stat`` counts over ranks).
- **vLLM EPLB** (``vllm/distributed/eplb/eplb_state.py``): ``expert_load_window`` [window, layers, physical]
  (or ``expert_load_pass`` [layers, physical]) and ``physical_to_logical_map`` [layers, physical], optional
  ``expert_load_window_step`` (the next slot the circular window writes: the oldest entry). vLLM gives no dump
  command: save these fields of ``EplbModelState`` with torch.save / json / np.savez. A bare ``.npy`` holds the
  load alone; its phy2log comes from ``--mapping`` (or is the identity when physical = logical experts).
  Note: vLLM documents that with naive all-to-all the recorded load is multiplied by the DP size.
- **Megatron-Core router trace** (JSONL). Megatron-Core's ``RouterReplay`` records each MoE layer's top-k
  indices per micro-batch but defines no file format, so moesim defines one: one JSON object per line and
  (iteration, layer[, rank]): ``{"iteration": i, "layer": l, "topk_idx": [[e0, e1, ...], ...]}`` with optional
  ``"topk_probs"`` (same shape), ``"rank"`` (data-parallel rank: origin) and ``"phase"``. Layer numbers may be
  Megatron's 1-based global ``layer_number``s; they are renumbered 0..L-1 in order and kept in meta.
- **counts**: any ``[layers, experts]`` or ``[steps, layers, experts]`` table: ``.npy``, ``.csv`` (one row per
  layer), ``.json`` (a bare nested list or ``{"load": ...}`` as ``moesim trace load`` writes).
- **Real statistics** in ``shared/data/routing`` (see its README; readers in :mod:`moesim.trace.datasets`):
  ``mixtral-csv``, ``olmoe``, ``switch``.
"""

from __future__ import annotations

import csv
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import MoesimError, TraceError
from moesim.io import check_file, read_json
from moesim.models import PRESETS, ModelSpec, get_model
from moesim.trace.writer import TraceWriter

TokenStep = tuple[np.ndarray, np.ndarray | None, np.ndarray | None, str | None]  # ids [L,T,k], weights, origin


@dataclass
class Imported:
    """What an importer read: a model shape plus either token steps or per-step load counts."""

    model: ModelSpec
    counts: np.ndarray | None = None  # [S, L, E] int64 (load-only)
    steps: list[TokenStep] | None = None  # per-token steps
    phases: list[str | None] | None = None  # per counts step
    num_ranks: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "tokens" if self.steps is not None else "counts"


# -- small readers ----------------------------------------------------------------------------------------
def _load_pt(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise TraceError(f"reading {path.name} (a torch .pt file) needs torch; install it or convert the file "
                         "to JSON") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds: UnpicklingError, RuntimeError, EOFError ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(f"{path} is not a readable torch file (weights_only): {msg[:200]}") from None


def _load_any(path: Path, what: str) -> Any:
    """A .pt / .json / .npz / .npy file as Python objects (arrays stay arrays)."""
    path = _check(path, what)
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".bin"):
        return _load_pt(path)
    if suffix == ".json":
        try:
            return read_json(path, what)
        except MoesimError as exc:
            raise TraceError(str(exc)) from None
    if suffix in (".npy", ".npz"):
        try:
            data = np.load(path, allow_pickle=False)
            if suffix == ".npz":  # members load lazily: an object array is refused only when it is read
                with data:
                    return {k: data[k] for k in data.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise TraceError(f"{what} {path} is not a readable numpy file: {str(exc).splitlines()[0][:200]}") \
                from None
        return data
    raise TraceError(f"{what} {path} has an unsupported extension {suffix or '(none)'!r}")


def _check(path: Path, what: str) -> Path:
    try:
        return check_file(path, what)
    except MoesimError as exc:
        raise TraceError(str(exc)) from None


def _array(x: Any, name: str, ndim: Sequence[int], integer: bool = True) -> np.ndarray:
    """A tensor / array / nested list as a numpy array of the expected rank, or a one-line error."""
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError):
        raise TraceError(f"{name} is not a rectangular array") from None
    if arr.dtype == object or arr.dtype.kind not in "iufb":
        raise TraceError(f"{name} is not a numeric array (dtype {arr.dtype})")
    if arr.ndim not in ndim:
        raise TraceError(f"{name} must have {' or '.join(map(str, ndim))} dimensions, got shape {list(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise TraceError(f"{name} holds NaN or infinite values")
    if integer:
        if arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
            raise TraceError(f"{name} must hold whole numbers")
        arr = arr.astype(np.int64)
    return arr


def _field(d: Any, name: str, where: str) -> Any:
    if not isinstance(d, dict):
        raise TraceError(f"{where} is not a dictionary/object")
    if name not in d:
        have = ", ".join(sorted(map(str, d)))[:200]
        raise TraceError(f"{where} has no field {name!r} (it has: {have or 'nothing'})")
    return d[name]


def _fold(physical: np.ndarray, phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """Sum physical-expert counts [..., L, P] into logical experts [..., L, E] with phy2log [L, P]."""
    L, P = phy2log.shape
    if physical.shape[-2:] != (L, P):
        raise TraceError(f"load has {list(physical.shape[-2:])} [layers, physical experts] but "
                         f"physical_to_logical_map has {[L, P]}")
    if phy2log.min() < 0 or phy2log.max() >= num_experts:
        raise TraceError(f"physical_to_logical_map holds ids outside [0, {num_experts})")
    lead = physical.shape[:-2]
    flat = physical.reshape(-1, L, P)
    out = np.zeros((flat.shape[0], L, num_experts), dtype=np.int64)
    for layer in range(L):
        np.add.at(out[:, layer], (slice(None), phy2log[layer]), flat[:, layer])
    return out.reshape(*lead, L, num_experts)


def _resolve_model(model: ModelSpec | None, layers: int, experts: int, what: str,
                   top_k: int | None = None) -> tuple[ModelSpec, int]:
    """The model of data with ``layers`` x ``experts``; returns (model, leading dense layers to drop).

    Without ``model`` the presets are searched for a unique shape match. Data recorded over all decoder layers
    (dense ones first, as SGLang numbers them for DeepSeek-V3) matches ``num_dense_layers + num_layers``.
    """
    if model is None:
        matches = [m for m in PRESETS.values() if m.num_experts == experts
                   and layers in (m.num_layers, m.num_layers + m.num_dense_layers)
                   and (top_k is None or m.top_k == top_k)]
        if len(matches) != 1:
            found = f"presets {', '.join(m.name for m in matches)} match" if matches else "no preset matches"
            raise TraceError(f"{what}: {layers} layers x {experts} experts: {found}; pass --model")
        model = matches[0]
    if experts != model.num_experts:
        raise TraceError(f"{what} has {experts} experts but model {model.name!r} has {model.num_experts}")
    if top_k is not None and top_k != model.top_k:
        raise TraceError(f"{what} has top-{top_k} routing but model {model.name!r} is top-{model.top_k}")
    if layers == model.num_layers:
        return model, 0
    if model.num_dense_layers and layers == model.num_layers + model.num_dense_layers:
        return model, model.num_dense_layers
    raise TraceError(f"{what} has {layers} layers but model {model.name!r} has {model.num_layers} MoE layers")


def _drop_dense(arr: np.ndarray, dense: int, axis: int, what: str, notes: list[str]) -> np.ndarray:
    if not dense:
        return arr
    head = np.take(arr, np.arange(dense), axis=axis)
    if np.any(head > 0):
        raise TraceError(f"{what}: the first {dense} layers (dense in this model) carry expert load")
    notes.append(f"dropped the {dense} leading dense layers recorded without expert load")
    return np.take(arr, np.arange(dense, arr.shape[axis]), axis=axis)


def _drop_empty_steps(counts: np.ndarray, notes: list[str], what: str, empty_error: str) -> np.ndarray:
    """Steps [S, L, E] with no load at all are recorder buffers never filled: drop them (noted); none left is
    an error."""
    keep = counts.reshape(len(counts), -1).any(axis=1)
    if not keep.all():
        notes.append(f"dropped {int((~keep).sum())} all-zero {what}")
        counts = counts[keep]
    if not len(counts):
        raise TraceError(empty_error)
    return counts


def _check_totals(counts: np.ndarray, model: ModelSpec, notes: list[str]) -> None:
    """Each step's layers should route the same token-choices, a multiple of top_k; note it where not."""
    totals = counts.sum(axis=2)  # [S, L]
    if counts.size and np.any(totals != totals[:, :1]):
        notes.append("layers of a step carry different numbers of token-choices (tokens dropped or filtered "
                     "at the source); token counts follow layer 0")
    if counts.size and np.any(totals[:, 0] % model.top_k):
        notes.append(f"a step's layer-0 token-choices are not a multiple of top_k={model.top_k}")


# -- SGLang -----------------------------------------------------------------------------------------------
SGLANG_FORWARD_MODES = {1: "prefill", 2: "decode"}  # ForwardMode.EXTEND, ForwardMode.DECODE (IntEnum auto())


def read_sglang(paths: Sequence[Path], model: ModelSpec | None = None) -> Imported:
    """SGLang expert-distribution recorder dump(s): ``stat`` → counts; ``per_pass`` / ``per_token`` records."""
    if not paths:
        raise TraceError("no SGLang dump given")
    dumps = [(p, _load_any(Path(p), "SGLang dump")) for p in paths]
    if all(isinstance(d, dict) and "logical_count" in d for _, d in dumps):
        if len(dumps) > 1:
            raise TraceError("SGLang stat dumps are already summed over ranks (rank 0 writes one file); give one")
        path, d = dumps[0]
        counts = _array(d["logical_count"], f"{path.name}: logical_count", (2, 3))
        if counts.ndim == 2:
            counts = counts[None]
        if counts.min() < 0:
            raise TraceError(f"{path.name}: logical_count holds negative counts")
        _, L, E = counts.shape
        model, dense = _resolve_model(model, L, E, f"{path.name}")
        notes: list[str] = []
        counts = _drop_dense(counts, dense, 1, path.name, notes)
        counts = _drop_empty_steps(counts, notes, "steps (unfilled recorder buffer)",
                                   f"{path.name}: logical_count holds no load (every step is zero)")
        _check_totals(counts, model, notes)
        return Imported(model, counts=counts, meta={"source": "sglang:stat", "files": [str(path)]}, notes=notes)
    for path, d in dumps:
        _field(d, "records", f"SGLang dump {path.name}")
        if not isinstance(d["records"], list):
            raise TraceError(f"SGLang dump {path.name}: records is not a list")
    return _sglang_records(dumps, model)


def _sglang_records(dumps: list[tuple[Path, Any]], model: ModelSpec | None) -> Imported:
    by_pass: dict[int, list[tuple[int, dict[str, Any], np.ndarray]]] = {}
    p2l = None
    for path, d in dumps:
        m = d.get("last_physical_to_logical_map")
        if m is not None:
            this = _array(m, f"{path.name}: last_physical_to_logical_map", (2,))
            if p2l is not None and not np.array_equal(p2l, this):
                raise TraceError("the dumps hold different physical_to_logical maps; import them separately")
            p2l = this
        for i, rec in enumerate(d["records"]):
            where = f"{path.name} record {i}"
            fid = _field(rec, "forward_pass_id", where)
            rank = rec.get("rank", 0)
            if not isinstance(fid, int) or not isinstance(rank, int) or rank < 0:
                raise TraceError(f"{where}: forward_pass_id and rank must be integers")
            count = _array(_field(rec, "global_physical_count", where), f"{where}: global_physical_count", (2,))
            by_pass.setdefault(fid, []).append((rank, rec, count))
    if not by_pass:
        raise TraceError("the SGLang dump holds no records")
    first = next(iter(by_pass.values()))[0][2]
    L, P = first.shape
    if p2l is None:
        p2l = np.tile(np.arange(P), (L, 1))
    E = int(p2l.max()) + 1
    model, dense = _resolve_model(model, L, E, "SGLang records")
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
            counts.append(_fold(total, p2l, E))
            phases.append(_sglang_phase(recs))
        arr = _drop_dense(np.stack(counts), dense, 1, "SGLang records", notes)
        _check_totals(arr, model, notes)
        return Imported(model, counts=arr, phases=phases, meta=meta, notes=notes)
    steps: list[TokenStep] = []
    for fid in sorted(by_pass):
        ids_parts, origin_parts, seen = [], [], []
        for rank, rec, _ in sorted(by_pass[fid], key=lambda r: r[0]):
            where = f"forward pass {fid} rank {rank}"
            topk = _array(rec["topk_ids_of_layer"], f"{where}: topk_ids_of_layer", (3,))
            if topk.shape[0] != L:
                raise TraceError(f"{where}: topk_ids_of_layer has {topk.shape[0]} layers, expected {L}")
            n = len(rec["input_ids"]) if isinstance(rec.get("input_ids"), (list, tuple)) else topk.shape[1]
            topk = topk[:, :n]
            topk = _drop_dense(topk + 1, dense, 0, where, notes) - 1  # dense layers hold only -1 padding
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
def read_vllm_eplb(path: Path, model: ModelSpec | None = None, mapping: str | Path | None = None) -> Imported:
    """vLLM EPLB expert-load window [window, layers, physical] folded to logical experts with phy2log."""
    path = Path(path)
    data = _load_any(path, "vLLM EPLB load")
    notes: list[str] = []
    if isinstance(data, dict):
        key = next((k for k in ("expert_load_window", "global_expert_load_window", "expert_load_pass")
                    if k in data), None)
        if key is None:
            _field(data, "expert_load_window", f"vLLM EPLB file {path.name}")
        load = _array(data[key], f"{path.name}: {key}", (2, 3))
        p2l = data.get("physical_to_logical_map")
        step = data.get("expert_load_window_step")
    else:
        load, p2l, step, key = _array(data, f"{path.name}", (2, 3)), None, None, "array"
    if load.ndim == 2:
        load = load[None]
    if load.min() < 0:
        raise TraceError(f"{path.name}: negative expert load")
    W, L, P = load.shape
    if mapping is not None:
        if p2l is not None:
            notes.append("--mapping replaces the file's physical_to_logical_map")
        p2l = _mapping_table(mapping)
    if p2l is None:
        p2l = np.tile(np.arange(P), (L, 1))
        if model is not None and model.num_experts != P:
            raise TraceError(f"{path.name}: {P} physical experts per layer but {model.num_experts} logical; "
                             "pass --mapping with the physical_to_logical map")
    p2l = _array(p2l, "physical_to_logical_map", (2,))
    E = model.num_experts if model is not None else int(p2l.max()) + 1
    model, dense = _resolve_model(model, L, E, path.name)
    if step is not None:
        if hasattr(step, "numpy") or isinstance(step, np.ndarray):  # a 0-d tensor / array (np.savez, torch.save)
            step = _array(step, "expert_load_window_step", (0,)).item()
        if not isinstance(step, (int, np.integer)) or not 0 <= int(step) < max(W, 1):
            raise TraceError(f"{path.name}: expert_load_window_step {step!r} is not an index into the window")
        load = np.roll(load, -int(step), axis=0)  # oldest first
        notes.append(f"window unrolled from expert_load_window_step={int(step)} (oldest step first)")
    counts = _fold(load, p2l, E)
    counts = _drop_dense(counts, dense, 1, path.name, notes)
    counts = _drop_empty_steps(counts, notes, "window entries (not yet recorded)",
                               f"{path.name}: the expert load window holds no load")
    _check_totals(counts, model, notes)
    return Imported(model, counts=counts, meta={"source": f"vllm-eplb:{key}", "files": [str(path)]}, notes=notes)


def _mapping_table(mapping: str | Path) -> np.ndarray:
    """phy2log [L, P] from a moesim mapping JSON or SGLang's physical_to_logical_map JSON."""
    try:
        data = read_json(mapping, "mapping")
    except MoesimError as exc:
        raise TraceError(str(exc)) from None
    for key in ("phy2log", "physical_to_logical_map"):
        if isinstance(data, dict) and key in data:
            return _array(data[key], f"mapping {key}", (2,))
    raise TraceError(f"mapping {mapping} has neither phy2log nor physical_to_logical_map")


# -- Megatron-Core ----------------------------------------------------------------------------------------
def read_megatron(path: Path, model: ModelSpec | None = None) -> Imported:
    """Megatron-Core router trace JSONL (see the module docstring) → token trace."""
    path = _check(Path(path), "Megatron router trace")
    rows: dict[int, dict[int, dict[int, tuple[np.ndarray, np.ndarray | None]]]] = {}
    phase_of: dict[int, str | None] = {}
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise TraceError(f"Megatron router trace {path} is not a text (JSONL) file") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path.name} line {n} is not valid JSON: {exc.msg}") from None
        where = f"{path.name} line {n}"
        it, layer, rank = _field(rec, "iteration", where), _field(rec, "layer", where), rec.get("rank", 0)
        if not all(isinstance(v, int) and v >= 0 for v in (it, layer, rank)):
            raise TraceError(f"{where}: iteration, layer and rank must be non-negative integers")
        raw, probs = _field(rec, "topk_idx", where), rec.get("topk_probs")
        if isinstance(raw, list) and not raw:  # a rank with no tokens this iteration
            raw, probs = np.zeros((0, 0), np.int64), None if probs is None else np.zeros((0, 0))
        idx = _array(raw, f"{where}: topk_idx", (2,))
        w = None if probs is None else _array(probs, f"{where}: topk_probs", (2,), integer=False)
        if w is not None and w.shape != idx.shape:
            raise TraceError(f"{where}: topk_probs shape {list(w.shape)} differs from topk_idx {list(idx.shape)}")
        if layer in rows.setdefault(it, {}).setdefault(rank, {}):
            raise TraceError(f"{where}: iteration {it} layer {layer} rank {rank} appears twice")
        rows[it][rank][layer] = (idx, w)
        if "phase" in rec:
            phase_of[it] = rec["phase"] if rec["phase"] in ("prefill", "decode") else None
    if not rows:
        raise TraceError(f"Megatron router trace {path} holds no records")
    layer_ids = sorted({lay for ranks in rows.values() for lays in ranks.values() for lay in lays})
    widths = {x[0].shape[1] for ranks in rows.values() for lays in ranks.values() for x in lays.values()
              if x[0].shape[0]}
    if not widths and model is not None:
        widths = {model.top_k}
    if len(widths) != 1:
        raise TraceError(f"{path.name}: records have top-k widths {sorted(widths) or 'none (no tokens)'}; "
                         "expected one width")
    k = widths.pop()
    for ranks in rows.values():  # give token-less records the common width
        for lays in ranks.values():
            for lay, (idx, w) in list(lays.items()):
                if not idx.shape[0]:
                    lays[lay] = (idx.reshape(0, k), None if w is None else w.reshape(0, k))
    E = model.num_experts if model is not None else None
    if E is None:
        E = 1 + max(int(x[0].max(initial=0)) for ranks in rows.values() for lays in ranks.values()
                    for x in lays.values())
    model, dense = _resolve_model(model, len(layer_ids), E, path.name, top_k=k)
    if dense:
        raise TraceError(f"{path.name} has {len(layer_ids)} layers; model {model.name!r} has {model.num_layers} "
                         "MoE layers (record MoE layers only)")
    with_weights = all(x[1] is not None for ranks in rows.values() for lays in ranks.values() for x in lays.values())
    steps: list[TokenStep] = []
    for it in sorted(rows):
        ids_parts, w_parts, o_parts = [], [], []
        for rank in sorted(rows[it]):
            lays = rows[it][rank]
            missing = [lay for lay in layer_ids if lay not in lays]
            if missing:
                raise TraceError(f"{path.name}: iteration {it} rank {rank} lacks layers {missing[:5]}")
            T = {lays[lay][0].shape[0] for lay in layer_ids}
            if len(T) != 1:
                raise TraceError(f"{path.name}: iteration {it} rank {rank}: layers route different token counts")
            ids = np.stack([lays[lay][0] for lay in layer_ids])
            if ids.size and (ids.min() < 0 or ids.max() >= E):
                raise TraceError(f"{path.name}: iteration {it}: expert id outside [0, {E})")
            s = np.sort(ids, axis=2)
            if np.any(s[:, :, 1:] == s[:, :, :-1]):
                raise TraceError(f"{path.name}: iteration {it}: a token chooses the same expert twice")
            ids_parts.append(ids)
            if with_weights:
                w_parts.append(np.stack([lays[lay][1] for lay in layer_ids]))
            o_parts.append(np.full(ids.shape[1], rank, dtype=np.int64))
        steps.append((np.concatenate(ids_parts, axis=1), np.concatenate(w_parts, axis=1) if with_weights else None,
                      np.concatenate(o_parts), phase_of.get(it)))
    if not sum(s[0].shape[1] for s in steps):
        raise TraceError(f"Megatron router trace {path} routes no tokens")
    ranks = {r for ranks in rows.values() for r in ranks}
    meta = {"source": "megatron:router-jsonl", "files": [str(path)], "layers": layer_ids,
            "iterations": sorted(rows)}
    return Imported(model, steps=steps, num_ranks=max(ranks) + 1, meta=meta)


# -- plain load tables --------------------------------------------------------------------------------------
def read_counts(path: Path, model: ModelSpec | None = None, default: str | None = None,
                source: str = "counts") -> Imported:
    """A [layers, experts] or [steps, layers, experts] load table (.npy / .csv / .json)."""
    path = _check(Path(path), "load table")
    if path.suffix.lower() == ".csv":
        try:
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
            table = [[float(c) for c in r] for r in rows]
        except (ValueError, UnicodeDecodeError):
            raise TraceError(f"load table {path} is not a CSV of numbers (one row per layer)") from None
        if not table or len({len(r) for r in table}) != 1:
            raise TraceError(f"load table {path} is empty or has rows of different lengths")
        data: Any = table
    else:
        data = _load_any(path, "load table")
        if isinstance(data, dict):
            data = _field(data, "load", f"load table {path.name}")
    counts = _array(data, f"load table {path.name}", (2, 3))
    if counts.ndim == 2:
        counts = counts[None]
    if counts.min() < 0:
        raise TraceError(f"load table {path.name} holds negative counts")
    if model is None and default is not None:
        model = get_model(default)
    _, L, E = counts.shape
    model, dense = _resolve_model(model, L, E, f"load table {path.name}")
    notes: list[str] = []
    counts = _drop_dense(counts, dense, 1, path.name, notes)
    _check_totals(counts, model, notes)
    return Imported(model, counts=counts, meta={"source": source, "files": [str(path)]}, notes=notes)


# -- writing ----------------------------------------------------------------------------------------------
def write_imported(imp: Imported, out: str | Path) -> Path:
    """Write an import as a .mtrace atomically (the model's name and shape in the header, notes in meta)."""
    out = Path(out)
    meta = dict(imp.meta)
    if imp.notes:
        meta["notes"] = imp.notes
        meta["note"] = "; ".join(imp.notes)
    try:
        if imp.steps is not None:
            with_w = all(s[1] is not None for s in imp.steps)
            with_o = all(s[2] is not None for s in imp.steps)
            with TraceWriter(out, imp.model, kind="tokens", weights=with_w, weights_dtype="float32",
                             origin=with_o, num_ranks=imp.num_ranks if with_o else None, meta=meta,
                             atomic=True) as w:
                for ids, weights, origin, phase in imp.steps:
                    w.add_step(ids, weights if with_w else None, origin if with_o else None, phase)
        else:
            assert imp.counts is not None
            phases = imp.phases or [None] * len(imp.counts)
            with TraceWriter(out, imp.model, kind="counts", meta=meta, atomic=True) as w:
                for c, phase in zip(imp.counts, phases):
                    w.add_counts(c, phase)
    except OSError as exc:
        raise TraceError(f"cannot write {out}: {exc.strerror}") from None
    return out


def read_import(fmt: str, paths: Sequence[Path], *, model: ModelSpec | None = None,
                mapping: str | Path | None = None, select: str | None = None) -> Imported:
    """Dispatch on the format name (see ``moesim trace import --help``)."""
    from moesim.trace.datasets import read_mixtral_csv, read_olmoe, read_switch

    paths = [Path(p) for p in paths]
    if fmt != "sglang" and len(paths) != 1:
        raise TraceError(f"format {fmt!r} reads one file, got {len(paths)}")
    if fmt == "sglang":
        return read_sglang(paths, model)
    if fmt in ("vllm-eplb", "vllm"):
        return read_vllm_eplb(paths[0], model, mapping)
    if fmt == "megatron":
        return read_megatron(paths[0], model)
    if fmt == "counts":
        return read_counts(paths[0], model)
    if fmt == "mixtral-csv":
        return read_mixtral_csv(paths[0], model)
    if fmt == "olmoe":
        return read_olmoe(paths[0], select, model)
    if fmt == "switch":
        return read_switch(paths[0], model)
    raise TraceError(f"unknown import format {fmt!r}")


def import_trace(fmt: str, paths: Sequence[Path], out: str | Path, *, model: ModelSpec | None = None,
                 mapping: str | Path | None = None, select: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Read ``paths`` in format ``fmt`` and write ``out``; returns (path, summary for the CLI)."""
    imp = read_import(fmt, paths, model=model, mapping=mapping, select=select)
    path = write_imported(imp, out)
    if imp.steps is not None:
        steps, tokens = len(imp.steps), sum(s[0].shape[1] for s in imp.steps)
    else:
        assert imp.counts is not None
        steps, tokens = len(imp.counts), int(imp.counts[:, 0].sum()) // imp.model.top_k
    return path, {"kind": imp.kind, "model": imp.model.name, "steps": steps, "tokens": tokens, "notes": imp.notes}
