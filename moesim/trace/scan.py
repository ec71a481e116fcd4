"""The structure of a trace file, checked as it is opened: header fields and size bounds, then a walk over the
chunk headers and directories (metadata only, plus each chunk's small step_tokens) that stops at the first chunk
cut short or malformed and says why. The reader (:mod:`moesim.trace.reader`) hands out data only from what this
accepted.
"""

from __future__ import annotations

import json
import math
import mmap
from typing import Any

import numpy as np

from moesim.errors import MoesimError
from moesim.models import ModelSpec
from moesim.trace import format as fmt

MAX_LAYERS = 1024
MAX_EXPERTS = 1 << 20
MAX_LAYER_EXPERTS = 1 << 22  # layers x experts: a [steps, L, E] int64 load of 8 steps is then at most 256 MiB
MAX_COUNT = 1 << 40  # token-choices per (step, layer, expert): sums over steps and experts stay far below 2**63


def check_model_size(spec: ModelSpec) -> None:
    """Refuse model shapes no real MoE has, before anything sized by them is allocated (a 400-byte file declaring
    2**31 experts would otherwise ask for tens of GB)."""
    if spec.num_layers > MAX_LAYERS:
        raise MoesimError(f"model has {spec.num_layers} MoE layers; at most {MAX_LAYERS} are supported")
    if spec.num_experts > MAX_EXPERTS:
        raise MoesimError(f"model has {spec.num_experts} experts; at most {MAX_EXPERTS} are supported")
    if spec.num_layers * spec.num_experts > MAX_LAYER_EXPERTS:
        raise MoesimError(f"model has {spec.num_layers} layers x {spec.num_experts} experts; at most "
                          f"{MAX_LAYER_EXPERTS} (layer, expert) pairs are supported")


def check_header(header: Any) -> None:
    if not isinstance(header, dict):
        raise MoesimError("header is not a JSON object")
    if header.get("format") != "moesim.trace":
        raise MoesimError(f"format is {header.get('format')!r}, not 'moesim.trace'")
    if header.get("kind") not in fmt.KINDS:
        raise MoesimError(f"unknown trace kind {header.get('kind')!r}")
    model = header.get("model")
    if isinstance(model, dict) and not isinstance(model.get("name"), str):
        raise MoesimError(f"model name must be a string, got {model.get('name')!r}")
    spec = ModelSpec.from_dict(model)
    check_model_size(spec)
    phases = header.get("timing_phases")
    if phases is not None and not (isinstance(phases, list) and all(isinstance(p, str) for p in phases)):
        raise MoesimError("timing_phases must be a list of names")
    ranks = header.get("num_ranks")
    if ranks is not None and (not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1):
        raise MoesimError(f"num_ranks must be a positive integer, got {ranks!r}")
    if header.get("ids_dtype", "<u2") not in fmt.ARRAY_DTYPES["ids"]:
        raise MoesimError(f"ids_dtype {header.get('ids_dtype')!r} is not one of {fmt.ARRAY_DTYPES['ids']}")
    if header.get("weights_dtype") not in (None, *fmt.ARRAY_DTYPES["weights"]):
        raise MoesimError(f"weights_dtype {header.get('weights_dtype')!r} is not one of {fmt.ARRAY_DTYPES['weights']}")
    if not isinstance(header.get("has_origin", False), bool):
        raise MoesimError("has_origin must be true or false")
    if not isinstance(header.get("meta") or {}, dict):
        raise MoesimError("meta must be a JSON object")


def scan(mm: mmap.mmap, offset: int, size: int,
          header: dict[str, Any]) -> tuple[list[dict[str, Any]], int, str | None]:
    """Walk the chunk headers; stop at the first chunk that is cut short or malformed and say why."""
    chunks: list[dict[str, Any]] = []
    next_step = 0
    while offset < size:
        where = f"chunk {len(chunks)} at byte {offset}"
        done = f"; the {len(chunks)} complete chunks before it ({next_step} steps) were read"
        if size - offset < fmt.CHUNK_HEAD.size:
            return chunks, offset, f"{where} is cut short inside its header{done}"
        magic, dlen, plen, crc, _ = fmt.CHUNK_HEAD.unpack_from(mm, offset)
        if magic != fmt.CHUNK_MAGIC:
            return chunks, offset, f"{where} has bad magic bytes (corrupt file){done}"
        dir_start = offset + fmt.CHUNK_HEAD.size
        payload = dir_start + dlen
        if payload + plen > size:
            have = size - offset
            need = fmt.CHUNK_HEAD.size + dlen + plen
            return chunks, offset, f"{where} is cut short ({have} of {need} bytes){done}"
        try:
            directory = json.loads(bytes(mm[dir_start:payload]))
            chunk = _check_directory(directory, plen, header)
            _check_shapes(chunk["arrays"], chunk["num_steps"], header, mm, payload)
        except (ValueError, MoesimError) as exc:
            return chunks, offset, f"{where} has a malformed directory ({exc}){done}"
        if chunk["first_step"] != next_step:
            return chunks, offset, f"{where} starts at step {chunk['first_step']}, expected {next_step}{done}"
        chunk.update(dir_start=dir_start, payload=payload, payload_len=plen, crc=crc)
        chunks.append(chunk)
        next_step += chunk["num_steps"]
        offset = payload + plen
    return chunks, offset, None


