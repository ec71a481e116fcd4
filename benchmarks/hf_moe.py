"""Hugging Face transformers' eager model of a moesim preset, holding the runtime's own (seeded) weights.

The class follows the preset's architecture (``olmoe*`` → ``OlmoeForCausalLM``, ``qwen3*`` →
``Qwen3MoeForCausalLM``, else ``MixtralForCausalLM``, the runtime's own architecture); the config comes from the
:class:`~moesim.models.ModelSpec`, and every parameter is copied in by name from a
:class:`moesim.runtime.weights.WeightSource` (Mixtral names). Both expert layouts of transformers are handled:

- transformers 5 (``models/{mixtral,olmoe,qwen3_moe}/modeling_*.py``: ``*Experts``) fuses the experts of a layer
  into ``mlp.experts.gate_up_proj`` [E, 2F, H] (gate rows, then up rows: ``chunk(2, dim=-1)`` of the
  product) and ``mlp.experts.down_proj`` [E, H, F]; the router is ``mlp.gate.weight`` [E, H];
- transformers 4 keeps one module per expert: Mixtral ``block_sparse_moe.experts.{j}.w1/w3/w2.weight``,
  OLMoE / Qwen3-MoE ``mlp.experts.{j}.gate_proj/up_proj/down_proj.weight``.

Parameters the runtime's Mixtral-architecture decoder does not have (OLMoE's and Qwen3's ``q_norm``/``k_norm``)
keep their initial value (ones) and are listed; for Mixtral presets the HF model computes the runtime's function.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch

from moesim.errors import MoesimError
from moesim.models import ModelSpec

EXPERT_V4 = {"w1": "w1", "w3": "w3", "w2": "w2", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def hf_class_name(spec: ModelSpec) -> str:
    name = spec.name.lower()
    if name.startswith("olmoe"):
        return "OlmoeForCausalLM"
    if name.startswith("qwen3"):
        return "Qwen3MoeForCausalLM"
    return "MixtralForCausalLM"


def hf_config(spec: ModelSpec, max_positions: int) -> Any:
    """The transformers config of ``spec`` (no tied embeddings, no shared experts, MoE in every layer)."""
    import transformers

    common = dict(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                  num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_kv_heads,
                  num_experts_per_tok=spec.top_k, max_position_embeddings=max(max_positions, 16),
                  rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=spec.rope_theta)
    cls = hf_class_name(spec)
    if cls == "OlmoeForCausalLM":
        if spec.head_dim * spec.num_attention_heads != spec.hidden_size:
            raise MoesimError(f"{spec.name}: OLMoE needs head_dim x heads == hidden_size")
        return transformers.OlmoeConfig(intermediate_size=spec.ffn_size, num_experts=spec.num_experts,
                                        norm_topk_prob=True, **common)
    if cls == "Qwen3MoeForCausalLM":
        return transformers.Qwen3MoeConfig(moe_intermediate_size=spec.ffn_size, intermediate_size=spec.ffn_size,
                                           num_experts=spec.num_experts, head_dim=spec.head_dim,
                                           norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                           **common)
    return transformers.MixtralConfig(intermediate_size=spec.ffn_size, num_local_experts=spec.num_experts,
                                      head_dim=spec.head_dim, sliding_window=spec.sliding_window, **common)


_LAYER = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.(.+)")


def source_tensor(hf_name: str, param: torch.Tensor, source: Any) -> torch.Tensor | None:
    """The runtime's tensor for one HF parameter (None: the runtime has no such tensor)."""
    m = _LAYER.fullmatch(hf_name)
    if m is None:
        return source.get(hf_name) if hf_name in source.shapes else None
    layer, rest = int(m.group(1)), m.group(2)
    prefix = f"model.layers.{layer}.block_sparse_moe"
    E = source.model.num_experts
    if rest == "gate.weight":
        return source.get(f"{prefix}.gate.weight")
    if rest == "experts.gate_up_proj" and param.dim() == 3:  # transformers 5: [E, 2F, H]
        return torch.stack([source.expert(layer, e)[0] for e in range(E)])
    if rest == "experts.down_proj" and param.dim() == 3:  # transformers 5: [E, H, F]
        return torch.stack([source.expert(layer, e)[1] for e in range(E)])
    v4 = re.fullmatch(r"experts\.(\d+)\.(\w+)\.weight", rest)
    if v4 and v4.group(2) in EXPERT_V4:
        return source.get(f"{prefix}.experts.{v4.group(1)}.{EXPERT_V4[v4.group(2)]}.weight")
    return None


@torch.no_grad()
def build_hf_model(spec: ModelSpec, source: Any, device: str, dtype: torch.dtype,
                   max_positions: int) -> tuple[Any, list[str]]:
    """(HF model in eval mode on ``device``, names of the HF parameters left at their initial value)."""
    import transformers

    config = hf_config(spec, max_positions)
    cls = getattr(transformers, hf_class_name(spec))
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # never materialise a float32 copy of a 30 B-parameter model
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(prev)
    kept = []
    for name, p in model.named_parameters():
        t = source_tensor(name, p, source)
        if t is None:
            kept.append(name)
            continue
        if tuple(t.shape) != tuple(p.shape):
            raise MoesimError(f"{cls.__name__}.{name} has shape {list(p.shape)}, the runtime's {list(t.shape)}")
        p.copy_(t.to(device=p.device, dtype=p.dtype))
        del t
    unexpected = [n for n in kept if not n.endswith(("q_norm.weight", "k_norm.weight"))]
    if unexpected:
        raise MoesimError(f"{cls.__name__}: no runtime tensor for {', '.join(unexpected[:4])}")
    return model.eval(), kept


@torch.no_grad()
def time_hf(model: Any, batch: int, prompt_len: int, steps: int, device: str, seed: int = 0) -> dict[str, Any]:
    """Prefill ``batch`` × ``prompt_len`` random tokens, then ``steps`` decode steps (KV cache), timed one by one."""
    import time

    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    sync()
    prefill = time.perf_counter() - t0
    # transformers >= 5.2x names the KV cache ``cache`` (``past_key_values`` deprecated); earlier ones only the latter
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def cache_of(o: Any) -> Any:
        return o.get("cache") if o.get("cache") is not None else o.get("past_key_values")

    past, decode = cache_of(out), []
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=nxt, use_cache=True, **{kw: past})
        sync()
        decode.append(time.perf_counter() - t0)
        past, nxt = cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
    return {"prefill_s": prefill, "decode_s": decode}
