"""Hugging Face checkpoints: the model's shape from ``config.json`` and both Mixtral expert-tensor layouts (no torch).

Why: a checkpoint folder already says what model it holds, and transformers 5 stores Mixtral's experts fused.
The runtime asks for tensors by the classic Mixtral names (``moesim.runtime.config.expected_tensors``); this
module says where each lives in a checkpoint of either layout:

- classic (transformers 4, the hub's Mixtral files): ``model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight``
  [F, H] (gate), ``w3`` [F, H] (up), ``w2`` [H, F] (down), router ``block_sparse_moe.gate.weight`` [E, H];
- fused (transformers 5, ``MixtralExperts`` in src/transformers/models/mixtral/modeling_mixtral.py, converted by
  ``conversion_mapping.py``: w1 and w3 merged per expert then concatenated on dim 1):
  ``model.layers.{i}.mlp.experts.gate_up_proj`` [E, 2F, H] (rows 0..F-1 gate, F..2F-1 up: ``.chunk(2)`` gives
  gate, up), ``mlp.experts.down_proj`` [E, H, F], router ``mlp.gate.weight`` [E, H].
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from moesim.errors import MoesimError
from moesim.models import ModelSpec

_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")
_GATE = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.(weight|e_score_correction_bias)")

Location = tuple[str, int | None, tuple[int, int] | None]  # (stored name, expert index, row range)


def fused_location(name: str, ffn_size: int) -> Location | None:
    """Where a classic tensor name lives in a fused (transformers 5) checkpoint; None for names not renamed."""
    m = _EXPERT.fullmatch(name)
    if m:
        layer, expert, which = int(m[1]), int(m[2]), m[3]
        if which == "w2":
            return f"model.layers.{layer}.mlp.experts.down_proj", expert, None
        rows = (0, ffn_size) if which == "w1" else (ffn_size, 2 * ffn_size)
        return f"model.layers.{layer}.mlp.experts.gate_up_proj", expert, rows
    m = _GATE.fullmatch(name)
    if m:
        return f"model.layers.{m[1]}.mlp.gate.{m[2]}", None, None
    return None


def fused_shapes(model: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The fused tensors' names → shapes."""
    E, H, F = model.num_experts, model.hidden_size, model.ffn_size
    out: dict[str, tuple[int, ...]] = {}
    for i in range(model.num_layers):
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = (E, 2 * F, H)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = (E, H, F)
    return out


def read_config(folder: str | Path) -> dict[str, Any] | None:
    """``folder/config.json`` as a dict, None when the folder has none."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoesimError(f"{path} is not readable JSON: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(data, dict):
        raise MoesimError(f"{path} is not a JSON object")
    return data


def spec_from_checkpoint(folder: str | Path) -> ModelSpec:
    """The model of a checkpoint folder, from its ``config.json``.

    Uses :func:`moesim.models.spec_from_hf_config` where this moesim has it (every architecture the simulator's
    ``--model config.json`` knows); otherwise reads a Mixtral config (``model_type`` "mixtral") itself.
    """
    if not Path(folder).exists():
        raise MoesimError(f"checkpoint folder {folder} does not exist")
    if not Path(folder).is_dir():
        raise MoesimError(f"checkpoint {folder} is not a folder (give the folder holding *.safetensors)")
    data = read_config(folder)
    if data is None:
        raise MoesimError(f"checkpoint {folder} has no config.json: give --preset for its shape")
    try:
        from moesim.models import spec_from_hf_config  # type: ignore[attr-defined]
    except ImportError:
        return _mixtral_spec(data, Path(folder))
    return spec_from_hf_config(data, name=Path(folder).name)


def _mixtral_spec(cfg: dict[str, Any], folder: Path) -> ModelSpec:
    """Mixtral's config.json fields (transformers' MixtralConfig) → ModelSpec."""
    if cfg.get("model_type") != "mixtral":
        raise MoesimError(f"{folder}/config.json: model_type {cfg.get('model_type')!r}; this moesim reads Mixtral "
                          "configs (give --preset for other shapes)")
    need = ("num_hidden_layers", "num_local_experts", "num_experts_per_tok", "hidden_size", "intermediate_size",
            "num_attention_heads", "vocab_size")
    missing = [k for k in need if not isinstance(cfg.get(k), int)]
    if missing:
        raise MoesimError(f"{folder}/config.json lacks integer field(s) {', '.join(missing)}")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return ModelSpec(folder.name or "checkpoint", num_layers=cfg["num_hidden_layers"],
                     num_experts=cfg["num_local_experts"], top_k=cfg["num_experts_per_tok"],
                     hidden_size=cfg["hidden_size"], ffn_size=cfg["intermediate_size"], num_attention_heads=heads,
                     num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=int(head_dim),
                     vocab_size=cfg["vocab_size"], sliding_window=cfg.get("sliding_window"),
                     rope_theta=float(cfg.get("rope_theta", 1.0e6)))
