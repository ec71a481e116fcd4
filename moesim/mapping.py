"""The expert mapping contract: which logical expert lives in which physical slot, per MoE layer.

Convention (DeepSeek's EPLB and vLLM): ``phy2log[layer, slot]`` is the logical expert held in physical
slot ``slot``; slots are split evenly over GPUs in order (GPU ``g`` holds slots ``g*S .. g*S+S-1``).
More slots than logical experts means redundant replicas. ``log2phy`` and ``logcnt`` are derived.

On disk: JSON ``{"format": "moesim.mapping", "version": 1, "num_gpus", "num_experts", "phy2log", ...}``,
written atomically and validated on load. SGLang's ``--init-expert-location`` file
(``{"physical_to_logical_map": [[...]]}``, JSON or a torch ``.pt``; one row per decoder layer) is exported and
imported too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import MappingError, MoesimError
from moesim.io import atomic_path, atomic_write_text, check_file, read_json
from moesim.models import ModelSpec

FORMAT = "moesim.mapping"
VERSION = 1


@dataclass(frozen=True, eq=False)
class ExpertMapping:
    """phy2log [layers, slots] int64 plus the cluster's GPU count; validated at construction."""

    phy2log: np.ndarray
    num_gpus: int
    num_experts: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        p2l = np.asarray(self.phy2log)
        if p2l.ndim != 2 or p2l.shape[0] < 1 or p2l.shape[1] < 1:
            raise MappingError(f"phy2log must be a non-empty [layers, slots] table, got shape {p2l.shape}")
        if not np.issubdtype(p2l.dtype, np.integer) and (p2l.dtype == object or not np.all(np.mod(p2l, 1) == 0)):
            raise MappingError("phy2log must hold integer expert ids")
        p2l = p2l.astype(np.int64)
        object.__setattr__(self, "phy2log", p2l)
        p2l.setflags(write=False)
        if not isinstance(self.num_gpus, (int, np.integer)) or self.num_gpus < 1:
            raise MappingError(f"num_gpus must be a positive integer, got {self.num_gpus!r}")
        if not isinstance(self.num_experts, (int, np.integer)) or self.num_experts < 1:
            raise MappingError(f"num_experts must be a positive integer, got {self.num_experts!r}")
        slots = p2l.shape[1]
        if slots % self.num_gpus:
            raise MappingError(f"{slots} physical slots per layer are not divisible by {self.num_gpus} GPUs")
        bad = np.argwhere((p2l < 0) | (p2l >= self.num_experts))
        if len(bad):
            layer, slot = bad[0]
            raise MappingError(f"layer {layer} slot {slot}: expert id {p2l[layer, slot]} is out of range "
                               f"[0, {self.num_experts})")
        counts = self.logcnt
        missing = np.argwhere(counts == 0)
        if len(missing):
            layer, expert = missing[0]
            raise MappingError(f"layer {layer}: logical expert {expert} is held by no slot "
                               f"({len(missing)} (layer, expert) pairs unplaced in all)")

    # -- shape ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.num_gpus

    @property
    def num_redundant(self) -> int:
        return self.num_slots - self.num_experts

    # -- derived tables -----------------------------------------------------------------------
    @cached_property
    def logcnt(self) -> np.ndarray:
        """[layers, experts]: how many slots hold each logical expert (read-only, computed once)."""
        cnt = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        rows = np.repeat(np.arange(self.num_layers), self.num_slots)
        np.add.at(cnt, (rows, self.phy2log.ravel()), 1)
        cnt.setflags(write=False)
        return cnt

    @cached_property
    def log2phy(self) -> np.ndarray:
        """[layers, experts, max_replicas]: the slots of each logical expert in slot order, padded with -1."""
        cnt = self.logcnt
        width = int(cnt.max())
        out = np.full((self.num_layers, self.num_experts, width), -1, dtype=np.int64)
        for layer in range(self.num_layers):
            order = np.argsort(self.phy2log[layer], kind="stable")
            experts = self.phy2log[layer, order]
            starts = np.searchsorted(experts, np.arange(self.num_experts))
            rank = np.arange(self.num_slots) - starts[experts]
            out[layer, experts, rank] = order
        out.setflags(write=False)
        return out

    def slot_gpu(self) -> np.ndarray:
        """[slots]: the GPU that owns each physical slot."""
        return np.arange(self.num_slots) // self.slots_per_gpu

    def gpu_experts(self, layer: int, gpu: int) -> np.ndarray:
        """Logical experts held by ``gpu`` in ``layer``, in slot order (repeats possible)."""
        s = self.slots_per_gpu
        return self.phy2log[layer, gpu * s:(gpu + 1) * s]

    def check_model(self, model: ModelSpec) -> None:
        """Raise if this mapping was made for a model of another shape."""
        if self.num_layers != model.num_layers:
            raise MappingError(f"mapping has {self.num_layers} layers but model {model.name!r} has {model.num_layers}")
        if self.num_experts != model.num_experts:
            raise MappingError(f"mapping has {self.num_experts} experts but model {model.name!r} has "
                               f"{model.num_experts}")

    def check_gpus(self, num_gpus: int) -> None:
        if self.num_gpus != num_gpus:
            raise MappingError(f"mapping is for {self.num_gpus} GPUs but the cluster has {num_gpus}")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ExpertMapping) and self.num_gpus == other.num_gpus
                and self.num_experts == other.num_experts and np.array_equal(self.phy2log, other.phy2log))

    __hash__ = None  # type: ignore[assignment]

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def linear(cls, num_layers: int, num_experts: int, num_gpus: int,
               slots_per_gpu: int | None = None) -> ExpertMapping:
        """vLLM's ``linear`` strategy: contiguous experts per GPU; extra slots replicate experts 0, 1, ... ."""
        slots = _slots(num_experts, num_gpus, slots_per_gpu)
        row = np.arange(slots) % num_experts
        return cls(np.tile(row, (num_layers, 1)), num_gpus, num_experts, {"algo": "linear"})

    @classmethod
    def round_robin(cls, num_layers: int, num_experts: int, num_gpus: int,
                    slots_per_gpu: int | None = None) -> ExpertMapping:
        """vLLM's ``round_robin`` strategy: expert e goes to GPU e % num_gpus.

        vLLM defines it without redundancy; extra slots continue the deal with experts 0, 1, ..., each copy going
        to the next GPU (cyclically) that has a free slot and does not already hold that expert — a replica on
        its original's GPU would share nothing.
        """
        slots = _slots(num_experts, num_gpus, slots_per_gpu)
        s = slots // num_gpus
        held: list[list[int]] = [[] for _ in range(num_gpus)]
        for e in range(num_experts):
            held[e % num_gpus].append(e)
        g = num_experts % num_gpus
        for j in range(slots - num_experts):
            e = j % num_experts
            free = [(g + t) % num_gpus for t in range(num_gpus) if len(held[(g + t) % num_gpus]) < s]
            c = next((c for c in free if e not in held[c]), free[0])
            held[c].append(e)
            g = (c + 1) % num_gpus
        row = np.array([e for h in held for e in h], dtype=np.int64)
        return cls(np.tile(row, (num_layers, 1)), num_gpus, num_experts, {"algo": "round_robin"})

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "num_gpus": int(self.num_gpus),
                "num_experts": int(self.num_experts), "num_layers": self.num_layers,
                "slots_per_gpu": self.slots_per_gpu, "meta": self.meta, "phy2log": self.phy2log.tolist()}

    @classmethod
    def from_dict(cls, data: Any, source: str = "mapping") -> ExpertMapping:
        if not isinstance(data, dict):
            raise MappingError(f"{source}: expected a JSON object")
        if "physical_to_logical_map" in data and "format" not in data:
            raise MappingError(f"{source}: this is an SGLang expert-location file; "
                               "import it with from_sglang (or `--mapping-format sglang`)")
        if data.get("format") != FORMAT:
            raise MappingError(f"{source}: not a moesim mapping (format is {data.get('format')!r})")
        version = data.get("version")
        if not isinstance(version, int) or version > VERSION or version < 1:
            raise MappingError(f"{source}: unsupported mapping version {version!r} (this moesim reads up to {VERSION})")
        for key in ("num_gpus", "num_experts", "phy2log"):
            if key not in data:
                raise MappingError(f"{source}: missing field {key!r}")
        for key in ("num_gpus", "num_experts"):
            if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 1:
                raise MappingError(f"{source}: {key} must be a positive integer, got {data[key]!r}")
        meta = data.get("meta") or {}
        if not isinstance(meta, dict):
            raise MappingError(f"{source}: meta must be a JSON object, got {type(meta).__name__}")
        p2l = _table(data["phy2log"], source)
        mapping = cls(p2l, data["num_gpus"], data["num_experts"], dict(meta))
        for key, value in (("num_layers", mapping.num_layers), ("slots_per_gpu", mapping.slots_per_gpu)):
            if key in data and data[key] != value:
                raise MappingError(f"{source}: {key} says {data[key]} but phy2log gives {value}")
        return mapping

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | Path, model: ModelSpec | None = None, num_gpus: int | None = None) -> ExpertMapping:
        """Read a moesim mapping (or an SGLang expert-location ``.json`` / ``.pt``, detected by its key) and
        validate it."""
        data = _read_pt(path) if str(path).lower().endswith(".pt") else read_json(path, "mapping")
        try:
            if isinstance(data, dict) and "physical_to_logical_map" in data and "format" not in data:
                if model is None or num_gpus is None:
                    raise MappingError(f"{path}: an SGLang mapping needs the model and GPU count to be read")
                mapping = cls.from_sglang(data, num_gpus=num_gpus, num_experts=model.num_experts,
                                          num_layers=model.num_layers, num_dense_layers=model.num_dense_layers)
            else:
                mapping = cls.from_dict(data, str(path))
            if model is not None:
                mapping.check_model(model)
            if num_gpus is not None:
                mapping.check_gpus(num_gpus)
        except MappingError as exc:
            msg = str(exc)
            raise MappingError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
        return mapping

    def to_sglang(self, num_dense_layers: int = 0) -> dict[str, Any]:
        """SGLang's ``--init-expert-location`` dict: ``physical_to_logical_map`` [decoder layers, physical experts].

        SGLang indexes the map by decoder layer (``ModelConfigForExpertLocation.num_layers`` is the HF config's
        ``num_hidden_layers``; DeepSeek-V3: 61 rows), so the ``num_dense_layers`` leading dense layers get rows too,
        filled as SGLang's ``ExpertLocationMetadata.init_trivial`` fills every layer (``arange(P) % E``; they hold
        no experts, the rows only have to be valid). The dict has that one key: SGLang passes it as keyword
        arguments to ``init_by_mapping`` (python/sglang/srt/eplb/expert_location.py)."""
        trivial = np.arange(self.num_slots) % self.num_experts
        rows = np.concatenate([np.tile(trivial, (num_dense_layers, 1)), self.phy2log]) if num_dense_layers \
            else self.phy2log
        return {"physical_to_logical_map": rows.tolist()}

    def save_sglang(self, path: str | Path, num_dense_layers: int = 0) -> None:
        """Write :meth:`to_sglang` as SGLang reads ``--init-expert-location``: ``.json`` (json.loads) or ``.pt``
        (``torch.load(weights_only=True)`` of a dict holding an int64 tensor); any other suffix is refused, as SGLang
        would parse the path itself as JSON text."""
        path = Path(path)
        data = self.to_sglang(num_dense_layers)
        suffix = path.suffix.lower()
        if suffix == ".json":
            atomic_write_text(path, json.dumps(data) + "\n")
        elif suffix == ".pt":
            try:
                import torch
            except ImportError:
                raise MappingError(f"writing {path.name} (a torch .pt file) needs torch; write a .json instead "
                                   "(SGLang reads both)") from None
            with atomic_path(path) as tmp:
                torch.save({"physical_to_logical_map": torch.tensor(data["physical_to_logical_map"],
                                                                    dtype=torch.int64)}, str(tmp))
        else:
            raise MappingError(f"SGLang's --init-expert-location reads .json or .pt files, not {path.name!r}")

    @classmethod
    def from_sglang(cls, data: Any, num_gpus: int, num_experts: int, num_layers: int | None = None,
                    num_dense_layers: int = 0) -> ExpertMapping:
        """An SGLang expert-location dict → mapping. A map over all decoder layers (``num_dense_layers +
        num_layers`` rows, as SGLang writes it) loses its leading dense rows; ``num_layers`` rows are taken as is."""
        if not isinstance(data, dict) or "physical_to_logical_map" not in data:
            raise MappingError("SGLang expert location must be a JSON object with 'physical_to_logical_map'")
        raw = data["physical_to_logical_map"]
        if hasattr(raw, "detach") and hasattr(raw, "numpy"):  # a torch tensor from a .pt file
            raw = raw.detach().cpu().numpy()
        table = _table(raw, "physical_to_logical_map")
        meta: dict[str, Any] = {"source": "sglang"}
        if num_layers is not None and num_dense_layers and len(table) == num_layers + num_dense_layers:
            table = table[num_dense_layers:]
            meta["dropped_dense_rows"] = num_dense_layers
        elif num_layers is not None and len(table) != num_layers:
            want = f"{num_layers} MoE layers" + (f" ({num_layers + num_dense_layers} decoder layers)"
                                                 if num_dense_layers else "")
            raise MappingError(f"physical_to_logical_map has {len(table)} layers (rows); the model has {want}")
        return cls(table, num_gpus, num_experts, meta)


