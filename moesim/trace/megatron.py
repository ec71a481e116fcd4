"""Megatron-Core router traces → a moesim token trace.

Why: Megatron-Core writes the routing of every MoE layer when run with ``--moe-routing-trace-path DIR``; its own
analysis scripts (``tools/moe_routing/analyze_router_trace.py``) read those files, and so does moesim.

The producer is ``megatron/core/transformer/moe/router_trace.py`` (``RouterTracer``): one file per rank,
``DIR/router_trace_rank{rank}.jsonl``, one JSON object per line and (step, router call), written by
``_flush_records_to_disk`` as ``json.dumps(record)`` with the fields, in this order::

    {"step": int, "stage": "pre_dispatch", "block": "decoder" | "mtp", "layer": int, "rank": int,
     "num_tokens": int, "topk": int, ["mtp_idx": int,] [sidecar offsets: "hs_offset", ...,]
     "top_indices": [[expert id, ...] * topk] * num_tokens}

- ``layer`` is the index in ``decoder.layers.N`` (MTP: ``mtp.layers.I.mtp_model_layer.layers.N``, with
  ``mtp_idx`` = I), so only MoE layers appear and a dense-first model's numbers start above 0 (DeepSeek-V3: 3..60).
  moesim renumbers them 0..L-1 in order and keeps the original numbers in ``meta["layers"]``.
- ``step`` is the training iteration or the inference step (a new one starts when a layer fires again). Several
  records of one (step, rank, layer) — micro-batches of a training iteration — are concatenated in file order.
  Steps are kept in order, their original numbers in ``meta["steps"]``; the file says nothing of prefill or
  decode, so steps carry no phase.
- ``stage``: where the indices were taken (the writer records ``"pre_dispatch"``); kept in ``meta["stage"]``.
- ``block``: decoder and MTP routers are kept apart: the decoder's records are imported by default, the MTP
  heads' with ``select="mtp"`` (or ``"mtp:I"`` for one head); the other block's records are counted in a note.
- ``rank``: the global rank; every rank's tokens are merged into the step, origin = rank. With tensor parallelism
  Megatron's MoE layers run sequence-parallel, so ranks route distinct tokens. Ranks of different pipeline stages
  number their layers locally and cannot be merged: such files are refused with a message.
- No router weights are written; the trace has none.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import TraceError
from moesim.models import ModelSpec
from moesim.trace.sources import Imported, TokenStep, check_path, resolve_model

FILE_RE = re.compile(r"router_trace_rank(\d+)\.jsonl$")
BLOCKS = ("decoder", "mtp")
_INT_FIELDS = ("step", "layer", "rank", "num_tokens", "topk")


def trace_files(paths: Sequence[Path]) -> list[Path]:
    """The JSONL files of ``paths``: a directory contributes its ``router_trace_rank*.jsonl`` files."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("router_trace_rank*.jsonl"),
                           key=lambda f: int(m.group(1)) if (m := FILE_RE.search(f.name)) else -1)
            if not found:
                raise TraceError(f"directory {p} holds no router_trace_rank*.jsonl files (Megatron-Core writes them "
                                 "with --moe-routing-trace-path)")
            files.extend(found)
        else:
            files.append(check_path(p, "Megatron router trace"))
    if not files:
        raise TraceError("no Megatron router trace given")
    return files


def _parse_select(select: str | None) -> tuple[str, int | None]:
    """``None``/"decoder" → decoder; "mtp" → every MTP head; "mtp:I" → head I."""
    if select in (None, "", "decoder"):
        return "decoder", None
    if select == "mtp":
        return "mtp", None
    if select.startswith("mtp:") and select[4:].isdigit():
        return "mtp", int(select[4:])
    raise TraceError(f"--select for megatron is 'decoder', 'mtp' or 'mtp:I' (one MTP head), got {select!r}")


