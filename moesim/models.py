"""Model shapes: the numbers every part of moesim agrees on (trace headers, cost model, runtime presets).

Sources (the models' published Hugging Face ``config.json`` files):
- Mixtral-8x7B:  mistralai/Mixtral-8x7B-v0.1 — 32 layers, 8 experts, top-2, hidden 4096, FFN 14336,
  32 query / 8 KV heads of 128, vocab 32000, rope_theta 1e6; the Mistral-7B lineage uses a 4096-token
  sliding window.
- Mixtral-8x22B: mistralai/Mixtral-8x22B-v0.1 — 56 layers, 8 experts, top-2, hidden 6144, FFN 16384,
  48 query / 8 KV heads of 128, vocab 32768.
- DeepSeek-V3:   deepseek-ai/DeepSeek-V3 — 61 layers of which the first 3 are dense (first_k_dense_replace=3),
  256 routed experts + 1 shared, top-8, hidden 7168, moe_intermediate_size 2048, dense FFN 18432,
  128 heads (MLA: kv_lora_rank 512, q_lora_rank 1536, qk_nope 128 + qk_rope 64, v_head 128),
  n_group 8, topk_group 4, sigmoid scoring with correction bias, routed_scaling_factor 2.5, vocab 129280.
- Qwen3-30B-A3B: Qwen/Qwen3-30B-A3B — 48 layers, 128 experts, top-8, hidden 2048, moe_intermediate 768,
  32 query / 4 KV heads of 128, vocab 151936.
- Qwen3-235B-A22B: Qwen/Qwen3-235B-A22B — 94 layers, 128 experts, top-8, hidden 4096,
  moe_intermediate 1536, 64 query / 4 KV heads of 128, vocab 151936.
- OLMoE-1B-7B:   allenai/OLMoE-1B-7B-0924 — 16 layers, 64 experts, top-8, hidden 2048, FFN 1024,
  16 heads of 128, vocab 50304 (shapes for the real statistics in ../shared/data/routing/).
- Switch-base-128: google/switch-base-128 — 6 MoE layers (every other encoder layer), 128 experts, top-1,
  d_model 768, d_ff 3072, 12 heads of 64, vocab 32128.
``tiny`` and ``small`` are moesim's own test shapes: a runtime model of these runs in seconds on a CPU.

Precisions: ``bytes_per_param`` is the weights' storage per parameter and may be fractional: FP8 with one float32
scale per 128×128 block (DeepSeek-V3's ``quantization_config.weight_block_size``; vLLM's ``BlockQuantScaleParameter``
holds a ``[ceil(N/128), ceil(K/128)]`` float32 grid per weight) costs 1 + 4/128² bytes. ``act_bytes`` is one
activation element (hidden states in and out of the GEMMs; the default dispatch/combine element), ``kv_bytes`` one
KV-cache element (vLLM/SGLang ``--kv-cache-dtype fp8``: 1). Any model from a Hugging Face ``config.json``:
:func:`spec_from_hf_config` (in :mod:`moesim.hfconfig`), or a path wherever a preset name is accepted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from moesim.errors import MoesimError

FP8_BLOCK = 128  # DeepSeek-V3 / Qwen3-FP8 quantization_config.weight_block_size [128, 128]
# Bytes per element of each storage dtype a user can name (--weight-dtype / --kv-dtype). "fp8" carries one scale
# per tensor (negligible); "fp8-block" one float32 scale per 128x128 block of a weight matrix.
DTYPE_BYTES: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0,
                                 "fp8-block": 1.0 + 4.0 / (FP8_BLOCK * FP8_BLOCK)}


def with_dtypes(model: ModelSpec, weight_dtype: str | None = None, kv_dtype: str | None = None) -> ModelSpec:
    """``model`` with its weights and/or KV cache stored as the named dtypes (:data:`DTYPE_BYTES`); None keeps."""
    changes: dict[str, float] = {}
    if weight_dtype is not None:
        changes["bytes_per_param"] = dtype_bytes(weight_dtype, "--weight-dtype")
    if kv_dtype is not None:
        changes["kv_bytes"] = dtype_bytes(kv_dtype, "--kv-dtype")
    return model.with_(**changes) if changes else model


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def dtype_bytes(name: str, what: str = "dtype") -> float:
    """Bytes per element of a named dtype (see :data:`DTYPE_BYTES`); the error names the known ones."""
    key = str(name).lower().replace("_", "-")
    key = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "fp8-e4m3": "fp8", "e4m3": "fp8",
           "fp8-block128": "fp8-block"}.get(key, key)
    if key not in DTYPE_BYTES:
        raise MoesimError(f"unknown {what} {name!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a Mixture-of-Experts decoder, as far as expert parallelism cares.

    ``num_layers`` counts MoE layers only; ``num_dense_layers`` dense FFN layers (of width ``dense_ffn_size``)
    precede them (DeepSeek-V3). ``num_shared_experts`` shared experts run on every token; their total FFN width is
    ``shared_ffn_size`` (Qwen2-MoE: ``shared_expert_intermediate_size``), 0 meaning ``num_shared_experts × ffn_size``
    (DeepSeek-V3). Multi-head latent attention when ``kv_lora_rank`` > 0 (DeepSeek-V2/V3 config names):
    queries through a ``q_lora_rank`` bottleneck (0: a plain projection), keys/values from a ``kv_lora_rank`` latent
    plus a shared ``qk_rope_head_dim`` rope key, per-head ``qk_nope_head_dim`` keys and ``v_head_dim`` values.
    """

    name: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    ffn_size: int
    bytes_per_param: float = 2  # weights; fractional with block scales (FP8_BLOCK)
    num_attention_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    vocab_size: int = 32000
    sliding_window: int | None = None
    rope_theta: float = 1.0e6
    num_dense_layers: int = 0
    dense_ffn_size: int = 0
    num_shared_experts: int = 0
    router: str = "softmax"  # "softmax" (Mixtral, Qwen3) or "sigmoid_grouped" (DeepSeek-V3)
    num_groups: int = 1  # expert groups for group-limited routing
    topk_groups: int = 1  # groups each token may use
    routed_scaling_factor: float = 1.0
    shared_ffn_size: int = 0  # total width of the shared experts; 0: num_shared_experts * ffn_size
    act_bytes: int = 2  # one activation element (bf16)
    kv_bytes: float = 2  # one KV-cache element
    q_lora_rank: int = 0  # MLA (DeepSeek-V2/V3); all 0: grouped-query attention from the heads above
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("num_layers", "num_experts", "top_k", "hidden_size", "ffn_size", "act_bytes",
                     "num_attention_heads", "num_kv_heads", "head_dim", "vocab_size", "num_groups", "topk_groups"):
            if not _int(getattr(self, name)) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("num_dense_layers", "dense_ffn_size", "num_shared_experts", "shared_ffn_size", "q_lora_rank",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if not _int(getattr(self, name)) or getattr(self, name) < 0:
                problems.append(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("bytes_per_param", "kv_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                problems.append(f"{name} must be a positive number, got {v!r}")
        if self.kv_lora_rank and not problems and min(self.qk_nope_head_dim + self.qk_rope_head_dim,
                                                      self.v_head_dim) < 1:
            problems.append("MLA (kv_lora_rank > 0) needs qk_nope_head_dim + qk_rope_head_dim >= 1 and v_head_dim >= 1")
        if not problems:
            if self.top_k > self.num_experts:
                problems.append(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
            if self.num_experts % self.num_groups:
                problems.append(f"num_experts {self.num_experts} is not divisible by num_groups {self.num_groups}")
            if self.topk_groups > self.num_groups:
                problems.append(f"topk_groups {self.topk_groups} exceeds num_groups {self.num_groups}")
            if self.num_attention_heads % self.num_kv_heads:
                problems.append("num_attention_heads must be a multiple of num_kv_heads")
            if self.router not in ("softmax", "sigmoid_grouped"):
                problems.append(f"router must be 'softmax' or 'sigmoid_grouped', got {self.router!r}")
        if problems:
            raise MoesimError(f"model {self.name!r}: " + "; ".join(problems))

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def shared_expert_ffn(self) -> int:
        """Total FFN width of the shared experts (0 without any)."""
        if not self.num_shared_experts:
            return 0
        return self.shared_ffn_size or self.num_shared_experts * self.ffn_size

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert: gate and up projections (H×F each) and down (F×H)."""
        return 3 * self.hidden_size * self.ffn_size

    @property
    def fp8_weights(self) -> bool:
        """Whether the weights are FP8 (per-tensor or block-scaled): their GEMMs then run on FP8 tensor cores, the
        activations quantised on the fly (DeepGEMM; SGLang / vLLM FP8 block-scaled linear layers)."""
        return DTYPE_BYTES["fp8"] <= self.bytes_per_param <= DTYPE_BYTES["fp8-block"]

    @property
    def expert_bytes(self) -> float:
        """Bytes of one routed expert's weights (block scales included)."""
        return self.expert_params * self.bytes_per_param

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's hidden state on the wire (dispatch or combine) in the activation dtype."""
        return self.hidden_size * self.act_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        if not isinstance(data, dict):
            raise MoesimError("model spec must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MoesimError(f"model spec has unknown fields: {', '.join(unknown)}")
        required = ("name", "num_layers", "num_experts", "top_k", "hidden_size", "ffn_size")
        missing = [n for n in required if n not in data]
        if missing:
            raise MoesimError(f"model spec lacks fields: {', '.join(missing)}")
        return cls(**data)

    def with_(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)


PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("tiny", num_layers=2, num_experts=8, top_k=2, hidden_size=64, ffn_size=128,
                  num_attention_heads=4, num_kv_heads=2, head_dim=16, vocab_size=256, rope_theta=1.0e4),
        ModelSpec("small", num_layers=4, num_experts=8, top_k=2, hidden_size=256, ffn_size=512,
                  num_attention_heads=8, num_kv_heads=4, head_dim=32, vocab_size=1024, rope_theta=1.0e4),
        ModelSpec("tiny-deepseek", num_layers=2, num_experts=16, top_k=4, hidden_size=64, ffn_size=64,
                  num_attention_heads=4, num_kv_heads=4, head_dim=16, vocab_size=256, rope_theta=1.0e4,
                  router="sigmoid_grouped", num_groups=4, topk_groups=2, routed_scaling_factor=2.5),
        ModelSpec("mixtral-8x7b", num_layers=32, num_experts=8, top_k=2, hidden_size=4096, ffn_size=14336,
                  num_attention_heads=32, num_kv_heads=8, head_dim=128, vocab_size=32000, sliding_window=4096),
        ModelSpec("mixtral-8x22b", num_layers=56, num_experts=8, top_k=2, hidden_size=6144, ffn_size=16384,
                  num_attention_heads=48, num_kv_heads=8, head_dim=128, vocab_size=32768),
        ModelSpec("deepseek-v3", num_layers=58, num_experts=256, top_k=8, hidden_size=7168, ffn_size=2048,
                  num_attention_heads=128, num_kv_heads=128, head_dim=192, vocab_size=129280, rope_theta=1.0e4,
                  num_dense_layers=3, dense_ffn_size=18432, num_shared_experts=1, router="sigmoid_grouped",
                  num_groups=8, topk_groups=4, routed_scaling_factor=2.5, q_lora_rank=1536, kv_lora_rank=512,
                  qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
        ModelSpec("qwen3-30b-a3b", num_layers=48, num_experts=128, top_k=8, hidden_size=2048, ffn_size=768,
                  num_attention_heads=32, num_kv_heads=4, head_dim=128, vocab_size=151936),
        ModelSpec("qwen3-235b-a22b", num_layers=94, num_experts=128, top_k=8, hidden_size=4096, ffn_size=1536,
                  num_attention_heads=64, num_kv_heads=4, head_dim=128, vocab_size=151936),
        ModelSpec("olmoe-1b-7b", num_layers=16, num_experts=64, top_k=8, hidden_size=2048, ffn_size=1024,
                  num_attention_heads=16, num_kv_heads=16, head_dim=128, vocab_size=50304, rope_theta=1.0e4),
        ModelSpec("switch-base-128", num_layers=6, num_experts=128, top_k=1, hidden_size=768, ffn_size=3072,
                  num_attention_heads=12, num_kv_heads=12, head_dim=64, vocab_size=32128, rope_theta=1.0e4),
    )
}


def is_config_path(name: str) -> bool:
    """Whether a --model/--preset value names a Hugging Face config (a .json file or a folder), not a preset."""
    return str(name).lower().endswith(".json") or Path(name).is_dir() or ("/" in str(name) and Path(name).exists())


def get_model(name: str) -> ModelSpec:
    """A preset by name, or the model of a Hugging Face ``config.json`` (a path to it or to its folder).

    The error lists the known presets."""
    if not isinstance(name, str):
        raise MoesimError(f"model must be a preset name or a config.json path, got {name!r}")
    if name.lower() not in PRESETS and is_config_path(name):
        return spec_from_hf_config(name)
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise MoesimError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)} "
                          "(or a Hugging Face config.json path)") from None


def spec_from_hf_config(source: Any, name: str | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of a Hugging Face ``config.json`` (a path, its folder, or the parsed dict).

    See :mod:`moesim.hfconfig` for the architectures and the field names read."""
    from moesim.hfconfig import spec_from_hf_config as parse

    return parse(source, name=name)
