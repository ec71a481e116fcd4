"""The graph-ready forward pass: fixed shapes, device-side state, no host synchronisation; CUDA-graph capture.

One code path serves prefill chunks and decode steps, on CPU (eager, so every CPU test covers it) and CUDA:

- the KV cache is preallocated (``KVCache``, rounded up to a multiple of 64 positions) with per-sequence lengths
  ``cache.lens`` on the device; new keys/values are scattered at ``lens``, and attention runs over the fixed-size
  cache (eager runs: its filled part, rounded up) with a length mask built on the device, through SDPA pinned to
  one backend (memory-efficient attention on CUDA, math on CPU; never cuDNN, whose plan depends on the KV length).
  GQA groups the query heads of one KV head into the query-length dimension (no K/V copy per head);
- the MoE part (``moesim.runtime.moe_layer.EPMoE``) routes, dispatches and combines over fixed-capacity buffers;
- decode runs on a batch *bucket* (``CAPTURE_SIZES``, as vLLM's capture sizes): the batch is padded up to it,
  padding rows are never routed (their slots are the pad slot, which maps to no expert) and never recorded.

``Engine`` owns the cache and the static decode buffers. On CUDA (unless ``graphs=False``) it captures the decode
step into a ``torch.cuda.CUDAGraph`` during :meth:`Engine.warm_up` and replays it; a step that must carry
per-phase timings runs the same code eagerly with a timer instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from moesim.runtime.model import Decoder, KVCache, NullTimer, StepContext, rotary
from torch.nn.attention import SDPBackend, sdpa_kernel

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)
KV_ALIGN = 64  # cache positions are a multiple of this (memory-efficient attention wants aligned mask rows)


def bucket_for(batch: int) -> int:
    """The decode batch bucket: the smallest capture size >= batch (beyond them: the next multiple of 64)."""
    for size in CAPTURE_SIZES:
        if size >= batch:
            return size
    return -(-batch // 64) * 64


def sdpa_backend(device: torch.device) -> Any:
    """One SDPA backend per device, chosen once: no per-length plan (cuDNN re-plans for every KV length)."""
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION if device.type == "cuda" else SDPBackend.MATH])


def static_attention(model: Decoder, i: int, x: torch.Tensor, cache: KVCache, kv_limit: int | None = None
                     ) -> torch.Tensor:
    """x [B, T, H] (normed) → [B, T, H]. Sequence b's new tokens sit at positions lens[b] .. lens[b]+T-1; their keys
    and values are written into rows 0..B-1 of the cache (the caller advances ``cache.lens``). Attention spans the
    first ``kv_limit`` cache positions (default: all; an eager caller that knows every length may pass less)."""
    s, lay = model.spec, model.layers[i]
    B, T, _ = x.shape
    nh, kvh, hd = s.num_attention_heads, s.num_kv_heads, s.head_dim
    L = cache.max_len if kv_limit is None else kv_limit
    pos = cache.lens[:B, None] + torch.arange(T, device=x.device)  # [B, T]
    q = (x @ lay.q.t()).view(B, T, nh, hd).transpose(1, 2)
    k = (x @ lay.k.t()).view(B, T, kvh, hd).transpose(1, 2)
    v = (x @ lay.v.t()).view(B, T, kvh, hd).transpose(1, 2)
    q, k = rotary(q, pos, s.rope_theta), rotary(k, pos, s.rope_theta)
    where = pos[:, None, :, None].expand(B, kvh, T, hd)
    cache.k[i, :B].scatter_(2, where, k)
    cache.v[i, :B].scatter_(2, where, v)
    kc, vc = cache.k[i, :B, :, :L], cache.v[i, :B, :, :L]  # views: [B, kvh, L, D]
    kpos = torch.arange(L, device=x.device)
    allowed = kpos[None, None, :] <= pos[:, :, None]  # [B, T, L] causal over what the cache holds
    if s.sliding_window is not None:
        allowed &= pos[:, :, None] - kpos[None, None, :] < s.sliding_window
    g = nh // kvh  # query heads kv*g .. kv*g+g-1 share KV head kv (Hugging Face's repeat_interleave order)
    qg = q.reshape(B, kvh, g * T, hd)
    mask = allowed[:, None].repeat(1, 1, g, 1)  # [B, 1, g*T, L]: row j*T+t is query token t
    with sdpa_backend(x.device):
        out = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask)
    return out.view(B, nh, T, hd).transpose(1, 2).reshape(B, T, -1) @ lay.o.t()


def forward_static(model: Decoder, tokens: torch.Tensor, cache: KVCache, ctx: StepContext,
                   kv_limit: int | None = None) -> torch.Tensor:
    """tokens [B, T] (B <= the cache's rows) → logits [B, T, V] float32; advances ``cache.lens[:B]`` by T on the
    device. Routing lands in ``ctx`` as in :meth:`Decoder.forward`; ``kv_limit`` as in :func:`static_attention`."""
    B, T = tokens.shape
    logits = model.run_layers(tokens, lambda i, x: static_attention(model, i, x, cache, kv_limit), ctx)
    cache.lens[:B] += T
    return logits


def prefill_chunks(prompt_len: int, chunk: int) -> list[tuple[int, int]]:
    """(start, length) of each prefill chunk; ``chunk`` 0 = the whole prompt at once."""
    step = prompt_len if chunk <= 0 else chunk
    return [(s, min(step, prompt_len - s)) for s in range(0, prompt_len, step)]


class Engine:
    """Cache, static decode buffers and (on CUDA) the captured decode graph of one rank.

    ``batch`` sequences per rank; decode runs on ``bucket_for(batch)`` rows. Prefill chunks run on the ``batch``
    real rows only (eagerly: their shapes change with the chunk)."""

    def __init__(self, model: Decoder, batch: int, max_len: int, rank: int, graphs: bool = True) -> None:
        self.model, self.batch, self.rank = model, batch, rank
        self.bucket = bucket_for(batch)
        dev = model.device
        self.cache = model.new_cache(self.bucket, -(-max_len // KV_ALIGN) * KV_ALIGN)
        self.tokens = torch.zeros((self.bucket, 1), dtype=torch.int64, device=dev)
        self.valid = torch.arange(self.bucket, device=dev) < batch
        self.keys = rank * batch + torch.arange(self.bucket, device=dev)  # padding rows' keys are never used
        self.use_graph = graphs and dev.type == "cuda"
        self.graph: Any = None
        self._out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.position = 0  # tokens per sequence so far (host bookkeeping only)

    def _kv_limit(self, new: int) -> int | None:
        """Cache positions attention spans. Under graphs: all (a replay cannot change shapes; the profiled eager
        steps do the same work, so their phase timings stand for the replayed ones). Eager (CPU, ``--no-graphs``):
        the filled part rounded up to 16, so attention costs what the KV length asks (the cost model's term)."""
        if self.use_graph:
            return None
        return min(self.cache.max_len, -(-(self.position + new) // 16) * 16)

    def _decode_body(self, timer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx = StepContext(timer=timer, valid=self.valid, keys=self.keys)
        logits = forward_static(self.model, self.tokens, self.cache, ctx, self._kv_limit(1))
        return logits[:, 0], torch.stack(ctx.routing), torch.stack(ctx.router_weights)

    def decode(self, tokens: torch.Tensor, timer: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens [B, 1] → (logits [B, V], ids [L, B, k], weights [L, B, k]); replays the graph when there is one
        and no ``timer`` asks for phase timings."""
        if self.position + 1 > self.cache.max_len:
            raise ValueError(f"KV cache holds {self.cache.max_len} tokens per sequence; one more does not fit")
        B = self.batch
        self.tokens[:B].copy_(tokens)
        if self.graph is not None and timer is None:
            self.graph.replay()
            assert self._out is not None
            logits, ids, w = self._out
        else:
            logits, ids, w = self._decode_body(timer or NullTimer())
        self.position += 1
        return logits[:B], ids[:, :B], w[:, :B]

    def prefill(self, tokens: torch.Tensor, timer: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One prefill chunk: tokens [B, C] → (logits [B, C, V], ids [L, B*C, k], weights [L, B*C, k])."""
        B, C = tokens.shape
        if self.position + C > self.cache.max_len:
            raise ValueError(f"KV cache holds {self.cache.max_len} tokens per sequence; {self.position} + {C} "
                             "do not fit")
        ctx = StepContext(timer=timer or NullTimer(), key_offset=self.rank * B * C)
        logits = forward_static(self.model, tokens, self.cache, ctx, self._kv_limit(C))
        self.position += C
        return logits, torch.stack(ctx.routing), torch.stack(ctx.router_weights)

    @contextlib.contextmanager
    def _scratch(self) -> Iterator[None]:
        """Run steps whose effects on the cache must not count: lengths are restored afterwards (keys/values they
        wrote lie at or beyond the restored lengths, where the mask hides them until real steps overwrite them)."""
        saved, position = self.cache.lens.clone(), self.position
        try:
            yield
        finally:
            self.cache.lens.copy_(saved)
            self.position = position

    def warm_up(self, chunk_sizes: list[int]) -> None:
        """Compile every kernel shape the run will use (each prefill chunk size, the decode bucket) and capture
        the decode graph, before step 0. Every rank calls it (the steps run collectives)."""
        dev = self.model.device
        with self._scratch():
            for c in sorted(set(chunk_sizes)):
                self.prefill(torch.zeros((self.batch, c), dtype=torch.int64, device=dev))
                self.cache.lens.zero_()
                self.position = 0
            self._decode_body(NullTimer())
        if not self.use_graph:
            return
        side, main = torch.cuda.Stream(), torch.cuda.current_stream()
        with self._scratch():  # warm-up for capture on a side stream (as torch.cuda.graphs documents)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._decode_body(NullTimer())
            main.wait_stream(side)  # before the lengths are restored on the main stream
        graph = torch.cuda.CUDAGraph()
        with self._scratch(), torch.cuda.graph(graph):
            self._out = self._decode_body(NullTimer())
        self.graph = graph
        torch.cuda.synchronize()
