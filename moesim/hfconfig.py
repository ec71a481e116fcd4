"""Model shapes from a Hugging Face ``config.json``: Mixtral, DeepSeek-V3/R1, Qwen2-MoE, Qwen3-MoE, OLMoE.

The field names are the ones the transformers configuration classes define and the published ``config.json``
files carry (huggingface/transformers ``src/transformers/models/<arch>/configuration_<arch>.py``):

- ``mixtral`` (MixtralConfig): num_hidden_layers, num_local_experts, num_experts_per_tok, hidden_size,
  intermediate_size (the expert FFN), num_attention_heads, num_key_value_heads, head_dim (None: hidden /
  heads), vocab_size, sliding_window. Every layer is MoE; softmax router.
- ``deepseek_v3`` (DeepseekV3Config; DeepSeek-V3 and R1 share it): n_routed_experts, n_shared_experts,
  moe_intermediate_size (routed and each shared expert), intermediate_size (the dense layers'), first_k_dense_replace
  (leading dense layers; DeepSeek's own modelling also reads moe_layer_freq, default 1), n_group, topk_group,
  routed_scaling_factor, q_lora_rank (None: plain query projection), kv_lora_rank, qk_nope_head_dim,
  qk_rope_head_dim, v_head_dim. Sigmoid router with group-limited top-k. The multi-token-prediction layers
  (num_nextn_predict_layers) are not part of a decode step and are left out.
- ``qwen2_moe`` (Qwen2MoeConfig): num_experts, num_experts_per_tok, moe_intermediate_size, one shared expert of
  shared_expert_intermediate_size, intermediate_size (dense layers), decoder_sparse_step and mlp_only_layers
  (layer i is MoE when i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0), sliding_window only
  when use_sliding_window.
- ``qwen3_moe`` (Qwen3MoeConfig): as Qwen2-MoE without the shared expert; head_dim explicit in the released files.
- ``olmoe`` (OlmoeConfig): num_experts, num_experts_per_tok, intermediate_size (the expert FFN); every layer MoE.

rope_theta: top-level in the released files, inside ``rope_parameters`` in transformers 5 (both read).
Precisions: ``torch_dtype`` (``dtype`` in transformers 5) gives the activation and weight element size;
``quantization_config`` with ``quant_method: fp8`` gives FP8 weights, with ``weight_block_size [bh, bw]`` one
float32 scale per block (DeepSeek-V3's ``weight_scale_inv``; vLLM's ``BlockQuantScaleParameter``).
Dense layers that are not in front (Qwen ``mlp_only_layers``) are counted in ``num_dense_layers`` all the same:
the simulator charges dense layers per step, not by position.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moesim.errors import MoesimError
from moesim.models import DTYPE_BYTES, ModelSpec

ARCHITECTURES = ("mixtral", "deepseek_v3", "qwen2_moe", "qwen3_moe", "olmoe")
_TORCH_DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}


def read_hf_config(source: Any) -> tuple[dict[str, Any], str]:
    """(parsed config, label): ``source`` is a dict, a ``config.json`` path or the folder holding one."""
    if isinstance(source, dict):
        return source, str(source.get("_name_or_path") or source.get("model_type") or "hf-model")
    from moesim.io import read_json

    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise MoesimError(f"model config {path} does not exist")
    data = read_json(path, "model config")
    if not isinstance(data, dict):
        raise MoesimError(f"{path}: a Hugging Face config.json must hold a JSON object")
    folder = path.parent.resolve().name
    label = data.get("_name_or_path") or (folder if path.name == "config.json" and folder else path.stem)
    return data, str(label)


class _Fields:
    """Typed reads of one config dict; every problem names the file and the field."""

    def __init__(self, cfg: dict[str, Any], where: str) -> None:
        self.cfg, self.where = cfg, where

    def int(self, key: str, default: Any = ..., lo: int = 1) -> int:
        v = self.cfg.get(key, default)
        if v is ...:
            raise MoesimError(f"{self.where}: config lacks {key!r}")
        if v is None and default is None:
            return 0
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise MoesimError(f"{self.where}: {key} must be an integer >= {lo}, got {v!r}")
        return v

    def num(self, key: str, default: float) -> float:
        v = self.cfg.get(key, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MoesimError(f"{self.where}: {key} must be a number, got {v!r}")
        return float(v)


def _rope_theta(cfg: dict[str, Any], f: _Fields, default: float) -> float:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("rope_theta"), (int, float)):
        return float(params["rope_theta"])
    return f.num("rope_theta", default)


def _precisions(cfg: dict[str, Any], where: str) -> dict[str, float]:
    """act_bytes, bytes_per_param (weights) and kv_bytes from torch_dtype / dtype and quantization_config."""
    name = cfg.get("torch_dtype", cfg.get("dtype")) or "bfloat16"
    if name not in _TORCH_DTYPES:
        raise MoesimError(f"{where}: torch_dtype {name!r} is not one of {', '.join(_TORCH_DTYPES)}")
    act = _TORCH_DTYPES[name]
    weights = float(act)
    q = cfg.get("quantization_config")
    if q is not None:
        if not isinstance(q, dict):
            raise MoesimError(f"{where}: quantization_config must be an object")
        method = q.get("quant_method")
        if method != "fp8":
            raise MoesimError(f"{where}: quantization_config quant_method {method!r} is not supported (fp8 is)")
        block = q.get("weight_block_size")
        if block is None:
            weights = DTYPE_BYTES["fp8"]
        elif (isinstance(block, list) and len(block) == 2
              and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            weights = 1.0 + 4.0 / (block[0] * block[1])  # one float32 scale per block
        else:
            raise MoesimError(f"{where}: weight_block_size must be two positive integers, got {block!r}")
    return {"act_bytes": act, "bytes_per_param": weights, "kv_bytes": float(act)}


def _moe_layer_split(f: _Fields, cfg: dict[str, Any], layers: int) -> int:
    """Qwen2/3-MoE: how many of ``layers`` are MoE (decoder_sparse_step, mlp_only_layers)."""
    step = f.int("decoder_sparse_step", 1)
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise MoesimError(f"{f.where}: mlp_only_layers must be a list of layer indices")
    return sum(1 for i in range(layers) if i not in only and (i + 1) % step == 0)


def spec_from_hf_config(source: Any, name: str | None = None) -> ModelSpec:
    """:class:`ModelSpec` of a Hugging Face ``config.json`` (path, folder or dict); see the module docstring."""
    cfg, label = read_hf_config(source)
    where = str(source) if not isinstance(source, dict) else label
    arch = cfg.get("model_type")
    if arch not in ARCHITECTURES:
        raise MoesimError(f"{where}: model_type {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    f = _Fields(cfg, where)
    H = f.int("hidden_size")
    layers = f.int("num_hidden_layers")
    heads = f.int("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    common: dict[str, Any] = {"name": name or label.rstrip("/").split("/")[-1].lower(), "hidden_size": H,
                              "num_attention_heads": heads, "vocab_size": f.int("vocab_size"),
                              "top_k": f.int("num_experts_per_tok"), **_precisions(cfg, where)}
    if not isinstance(kv_heads, int) or isinstance(kv_heads, bool) or kv_heads < 1:
        raise MoesimError(f"{where}: num_key_value_heads must be a positive integer, got {kv_heads!r}")
    head_dim = cfg.get("head_dim") or H // heads
    if arch == "deepseek_v3":
        nope, rope, v = f.int("qk_nope_head_dim"), f.int("qk_rope_head_dim"), f.int("v_head_dim")
        first_dense = f.int("first_k_dense_replace", 0, lo=0)
        freq = f.int("moe_layer_freq", 1)
        moe = sum(1 for i in range(layers) if i >= first_dense and i % freq == 0)
        groups = f.int("n_group", 1)
        shared = f.int("n_shared_experts", None, lo=0)
        return ModelSpec(**common, num_layers=moe, num_experts=f.int("n_routed_experts"),
                         ffn_size=f.int("moe_intermediate_size"), num_kv_heads=heads, head_dim=nope + rope,
                         rope_theta=_rope_theta(cfg, f, 1.0e4), num_dense_layers=layers - moe,
                         dense_ffn_size=f.int("intermediate_size") if layers > moe else 0,
                         num_shared_experts=shared, router="sigmoid_grouped" if groups > 1 else "softmax",
                         num_groups=groups, topk_groups=f.int("topk_group", 1),
                         routed_scaling_factor=f.num("routed_scaling_factor", 1.0),
                         q_lora_rank=f.int("q_lora_rank", None), kv_lora_rank=f.int("kv_lora_rank"),
                         qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v)
    attn = {"num_kv_heads": kv_heads, "head_dim": head_dim}
    if arch == "mixtral":
        window = cfg.get("sliding_window")
        return ModelSpec(**common, **attn, num_layers=layers, num_experts=f.int("num_local_experts"),
                         ffn_size=f.int("intermediate_size"), rope_theta=_rope_theta(cfg, f, 1.0e6),
                         sliding_window=f.int("sliding_window") if window else None)
    if arch == "olmoe":
        return ModelSpec(**common, **attn, num_layers=layers, num_experts=f.int("num_experts"),
                         ffn_size=f.int("intermediate_size"), rope_theta=_rope_theta(cfg, f, 1.0e4))
    # qwen2_moe / qwen3_moe
    moe = _moe_layer_split(f, cfg, layers)
    if moe == 0:
        raise MoesimError(f"{where}: no layer is an MoE layer (decoder_sparse_step / mlp_only_layers)")
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    shared = f.int("shared_expert_intermediate_size", 0, lo=0) if arch == "qwen2_moe" else 0
    return ModelSpec(**common, **attn, num_layers=moe, num_experts=f.int("num_experts"),
                     ffn_size=f.int("moe_intermediate_size"), rope_theta=_rope_theta(cfg, f, 1.0e6),
                     sliding_window=f.int("sliding_window") if window else None, num_dense_layers=layers - moe,
                     dense_ffn_size=f.int("intermediate_size") if layers > moe else 0,
                     num_shared_experts=1 if shared else 0, shared_ffn_size=shared)