def _check_directory(d: Any, payload_len: int, header: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(d, dict) or not isinstance(d.get("arrays"), dict):
        raise MoesimError("directory is not an object with arrays")
    first, n = d.get("first_step"), d.get("num_steps")
    if not isinstance(first, int) or not isinstance(n, int) or first < 0 or n < 0:
        raise MoesimError("bad step range")
    for name, spec in d["arrays"].items():
        if name not in fmt.ARRAY_DTYPES:
            raise MoesimError(f"unknown array {name!r}")
        if not (isinstance(spec, list) and len(spec) == 3):
            raise MoesimError(f"bad spec for {name}")
        dtype, shape, off = spec
        if dtype not in fmt.ARRAY_DTYPES[name]:
            raise MoesimError(f"array {name} has dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise MoesimError(f"array {name} has a bad shape")
        if not isinstance(off, int) or off < 0 or off % fmt.ALIGN or \
                off + math.prod(shape) * np.dtype(dtype).itemsize > payload_len:
            raise MoesimError(f"array {name} lies outside the chunk")
    arrays = d["arrays"]
    if n:
        need = ("phase", "counts") if header["kind"] == "counts" else ("phase", "step_tokens", "ids")
        missing = [a for a in need if a not in arrays]
        if missing:
            raise MoesimError(f"missing arrays {missing}")
        if arrays["phase"][1] != [n]:
            raise MoesimError("phase length differs from num_steps")
        if "step_tokens" in arrays and arrays["step_tokens"][1] != [n]:
            raise MoesimError("step_tokens length differs from num_steps")
        if "kv_len" in arrays and arrays["kv_len"][1] != [n]:
            raise MoesimError("kv_len length differs from num_steps")
    return {"first_step": first, "num_steps": n, "arrays": arrays}


def _check_shapes(arrays: dict[str, Any], n: int, header: dict[str, Any], mm: mmap.mmap, payload: int) -> None:
    """Check a chunk's arrays against the header's model and records (metadata only, plus the small step_tokens).

    Why here: a chunk whose ids have another top-k or layer count would otherwise be sliced silently wrong.
    """
    model = ModelSpec.from_dict(header["model"])
    L, E, k = model.num_layers, model.num_experts, model.top_k

    def shape(name: str) -> list[int] | None:
        return arrays[name][1] if name in arrays else None

    if "ids" in arrays:
        if arrays["ids"][0] != header.get("ids_dtype", arrays["ids"][0]):
            raise MoesimError(f"ids dtype {arrays['ids'][0]} differs from the header's {header.get('ids_dtype')}")
        if "step_tokens" not in arrays:
            raise MoesimError("ids without step_tokens")
        dtype, st_shape, off = arrays["step_tokens"]
        step_tokens = np.frombuffer(mm, dtype=np.dtype(dtype), count=st_shape[0], offset=payload + off)
        if step_tokens.size and int(step_tokens.min()) < 0:
            raise MoesimError("negative token count")
        if step_tokens.size and int(step_tokens.max()) > MAX_COUNT:
            raise MoesimError(f"a step's token count {int(step_tokens.max())} exceeds {MAX_COUNT}")
        T = int(step_tokens.sum())
        if shape("ids") != [L, T, k]:
            raise MoesimError(f"ids shape {shape('ids')} is not [layers {L}, tokens {T}, top-k {k}]")
        for name in ("weights",):
            if name in arrays and shape(name) != [L, T, k]:
                raise MoesimError(f"{name} shape {shape(name)} differs from ids shape {[L, T, k]}")
        if "origin" in arrays and shape("origin") != [T]:
            raise MoesimError(f"origin shape {shape('origin')} is not [tokens {T}]")
    elif n and header["kind"] == "tokens":
        raise MoesimError("no ids in a token trace's chunk")
    if "counts" in arrays and shape("counts") != [n, L, E]:
        raise MoesimError(f"counts shape {shape('counts')} is not [steps {n}, layers {L}, experts {E}]")
    if "timing_index" in arrays:
        names = ("timing_index", "timing_phases", "timing_experts", "timing_tokens")
        shapes = [shape(a) for a in names]
        if any(sh is None or len(sh) != 2 for sh in shapes):
            raise MoesimError("incomplete timing records")
        N, P = shapes[0][0], len(header.get("timing_phases") or ())
        if shapes[0] != [N, 3] or shapes[1] != [N, P] or shapes[2] != shapes[3] or shapes[2][0] != N:
            raise MoesimError(f"timing arrays of shapes {shapes} do not fit {N} records of {P} phases")