def _record(line: str, where: str) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where} is not valid JSON: {exc.msg}") from None
    if not isinstance(rec, dict):
        raise TraceError(f"{where} is not a JSON object")
    missing = [k for k in (*_INT_FIELDS, "block", "top_indices") if k not in rec]
    if missing:
        raise TraceError(f"{where} lacks {', '.join(missing)} (not a Megatron-Core router trace record)")
    for k in _INT_FIELDS:
        if not isinstance(rec[k], int) or isinstance(rec[k], bool) or rec[k] < 0:
            raise TraceError(f"{where}: {k} must be a non-negative integer, got {rec[k]!r}")
    if rec["block"] not in BLOCKS:
        raise TraceError(f"{where}: block must be 'decoder' or 'mtp', got {rec['block']!r}")
    if rec["block"] == "mtp" and not (isinstance(rec.get("mtp_idx"), int) and rec["mtp_idx"] >= 0):
        raise TraceError(f"{where}: an mtp record needs a non-negative integer mtp_idx")
    return rec


def _indices(rec: dict[str, Any], where: str) -> np.ndarray:
    """top_indices as [num_tokens, topk] int64, checked against num_tokens and topk."""
    raw, n, k = rec["top_indices"], rec["num_tokens"], rec["topk"]
    if not isinstance(raw, list) or len(raw) != n:
        raise TraceError(f"{where}: top_indices holds {len(raw) if isinstance(raw, list) else 'no list of'} rows, "
                         f"num_tokens says {n}")
    if n == 0:
        return np.zeros((0, k), dtype=np.int64)
    if any(not isinstance(row, list) or len(row) != k for row in raw):
        raise TraceError(f"{where}: every row of top_indices must list topk={k} expert ids")
    try:
        arr = np.array(raw)
    except (ValueError, TypeError):
        raise TraceError(f"{where}: top_indices is not a table of integers") from None
    if arr.dtype.kind not in "iu":
        raise TraceError(f"{where}: top_indices must hold integer expert ids")
    if arr.min() < 0:
        raise TraceError(f"{where}: negative expert id in top_indices")
    return arr.astype(np.int64)


def read_megatron(paths: Sequence[Path], model: ModelSpec | None = None, select: str | None = None) -> Imported:
    """Megatron-Core ``router_trace_rank*.jsonl`` files (or their directory) → token trace (see module doc)."""
    block, head = _parse_select(select)
    files = trace_files(paths)
    # (step, rank) -> layer key -> list of [tokens, topk] parts in file order
    rows: dict[tuple[int, int], dict[tuple[int, int], list[np.ndarray]]] = {}
    stages: set[str] = set()
    others: dict[str, int] = {}
    widths: set[int] = set()
    total = 0
    for path in files:
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise TraceError(f"Megatron router trace {path} is not a text (JSONL) file") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path.name} line {n}"
            rec = _record(line, where)
            total += 1
            head_idx = rec.get("mtp_idx") if rec["block"] == "mtp" else None
            if rec["block"] != block or (head is not None and head_idx != head):
                name = rec["block"] if head_idx is None else f"mtp:{head_idx}"
                others[name] = others.get(name, 0) + 1
                continue
            stage = rec.get("stage")
            if stage is not None and not isinstance(stage, str):
                raise TraceError(f"{where}: stage must be a string, got {stage!r}")
            stages.add(stage or "")
            idx = _indices(rec, where)
            widths.add(rec["topk"])
            key = (head_idx if head_idx is not None else -1, rec["layer"])
            rows.setdefault((rec["step"], rec["rank"]), {}).setdefault(key, []).append(idx)
    label = "decoder" if block == "decoder" else ("MTP" if head is None else f"MTP head {head}")
    if not total:
        raise TraceError(f"Megatron router trace {', '.join(f.name for f in files)[:200]} holds no records")
    if not rows:
        raise TraceError(f"the Megatron router trace holds no {label} records (it has: "
                         f"{', '.join(f'{v} {k}' for k, v in sorted(others.items()))})")
    if len(stages) > 1:
        raise TraceError(f"the {label} records come from several stages ({', '.join(sorted(stages))}); "
                         "import one stage's records at a time")
    if len(widths) != 1:
        raise TraceError(f"the {label} records have several topk widths {sorted(widths)}; expected one")
    k = widths.pop()
    layer_keys = sorted({key for lays in rows.values() for key in lays})
    for (step, rank), lays in rows.items():
        if set(lays) != set(layer_keys):
            missing = [_layer_name(x) for x in layer_keys if x not in lays][:5]
            raise TraceError(f"step {step} rank {rank} lacks {label} layers {missing} that other ranks or steps "
                             "record (ranks of different pipeline stages cannot be merged: import them apart)")
    max_id = max(int(p.max(initial=-1)) for lays in rows.values() for parts in lays.values() for p in parts)
    L = len(layer_keys)
    if block == "decoder":
        E = model.num_experts if model is not None else max_id + 1
        model, dense = resolve_model(model, L, E, f"Megatron {label} records", top_k=k)
        if dense:
            raise TraceError(f"the Megatron trace records {L} MoE layers; model {model.name!r} has "
                             f"{model.num_layers}")
    else:
        model = _mtp_model(model, max_id, k, L)
    if max_id >= model.num_experts:
        raise TraceError(f"expert id {max_id} in the Megatron trace is outside [0, {model.num_experts})")
    steps = _steps(rows, layer_keys, k)
    if not sum(s[0].shape[1] for s in steps):
        raise TraceError("the Megatron router trace routes no tokens")
    notes: list[str] = []
    if others:
        notes.append("kept apart, not imported: " + ", ".join(f"{v} {name} records" for name, v in
                                                               sorted(others.items())))
    if any(len(parts) > 1 for lays in rows.values() for parts in lays.values()):
        notes.append("several records per (step, rank, layer) (micro-batches) were concatenated in file order")
    step_ids = sorted({s for s, _ in rows})
    meta: dict[str, Any] = {"source": f"megatron:router-trace:{block}", "files": [str(f) for f in files],
                            "layers": [_layer_name(x) for x in layer_keys], "steps": step_ids,
                            "stage": next(iter(stages)) or None, "block": block}
    if head is not None:
        meta["mtp_idx"] = head
    ranks = {r for _, r in rows}
    return Imported(model, steps=steps, num_ranks=max(ranks) + 1, meta=meta, notes=notes)


