"""The on-disk layout of a moesim routing trace (``.mtrace``), version 1.

A trace is one file: a header, then chunks appended one after another. A writer that dies leaves a
prefix of the file, so every chunk that was fully written reads back; the cut one is reported.

    file header   b"MOESIMTR" | u32 version | u32 header_len | header JSON, zero-padded to 64 bytes
    chunk         b"MTCK" | u32 dir_len | u64 payload_len | u32 crc32(dir+payload) | u32 reserved
                  directory JSON (zero-padded so the payload starts 64-byte aligned) | payload

The directory names each array of the chunk: ``{"first_step": s, "arrays": {name: [dtype, shape, offset]}}``
with offsets relative to the payload, each 64-byte aligned so the reader can memory-map it in place.

Arrays of a chunk holding steps ``s .. s+S-1`` with ``T`` tokens in all:

    step_tokens  int64  [S]         tokens of each step
    phase        uint8  [S]         0 decode, 1 prefill, 255 unknown
    kv_len       f32    [S]         KV-cache positions each token of the step attends to, mean over its tokens
                                    (optional; NaN where unknown): what decode attention's cost grows with
    ids          uint16 [L, T, k]   top-k logical expert ids per layer (int32 when experts > 65535)
    weights      f16/32 [L, T, k]   router weights (optional)
    origin       uint16 [T]         origin rank of each token (optional)
    counts       int32  [S, L, E]   load-only traces: tokens per expert (instead of ids)
    timing_index int32  [N, 3]      (step, layer, rank) of each timing record (optional)
    timing_phases f64   [N, P]      seconds per phase, phases named by the header's ``timing_phases``
    timing_experts int32 [N, W]     logical expert of each local slot of that rank (-1 padding)
    timing_tokens int32 [N, W]      tokens that slot computed
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

MAGIC = b"MOESIMTR"
CHUNK_MAGIC = b"MTCK"
VERSION = 1
ALIGN = 64
FILE_HEAD = struct.Struct("<8sII")  # magic, version, header_len
CHUNK_HEAD = struct.Struct("<4sIQII")  # magic, dir_len, payload_len, crc32, reserved

PHASES = {"decode": 0, "prefill": 1, None: 255}
PHASE_NAMES = {v: k for k, v in PHASES.items()}
DEFAULT_TIMING_PHASES = ("attention", "gate", "dispatch", "expert", "combine")
KINDS = ("tokens", "counts")

# dtypes allowed per array: the reader refuses anything else, so a file cannot smuggle object arrays.
ARRAY_DTYPES: dict[str, tuple[str, ...]] = {
    "step_tokens": ("<i8",),
    "phase": ("|u1",),
    "kv_len": ("<f4",),
    "ids": ("<u2", "<i4"),
    "weights": ("<f2", "<f4"),
    "origin": ("<u2", "<i4"),
    "counts": ("<i4", "<i8"),
    "timing_index": ("<i4",),
    "timing_phases": ("<f8",),
    "timing_experts": ("<i4",),
    "timing_tokens": ("<i4",),
}


def pad(n: int) -> int:
    """Bytes of zero padding that bring ``n`` up to the next multiple of ALIGN."""
    return -n % ALIGN


def id_dtype(num_experts: int) -> np.dtype:
    return np.dtype("<u2") if num_experts <= 0xFFFF else np.dtype("<i4")


def origin_dtype(num_ranks: int | None) -> np.dtype:
    return np.dtype("<u2") if (num_ranks or 0) <= 0xFFFF else np.dtype("<i4")


def array_spec(arr: np.ndarray, offset: int) -> list[Any]:
    return [arr.dtype.str, list(arr.shape), offset]
