"""A Mixtral-architecture decoder for inference: RMSNorm, rotary GQA attention with a KV cache (optional
sliding window), and a MoE block per layer whose expert part is pluggable.

The expert part is any callable ``experts(x [T, H], weights [T, k], ids [T, k], layer, ctx) -> [T, H]``:
:class:`LocalExperts` holds every expert (the single-process reference), ``moesim.runtime.moe_layer.EPMoE`` runs
expert parallelism over torch.distributed. Attention is data-parallel: every rank runs its own sequences.
Tensor shapes: B sequences, T new tokens per sequence, H hidden, k top-k, E experts, V vocab.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from moesim.runtime.weights import WeightSource

from moesim import kernels
from moesim.models import ModelSpec

EPS = 1e-5


class NullTimer:
    """Marks regions for torch.profiler only; the recorder's timer also measures them."""

    @contextlib.contextmanager
    def region(self, layer: int, phase: str) -> Iterator[None]:
        with torch.profiler.record_function(f"moesim.{phase}"):
            yield

    def tokens(self, layer: int, counts: torch.Tensor) -> None:
        """Token-choices computed per local slot in ``layer`` (ignored here)."""


@dataclass
class StepContext:
    """What a forward pass needs besides the tokens: the timer and, for EP, the step's token-key offset."""

    timer: Any = field(default_factory=NullTimer)
    key_offset: int = 0  # position of this rank's first token in the step (the replica policy's key)
    routing: list[torch.Tensor] = field(default_factory=list)  # filled: ids [T, k] per layer
    valid: torch.Tensor | None = None  # [T] bool: rows that are real tokens (padding rows are never routed)
    keys: torch.Tensor | None = None  # [T] replica-policy keys; None: key_offset + row index
    router_weights: list[torch.Tensor] = field(default_factory=list)


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (Hugging Face's rotate-half layout). x [B, heads, T, D], positions [T] or [B, T]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    freqs = positions.float()[..., None] * inv
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if positions.dim() == 2:  # per sequence: [B, T, D] → [B, 1, T, D]
        cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


class KVCache:
    """Keys and values of every layer: [L, B, kv_heads, max_len, D]; ``length`` tokens are filled.

    ``lens`` [B] int64 on the device: tokens held per sequence, read and advanced by the graph-ready path
    (``moesim.runtime.graph``) without the host; ``length`` is the reference path's host-side count."""

    def __init__(self, spec: ModelSpec, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (spec.num_layers, batch, spec.num_kv_heads, max_len, spec.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lens = torch.zeros(batch, dtype=torch.int64, device=device)
        self.length = 0
        self.max_len = max_len


@dataclass
class Router:
    """Top-k softmax renormalised over the chosen experts (Mixtral), or DeepSeek-V3's grouped sigmoid router."""

    spec: ModelSpec
    weight: torch.Tensor  # [E, H]
    bias: torch.Tensor | None = None  # [E] correction bias (sigmoid_grouped)
    impl: str | None = None  # kernels implementation: None (Triton on CUDA, torch on CPU), "torch", "triton"

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] → (weights [T, k] float32, ids [T, k] int64)."""
        logits = x @ self.weight.t()
        s = self.spec
        if s.router == "sigmoid_grouped":
            return kernels.grouped_topk(logits, self.bias, s.top_k, s.num_groups, s.topk_groups,
                                        s.routed_scaling_factor, impl=self.impl)
        return kernels.topk_softmax(logits, s.top_k, renormalize=True, impl=self.impl)


class LocalExperts:
    """Every expert of a layer on this process: w13 [E, 2F, H], w2 [E, H, F] (the reference path)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, impl: str | None = None) -> None:
        self.w13, self.w2, self.impl = w13, w2, impl

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, layer: int,
                 ctx: StepContext) -> torch.Tensor:
        with ctx.timer.region(layer, "expert"):
            return kernels.fused_moe(x, self.w13, self.w2, weights.float(), ids, impl=self.impl)


@dataclass
class Layer:
    ln1: torch.Tensor
    q: torch.Tensor  # [heads*D, H]
    k: torch.Tensor  # [kv_heads*D, H]
    v: torch.Tensor
    o: torch.Tensor  # [H, heads*D]
    ln2: torch.Tensor
    router: Router
    experts: Callable[..., torch.Tensor]