def _layer_name(key: tuple[int, int]) -> int | str:
    head, layer = key
    return layer if head < 0 else f"mtp{head}.{layer}"


def _mtp_model(model: ModelSpec | None, max_id: int, k: int, layers: int) -> ModelSpec:
    """MTP heads' routers belong to the base model: its experts and top-k, ``layers`` MTP MoE layers."""
    if model is None:
        raise TraceError(f"MTP records (top-{k}, expert ids up to {max_id}): pass --model, the base model")
    if model.top_k != k:
        raise TraceError(f"MTP records are top-{k} but model {model.name!r} is top-{model.top_k}")
    return model.with_(num_layers=layers)


def _steps(rows: dict[tuple[int, int], dict[tuple[int, int], list[np.ndarray]]],
           layer_keys: list[tuple[int, int]], k: int) -> list[TokenStep]:
    """One token step per step id: ranks in order, ids [L, tokens, k], origin = rank."""
    out: list[TokenStep] = []
    for step in sorted({s for s, _ in rows}):
        ids_parts, origin_parts = [], []
        for rank in sorted(r for s, r in rows if s == step):
            lays = rows[(step, rank)]
            per_layer = [np.concatenate(lays[key]) if len(lays[key]) > 1 else lays[key][0] for key in layer_keys]
            counts = {len(x) for x in per_layer}
            if len(counts) != 1:
                raise TraceError(f"step {step} rank {rank}: layers route different numbers of tokens "
                                 f"({sorted(counts)})")
            ids = np.stack([x.reshape(-1, k) for x in per_layer])
            srt = np.sort(ids, axis=2)
            if np.any(srt[:, :, 1:] == srt[:, :, :-1]):
                raise TraceError(f"step {step} rank {rank}: a token chooses the same expert twice")
            ids_parts.append(ids)
            origin_parts.append(np.full(ids.shape[1], rank, dtype=np.int64))
        out.append((np.concatenate(ids_parts, axis=1), None, np.concatenate(origin_parts), None))
    return out
