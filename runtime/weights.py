"""Where the weights come from: a seed (identical on every rank) or a local Hugging Face safetensors folder.

Both sources answer by Mixtral tensor name (``model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight`` ...),
so the model builder and the live remapper never care which one they read. A seeded tensor is drawn from its
own generator seeded by (seed, name): every rank gets the same numbers for the experts it holds without
drawing the ones it does not. Seeded tensors are drawn *on the device* the source is given (a generator per
tensor on that device), so a GPU run does not wait for the host to draw billions of numbers (benchmarks/
bench_runtime.py measures the start). The numbers depend on the device type (CPU and CUDA generators differ),
not on the rank: every GPU of one kind draws the same tensor for the same (seed, name), so replicas and live
remaps agree across ranks. A safetensors source opens only the tensors asked for (``safe_open`` reads lazily),
so each rank loads only the experts its mapping gives it.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch
from moesim.runtime.config import check_checkpoint, expected_tensors

from moesim.errors import MoesimError
from moesim.models import ModelSpec


def expert_name(layer: int, expert: int, which: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{which}.weight"


class WeightSource:
    """Tensors by Mixtral name, as float32 tensors on ``device`` of the shapes in
    ``moesim.runtime.config.expected_tensors``."""

    def __init__(self, model: ModelSpec, device: torch.device | str | None = None) -> None:
        self.model = model
        self.shapes = expected_tensors(model)
        self.device = torch.device("cpu" if device is None else device)

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2F, H] = gate rows (w1) then up rows (w3), w2 [H, F]) of one logical expert."""
        w1 = self.get(expert_name(layer, expert, "w1"))
        w3 = self.get(expert_name(layer, expert, "w3"))
        return torch.cat([w1, w3], dim=0), self.get(expert_name(layer, expert, "w2"))


class SeededWeights(WeightSource):
    """Random weights drawn per tensor from a generator seeded by (seed, name), scaled to keep activations O(1)."""

    def __init__(self, model: ModelSpec, seed: int = 0, device: torch.device | str | None = None) -> None:
        super().__init__(model, device)
        self.seed = seed

    def get(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise MoesimError(f"model {self.model.name!r} has no tensor {name}")
        shape = self.shapes[name]
        gen = torch.Generator(device=self.device).manual_seed(zlib.crc32(f"{self.seed}:{name}".encode()))
        x = torch.randn(shape, generator=gen, dtype=torch.float32, device=self.device)
        if name.endswith("norm.weight"):
            return 1.0 + 0.1 * x
        if name.endswith("e_score_correction_bias"):
            return 0.1 * x
        if name == "model.embed_tokens.weight":
            return x
        return x / math.sqrt(shape[-1])  # [out, in]: std 1/sqrt(fan_in)


class SafetensorsWeights(WeightSource):
    """Tensors read on demand from a Hugging Face safetensors folder (shapes checked up front)."""

    def __init__(self, model: ModelSpec, folder: str | Path, device: torch.device | str | None = None) -> None:
        super().__init__(model, device)
        self.folder = Path(folder)
        self.where = check_checkpoint(folder, model)
        self._open: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor:
        from moesim.runtime.checkpoint import fused_location
        from safetensors import safe_open

        stored, expert, rows = name, None, None
        if name not in self.where:  # transformers-5 fused experts: one expert's rows of a [E, ...] tensor
            loc = fused_location(name, self.model.ffn_size)
            if loc is None or loc[0] not in self.where:
                raise MoesimError(f"checkpoint {self.folder} has no tensor {name}")
            stored, expert, rows = loc
        path = self.where[stored]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt", device=str(self.device))
        sl = self._open[path].get_slice(stored)  # type: ignore[attr-defined]
        if expert is None:
            t = sl[:]  # reads only this tensor's bytes
        elif rows is None:
            t = sl[expert:expert + 1][0]
        else:
            t = sl[expert:expert + 1, rows[0]:rows[1]][0]
        if tuple(t.shape) != self.shapes[name]:
            raise MoesimError(f"checkpoint tensor {name} has shape {list(t.shape)}, expected {list(self.shapes[name])}")
        return t.to(torch.float32)


def weight_source(model: ModelSpec, checkpoint: str | Path | None, seed: int,
                  device: torch.device | str | None = None) -> WeightSource:
    """Seeded (``checkpoint`` None) or safetensors weights, delivered on ``device`` (default: CPU)."""
    if checkpoint is None:
        return SeededWeights(model, seed, device)
    return SafetensorsWeights(model, checkpoint, device)


def save_checkpoint(source: WeightSource, folder: str | Path, dtype: torch.dtype = torch.float32,
                    shard_every: int = 0) -> None:
    """Write every tensor of ``source`` as a Mixtral-named safetensors folder (tests, conversions).

    ``shard_every`` > 0 splits the tensors over several files (``model-0000i.safetensors``), as hub checkpoints are.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(source.shapes)
    groups = [names] if shard_every <= 0 else [names[i:i + shard_every] for i in range(0, len(names), shard_every)]
    for i, group in enumerate(groups):
        tensors = {n: source.get(n).to(device="cpu", dtype=dtype).contiguous() for n in group}
        save_file(tensors, str(folder / f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"))