class Decoder:
    """The model: embed → layers (attention, MoE) → norm → lm_head. Inference only."""

    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: list[Layer], norm: torch.Tensor,
                 lm_head: torch.Tensor) -> None:
        self.spec, self.embed, self.layers, self.norm, self.lm_head = spec, embed, layers, norm, lm_head

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.spec, batch, max_len, self.device, self.dtype)

    def attention(self, i: int, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """x [B, T, H] (normed) → [B, T, H]; appends this layer's keys/values to the cache."""
        s, lay = self.spec, self.layers[i]
        B, T, _ = x.shape
        start = cache.length
        pos = torch.arange(start, start + T, device=x.device)
        q = (x @ lay.q.t()).view(B, T, s.num_attention_heads, s.head_dim).transpose(1, 2)
        k = (x @ lay.k.t()).view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = (x @ lay.v.t()).view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)
        q, k = rotary(q, pos, s.rope_theta), rotary(k, pos, s.rope_theta)
        cache.k[i, :, :, start:start + T] = k
        cache.v[i, :, :, start:start + T] = v
        keys, values = cache.k[i, :, :, :start + T], cache.v[i, :, :, :start + T]
        # No mask tensor where none is needed: a decode token sees the whole cache, a first prefill is plainly
        # causal. An explicit boolean mask sends CPU SDPA down a path up to 5x slower and erratic in the KV length,
        # which the cost model (linear in tokens x KV length) could not follow. GQA without copying K/V per head.
        window = s.sliding_window
        sees_all = T == 1 and (window is None or window > start)  # one query, every cached key in its window
        causal = not sees_all and start == 0 and (window is None or window >= T)
        mask = None
        if not sees_all and not causal:
            kpos = torch.arange(start + T, device=x.device)
            mask = kpos[None, :] <= pos[:, None]  # [T, start+T] causal
            if window is not None:
                mask &= pos[:, None] - kpos[None, :] < window
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                             enable_gqa=s.num_attention_heads != s.num_kv_heads)
        return out.transpose(1, 2).reshape(B, T, -1) @ lay.o.t()

    def forward(self, tokens: torch.Tensor, cache: KVCache, ctx: StepContext | None = None) -> torch.Tensor:
        """tokens [B, T] int64 → logits [B, T, V] float32; the cache grows by T. Routing lands in ``ctx``."""
        ctx = ctx or StepContext()
        T = tokens.shape[1]
        if cache.length + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; {cache.length} + {T} do not fit")
        logits = self.run_layers(tokens, lambda i, x: self.attention(i, x, cache), ctx)
        cache.length += T
        return logits

    def run_layers(self, tokens: torch.Tensor, attend: Callable[[int, torch.Tensor], torch.Tensor],
                   ctx: StepContext) -> torch.Tensor:
        """tokens [B, T] → logits [B, T, V] float32 through every layer; ``attend(i, x [B, T, H])`` is layer i's
        attention (the reference's growing cache, or the graph-ready static cache): the rest is shared."""
        B, T = tokens.shape
        h = self.embed[tokens]
        for i, lay in enumerate(self.layers):
            with ctx.timer.region(i, "attention"):
                h = h + attend(i, rms_norm(h, lay.ln1))
                x = rms_norm(h, lay.ln2).reshape(B * T, -1)
            with ctx.timer.region(i, "gate"):
                weights, ids = lay.router(x)
            ctx.routing.append(ids)
            ctx.router_weights.append(weights)
            h = h + lay.experts(x, weights, ids, i, ctx).view(B, T, -1)
        return (rms_norm(h, self.norm) @ self.lm_head.t()).float()


def build_decoder(spec: ModelSpec, source: WeightSource, device: torch.device | str, dtype: torch.dtype,
                  experts: Callable[[int], Callable[..., torch.Tensor]] | None = None,
                  impl: str | None = None) -> Decoder:
    """Assemble a decoder from ``source``. ``experts(layer)`` builds each layer's expert part; by default
    :class:`LocalExperts` with every expert (the single-process reference). ``impl`` picks the kernels."""

    def get(name: str) -> torch.Tensor:
        return source.get(name).to(device=device, dtype=dtype)

    def local(i: int) -> LocalExperts:
        pairs = [source.expert(i, e) for e in range(spec.num_experts)]
        w13 = torch.stack([p[0] for p in pairs]).to(device=device, dtype=dtype)
        w2 = torch.stack([p[1] for p in pairs]).to(device=device, dtype=dtype)
        return LocalExperts(w13, w2, impl)

    make = experts or local
    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        bias = None
        if spec.router == "sigmoid_grouped":
            bias = source.get(f"{p}.block_sparse_moe.gate.e_score_correction_bias").to(device)  # kept in fp32
        layers.append(Layer(
            ln1=get(f"{p}.input_layernorm.weight"), q=get(f"{p}.self_attn.q_proj.weight"),
            k=get(f"{p}.self_attn.k_proj.weight"), v=get(f"{p}.self_attn.v_proj.weight"),
            o=get(f"{p}.self_attn.o_proj.weight"), ln2=get(f"{p}.post_attention_layernorm.weight"),
            router=Router(spec, get(f"{p}.block_sparse_moe.gate.weight"), bias, impl), experts=make(i)))
    return Decoder(spec, get("model.embed_tokens.weight"), layers, get("model.norm.weight"), get("lm_head.weight"))


def make_tokens(seed: int, rank: int, step: int, shape: tuple[int, ...], vocab: int) -> torch.Tensor:
    """The random token ids a rank feeds at a step (prompt at step 0, one token per sequence after): the same
    on every run with the same seed, so the EP model and the reference see the same inputs."""
    gen = torch.Generator().manual_seed(((seed * 1000003 + rank) * 1000003 + step) & 0x7FFFFFFFFFFFFFFF)
    return torch.randint(0, vocab, shape, generator=gen, dtype=torch.int64)