def _read_pt(path: str | Path) -> Any:
    """An SGLang ``.pt`` expert-location dict, read with ``torch.load(weights_only=True)`` only."""
    try:
        path = check_file(path, "mapping")
    except MoesimError as exc:
        raise MappingError(str(exc)) from None
    try:
        import torch
    except ImportError:
        raise MappingError(f"reading {Path(path).name} (a torch .pt file) needs torch") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MappingError(f"{path} is not a readable torch file (weights_only): {msg[:200]}") from None


def _slots(num_experts: int, num_gpus: int, slots_per_gpu: int | None) -> int:
    if slots_per_gpu is None:
        if num_experts % num_gpus:
            raise MappingError(f"{num_experts} experts do not divide over {num_gpus} GPUs; "
                               "give slots per GPU (redundant slots) explicitly")
        slots_per_gpu = num_experts // num_gpus
    slots = slots_per_gpu * num_gpus
    if slots < num_experts:
        raise MappingError(f"{num_gpus} GPUs × {slots_per_gpu} slots = {slots} slots cannot hold "
                           f"{num_experts} experts")
    return slots


def _table(value: Any, source: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except ValueError:
        raise MappingError(f"{source}: phy2log rows have different lengths") from None
    if arr.dtype == object or arr.ndim != 2:
        raise MappingError(f"{source}: phy2log must be a rectangular [layers][slots] list of integers")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or
                         (np.issubdtype(arr.dtype, np.floating) and np.all(np.abs(arr) < 2**53) and
                          np.all(np.mod(arr, 1) == 0))):
        raise MappingError(f"{source}: phy2log must hold integer expert ids")
    return arr.astype(np.int64)
