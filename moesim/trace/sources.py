"""What every importer shares: the :class:`Imported` result, checked readers of .pt/.json/.npy files, model
resolution, load tables, and writing an import as a ``.mtrace``.

Why its own module: the format readers (:mod:`moesim.trace.importers` for SGLang and vLLM,
:mod:`moesim.trace.megatron`, :mod:`moesim.trace.datasets`, :mod:`moesim.trace.parquet`) all build on these,
and none of them imports another.
"""

from __future__ import annotations

import csv
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
    kv_len: list[float | None] | None = None  # per step, where the source recorded it
    num_ranks: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "tokens" if self.steps is not None else "counts"


# -- small readers ----------------------------------------------------------------------------------------
def load_pt(path: Path) -> Any:
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


def load_any(path: Path, what: str) -> Any:
    """A .pt / .json / .npz / .npy file as Python objects (arrays stay arrays)."""
    path = check_path(path, what)
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".bin"):
        return load_pt(path)
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


def check_path(path: Path, what: str) -> Path:
    try:
        return check_file(path, what)
    except MoesimError as exc:
        raise TraceError(str(exc)) from None


def as_array(x: Any, name: str, ndim: Sequence[int], integer: bool = True) -> np.ndarray:
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


def get_field(d: Any, name: str, where: str) -> Any:
    if not isinstance(d, dict):
        raise TraceError(f"{where} is not a dictionary/object")
    if name not in d:
        have = ", ".join(sorted(map(str, d)))[:200]
        raise TraceError(f"{where} has no field {name!r} (it has: {have or 'nothing'})")
    return d[name]


def fold_physical(physical: np.ndarray, phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """Sum physical-expert counts [..., L, P] into logical experts [..., L, E] with phy2log [L, P].

    A -1 in phy2log is an empty physical slot (vLLM's maps hold them); it must carry no load."""
    L, P = phy2log.shape
    if physical.shape[-2:] != (L, P):
        raise TraceError(f"load has {list(physical.shape[-2:])} [layers, physical experts] but "
                         f"physical_to_logical_map has {[L, P]}")
    if phy2log.min() < -1 or phy2log.max() >= num_experts:
        raise TraceError(f"physical_to_logical_map holds ids outside [0, {num_experts}) (or -1: empty slot)")
    lead = physical.shape[:-2]
    flat = physical.reshape(-1, L, P)
    empty = phy2log < 0
    if np.any(flat[:, empty]):
        layer, slot = np.argwhere(empty & flat.any(axis=0))[0]
        raise TraceError(f"layer {layer} physical slot {slot} is empty (-1 in physical_to_logical_map) but "
                         "carries load")
    out = np.zeros((flat.shape[0], L, num_experts), dtype=np.int64)
    for layer in range(L):
        keep = ~empty[layer]
        np.add.at(out[:, layer], (slice(None), phy2log[layer, keep]), flat[:, layer][:, keep])
    return out.reshape(*lead, L, num_experts)


def resolve_model(model: ModelSpec | None, layers: int, experts: int, what: str,
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


def drop_dense(arr: np.ndarray, dense: int, axis: int, what: str, notes: list[str]) -> np.ndarray:
    if not dense:
        return arr
    head = np.take(arr, np.arange(dense), axis=axis)
    if np.any(head > 0):
        raise TraceError(f"{what}: the first {dense} layers (dense in this model) carry expert load")
    notes.append(f"dropped the {dense} leading dense layers recorded without expert load")
    return np.take(arr, np.arange(dense, arr.shape[axis]), axis=axis)


def drop_empty_steps(counts: np.ndarray, notes: list[str], what: str, empty_error: str) -> np.ndarray:
    """Steps [S, L, E] with no load at all are recorder buffers never filled: drop them (noted); none left is
    an error."""
    keep = counts.reshape(len(counts), -1).any(axis=1)
    if not keep.all():
        notes.append(f"dropped {int((~keep).sum())} all-zero {what}")
        counts = counts[keep]
    if not len(counts):
        raise TraceError(empty_error)
    return counts


def check_totals(counts: np.ndarray, model: ModelSpec, notes: list[str]) -> None:
    """Each step's layers should route the same token-choices, a multiple of top_k; note it where not."""
    totals = counts.sum(axis=2)  # [S, L]
    if counts.size and np.any(totals != totals[:, :1]):
        notes.append("layers of a step carry different numbers of token-choices (tokens dropped or filtered "
                     "at the source); token counts follow layer 0")
    if counts.size and np.any(totals[:, 0] % model.top_k):
        notes.append(f"a step's layer-0 token-choices are not a multiple of top_k={model.top_k}")


# -- plain load tables --------------------------------------------------------------------------------------
def read_counts(path: Path, model: ModelSpec | None = None, default: str | None = None,
                source: str = "counts") -> Imported:
    """A [layers, experts] or [steps, layers, experts] load table (.npy / .csv / .json)."""
    path = check_path(Path(path), "load table")
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
        data = load_any(path, "load table")
        if isinstance(data, dict):
            data = get_field(data, "load", f"load table {path.name}")
    counts = as_array(data, f"load table {path.name}", (2, 3), integer=False)
    if counts.ndim == 2:
        counts = counts[None]
    if counts.min() < 0:
        raise TraceError(f"load table {path.name} holds negative counts")
    if np.any(counts != np.round(counts)):  # a trace stores token counts; fractional loads are placement weights
        raise TraceError(f"load table {path.name} holds fractional values: a trace stores whole token counts "
                         "(for fractional loads use `moesim place --load` directly)")
    if counts.sum() == 0:
        raise TraceError(f"load table {path.name} is all zero: no tokens to import")
    counts = counts.astype(np.int64)
    if model is None and default is not None:
        model = get_model(default)
    _, L, E = counts.shape
    model, dense = resolve_model(model, L, E, f"load table {path.name}")
    notes: list[str] = []
    counts = drop_dense(counts, dense, 1, path.name, notes)
    check_totals(counts, model, notes)
    return Imported(model, counts=counts, meta={"source": source, "files": [str(path)]}, notes=notes)


# -- writing ----------------------------------------------------------------------------------------------
def write_imported(imp: Imported, out: str | Path) -> Path:
    """Write an import as a .mtrace atomically (the model's name and shape in the header, notes in meta)."""
    out = Path(out)
    meta = dict(imp.meta)
    if imp.notes:
        meta["notes"] = imp.notes
        meta["note"] = "; ".join(imp.notes)
    n = len(imp.steps) if imp.steps is not None else len(imp.counts)  # type: ignore[arg-type]
    kv_len = imp.kv_len or [None] * n
    try:
        if imp.steps is not None:
            with_w = all(s[1] is not None for s in imp.steps)
            with_o = all(s[2] is not None for s in imp.steps)
            with TraceWriter(out, imp.model, kind="tokens", weights=with_w, weights_dtype="float32",
                             origin=with_o, num_ranks=imp.num_ranks if with_o else None, meta=meta,
                             atomic=True) as w:
                for (ids, weights, origin, phase), kv in zip(imp.steps, kv_len):
                    w.add_step(ids, weights if with_w else None, origin if with_o else None, phase, kv)
        else:
            assert imp.counts is not None
            phases = imp.phases or [None] * len(imp.counts)
            with TraceWriter(out, imp.model, kind="counts", meta=meta, atomic=True) as w:
                for c, phase, kv in zip(imp.counts, phases, kv_len):
                    w.add_counts(c, phase, kv)
    except OSError as exc:
        raise TraceError(f"cannot write {out}: {exc.strerror}") from None
    return out


