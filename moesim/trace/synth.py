"""Synthetic routing traces that behave like real MoE routers, seeded and reproducible.

Why: placement and simulator studies need traces of every model shape at every scale, and real traces of
DeepSeek-V3 or Qwen3 are rarely at hand. The generator reproduces the properties that matter for expert
parallelism, each behind one knob of :class:`SynthConfig`:

- **Skewed popularity, a different hot set per layer.** Each layer ``l`` has latent expert scores
  ``v[l] ~ N(0, 1)``; the router logit of expert ``e`` is ``skew * v[l, e]`` (log-normal popularity).
  ``skew`` near 0 is near-uniform; the per-model defaults in :data:`ROUTING_DEFAULTS` are calibrated so the
  busiest expert of a layer gets about the load real statistics show: Mixtral 1.1-1.95x the mean
  (../shared/data/routing, mixtral-8x7b-expert-counts), DeepSeek-V3 / Qwen3 a few times up to ~13x the mean.
- **Drift.** The latent scores follow an Ornstein-Uhlenbeck walk: each step renews a fraction ``drift`` of
  their variance, so the hot set moves slowly over steps (what periodic EPLB rebalancing reacts to).
- **Token domains.** Each sequence belongs to one of ``num_domains`` domains with its own per-layer logit
  offsets (strength ``domain_strength``); a step's batch mixes domains, so load fluctuates from step to step and
  a token's experts co-occur (the per-domain specialisation reported for OLMoE, Muennighoff et al. 2024).
- **Cross-layer correlation.** Expert ``e`` chosen in layer ``l`` adds ``layer_corr`` to the logit of its
  successor ``succ[l][e]`` (a fixed random permutation) in layer ``l+1``: expert i in one layer predicts
  expert j in the next, as the OLMoE cross-layer co-occurrence statistics show.
- **Group-limited routing** (DeepSeek-V3, ``model.num_groups > 1``): a group's score is the sum of its two
  best expert scores; each token keeps its ``topk_groups`` best groups and takes its top-k experts inside them
  (DeepSeek-V3 config: n_group 8, topk_group 4).
- **Batch shapes.** ``prefill_steps`` prefill steps of ``tokens`` tokens (sequences of ``seq_len``), then decode
  steps of ``decode_tokens`` tokens: one token per running sequence, sequences persist across decode steps and
  are replaced at rate ``1/mean_decode_len``.
- **Origin ranks.** A step's tokens are split evenly and contiguously over ``num_ranks`` attention ranks
  (data-parallel attention); a decode sequence stays on its rank.

Sampling is exact Gumbel-top-k (top-k of logits plus Gumbel noise samples k experts without replacement with
probabilities proportional to softmax(logits), Kool et al. 2019), drawn as the equivalent sequential race
(:mod:`moesim.trace.synth_route`, the one definition: each pick takes expert ``e`` with probability ``w_e`` over
the remaining weight, one uniform and one exponential per pick instead of noise for every expert), so top-k ids
are distinct per token. The chosen experts' perturbed logits (a token's own router logits, from the race's ring
times) give the router weights: softmax routers (Mixtral, Qwen3) renormalise the softmax over the chosen k;
sigmoid routers (DeepSeek-V3) normalise the chosen sigmoid scores (norm_topk_prob). Compiled with numba where it
is installed (the ``fast`` extra), numpy otherwise: the same bits either way.
Tokens are routed in chunks of ``CHUNK_TOKENS``, each with its own random stream, on a thread pool over the chunks
of every step (the compiled loop and numpy release the GIL), straight into the step's arrays: one large step uses
every core, and the result does not depend on the thread count.
``routing="uniform"`` (``--routing uniform``): every expert equally likely — no popularity, domains or
cross-layer bonus; group limits kept (groups drawn uniformly) — so each token's k experts are a uniform random
k-subset of its groups and every expert's expected load is tokens·k/E. (``--skew 0`` alone keeps the domains and
the cross-layer bonus, so it is not uniform.)
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import MoesimError
from moesim.models import ModelSpec
from moesim.trace.synth_route import BLOCK, draws, geometry, layer_tables, route_layer
from moesim.trace.writer import TraceWriter

# Default (skew, domain_strength) per preset, calibrated with the other ``SynthConfig`` defaults. Per-layer
# busiest/mean load of a 16-step trace (4096-token prefill, then 1024-token decode steps), min/median/max over layers:
#   mixtral-8x7b 1.12/1.43/1.84, mixtral-8x22b 1.19/1.44/1.98   (real Mixtral counts: 1.1-1.95x,
#                                                                 ../shared/data/routing/mixtral-8x7b-expert-counts)
#   deepseek-v3 4.2/7.0/10.7, qwen3-30b-a3b 3.6/6.2/9.9, qwen3-235b-a22b 3.4/6.4/11.0  (3-13x reported in serving)
#   olmoe-1b-7b 3.7/4.6/5.7                                     (real OLMoE: 2.5-7.8x per domain, 2.1-3x pooled)
# Few experts need weaker domains: with 8 experts a batch of a few sequences of one domain would otherwise
# unbalance a layer more than real Mixtral routing does.
ROUTING_DEFAULTS: dict[str, tuple[float, float]] = {
    "tiny": (0.6, 1.0),
    "small": (0.6, 1.0),
    "tiny-deepseek": (1.0, 1.0),
    "mixtral-8x7b": (0.3, 0.5),
    "mixtral-8x22b": (0.3, 0.5),
    "deepseek-v3": (0.85, 1.0),
    "qwen3-30b-a3b": (1.0, 1.0),
    "qwen3-235b-a22b": (1.0, 1.0),
    "olmoe-1b-7b": (1.1, 1.0),
    "switch-base-128": (1.2, 1.0),
}


def routing_defaults(model: ModelSpec) -> tuple[float, float]:
    """(skew, domain_strength) of a preset, or a guess from the shape: few experts route nearly evenly."""
    if model.name in ROUTING_DEFAULTS:
        return ROUTING_DEFAULTS[model.name]
    return (0.3, 0.5) if model.num_experts <= 16 else (1.0, 1.0)


def default_skew(model: ModelSpec) -> float:
    return routing_defaults(model)[0]


@dataclass
class SynthConfig:
    """Knobs of the synthetic router. Defaults: one prefill step of 4096 tokens, then decode steps."""

    steps: int = 16
    tokens: int = 4096  # tokens of each prefill step
    decode_tokens: int | None = None  # tokens (running sequences) per decode step; None: same as ``tokens``
    prefill_steps: int = 1
    skew: float | None = None  # None: the model's default (ROUTING_DEFAULTS)
    drift: float = 0.02  # fraction of the latent popularity variance renewed per step
    layer_corr: float = 1.0  # logit bonus of a previous-layer expert's successor
    num_domains: int = 8
    domain_strength: float | None = None  # None: the model's default (ROUTING_DEFAULTS)
    seq_len: int = 512  # prefill sequence length (tokens of one sequence share a domain and a rank)
    mean_decode_len: float = 256.0  # decode steps a sequence runs on average
    num_ranks: int = 8
    seed: int = 0
    weights: bool = True
    origin: bool = True
    routing: str = "model"  # "model": the knobs above; "uniform": every expert equally likely

    def check(self) -> None:
        problems = []
        if self.routing not in ("model", "uniform"):
            problems.append(f"routing must be 'model' or 'uniform', got {self.routing!r}")
        for name in ("steps", "tokens", "num_ranks", "num_domains", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if self.decode_tokens is not None and (not isinstance(self.decode_tokens, (int, np.integer))
                                               or self.decode_tokens < 1):
            problems.append(f"decode_tokens must be a positive integer, got {self.decode_tokens!r}")
        if not isinstance(self.prefill_steps, (int, np.integer)) or self.prefill_steps < 0:
            problems.append(f"prefill_steps must be >= 0, got {self.prefill_steps!r}")
        if self.skew is not None and not (np.isfinite(self.skew) and 0 <= self.skew <= 20):
            problems.append(f"skew must lie in [0, 20], got {self.skew!r}")
        if not (np.isfinite(self.drift) and 0 <= self.drift <= 1):
            problems.append(f"drift must lie in [0, 1], got {self.drift!r}")
        for name in ("layer_corr", "domain_strength"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and 0 <= value <= 50):
                problems.append(f"{name} must lie in [0, 50], got {value!r}")
        if not (np.isfinite(self.mean_decode_len) and self.mean_decode_len >= 1):
            problems.append(f"mean_decode_len must be >= 1, got {self.mean_decode_len!r}")
        if self.num_ranks > 0xFFFF:
            problems.append(f"num_ranks must be <= 65535, got {self.num_ranks}")
        if problems:
            raise MoesimError("synthetic trace config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CHUNK_TOKENS = 16384  # tokens routed together (cache-sized); each chunk has its own random stream
# room(tokens, phase) -> (ids, weights or None) to route a step into, or None: allocate them
Room = Callable[[int, str], "tuple[np.ndarray, np.ndarray | None] | None"]


class _Router:
    """State of the synthetic router of one model: latent popularity, domains, successors."""

    def __init__(self, model: ModelSpec, cfg: SynthConfig) -> None:
        self.model = model
        self.cfg = cfg
        skew, strength = routing_defaults(model)
        self.skew = float(skew if cfg.skew is None else cfg.skew)
        self.domain_strength = float(strength if cfg.domain_strength is None else cfg.domain_strength)
        self.layer_corr = float(cfg.layer_corr)
        if cfg.routing == "uniform":
            self.skew = self.domain_strength = self.layer_corr = 0.0
        self.rng = np.random.default_rng(cfg.seed)
        L, E = model.num_layers, model.num_experts
        setup = np.random.default_rng([cfg.seed, 1])  # layout independent of the per-step stream
        self.latent = setup.standard_normal((L, E)).astype(np.float32)
        self.domains = (self.domain_strength * setup.standard_normal((L, cfg.num_domains, E))).astype(np.float32)
        self.succ = np.stack([setup.permutation(E) for _ in range(L)])  # succ[l]: layer l-1 expert -> layer l
        self.decode_domain: np.ndarray | None = None
        self.decode_rank: np.ndarray | None = None

    # -- per-step inputs ----------------------------------------------------------------------------
    def _drift(self) -> None:
        d = self.cfg.drift
        if d > 0:
            noise = self.rng.standard_normal(self.latent.shape).astype(np.float32)
            self.latent = np.sqrt(1 - d, dtype=np.float32) * self.latent + np.sqrt(d, dtype=np.float32) * noise

    def _prefill_batch(self, T: int) -> tuple[np.ndarray, np.ndarray]:
        """Domain and origin rank of each token of a prefill step: contiguous sequences of seq_len."""
        cfg = self.cfg
        n_seq = -(-T // cfg.seq_len)
        mix = self.rng.dirichlet(np.ones(cfg.num_domains))
        seq_domain = self.rng.choice(cfg.num_domains, size=n_seq, p=mix)
        domain = np.repeat(seq_domain, cfg.seq_len)[:T]
        origin = (np.arange(T, dtype=np.int64) * cfg.num_ranks) // T
        return domain, origin

    def _decode_batch(self, T: int) -> tuple[np.ndarray, np.ndarray]:
        """Running sequences persist across decode steps; finished ones are replaced by new ones."""
        cfg = self.cfg
        if self.decode_domain is None or len(self.decode_domain) != T:
            self.decode_domain = self.rng.integers(0, cfg.num_domains, size=T)
            self.decode_rank = (np.arange(T, dtype=np.int64) * cfg.num_ranks) // T
        else:
            done = self.rng.random(T) < 1.0 / cfg.mean_decode_len
            self.decode_domain[done] = self.rng.integers(0, cfg.num_domains, size=int(done.sum()))
        assert self.decode_rank is not None
        return self.decode_domain, self.decode_rank

    # -- routing ------------------------------------------------------------------------------------
    def route(self, step: int, domain: np.ndarray, base: np.ndarray, chunk: int, ids: np.ndarray,
              weights: np.ndarray) -> None:
        """Route the tokens ``domain`` [T] (chunk ``chunk`` of step ``step``) into ``ids`` [L, T, k] uint16 (best
        first) and router ``weights`` [L, T, k] (float32 or float16): views of the step's arrays, written in place.

        A pure function of its inputs and the chunk's own random stream, so chunks and steps route in parallel.
        """
        m, cfg = self.model, self.cfg
        L, k = m.num_layers, m.top_k
        T = len(domain)
        rng = np.random.default_rng([cfg.seed, 2, step, chunk])
        G = max(m.num_groups, 1)
        ng = m.topk_groups if G > 1 else 0
        sigmoid = m.router == "sigmoid_grouped"
        none = np.empty((0, k), dtype=np.uint16)
        factor = math.exp(self.layer_corr)
        ex, bl = geometry(m.num_experts, G, m.topk_groups)
        for layer in range(L):
            w, sg, mass, shift = layer_tables(self.domains[layer] + base[layer], G)  # [domains, E] logits
            bits, exps = draws(rng, T, ng, k)
            prev = ids[layer - 1] if layer and self.layer_corr > 0 else none
            route_layer(w, sg, mass, domain, prev, self.succ[layer], factor, bits, exps, m.topk_groups, BLOCK,
                        sigmoid, math.exp(-shift) if sigmoid else 0.0, ex, bl, ids[layer], weights[layer])

    def inputs(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, str]]:
        """Per step, sequentially: (step, domain [T], origin [T], popularity logits [L, E], phase)."""
        cfg = self.cfg
        decode_T = cfg.tokens if cfg.decode_tokens is None else cfg.decode_tokens
        for step in range(cfg.steps):
            if step:
                self._drift()
            if step < cfg.prefill_steps:
                phase = "prefill"
                domain, origin = self._prefill_batch(cfg.tokens)
            else:
                phase = "decode"
                domain, origin = self._decode_batch(decode_T)
            yield step, domain.copy(), origin.copy(), self.skew * self.latent, phase

    def steps(self, threads: int | None = None, weights_dtype: Any = np.float32, room: Room | None = None,
              ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
        """Route every step's token chunks on a thread pool (the compiled router and numpy release the GIL),
        yielding steps in order: (ids [L, T, k] uint16, weights [L, T, k] ``weights_dtype``, origin [T], phase).
        Each chunk writes its columns of the step's arrays in place: no per-chunk copies, no joins.

        ``room(T, phase)``, if given, may supply a large step's arrays (ids, weights or None: the trace writer's
        pages, TraceWriter.reserve_step); it is asked once every earlier step has been yielded and taken in."""
        workers = threads or min(os.cpu_count() or 1, 8)
        m = self.model
        L, k = m.num_layers, m.top_k

        def submit(run: Any, step: int, domain: np.ndarray, base: np.ndarray, phase: str,
                   ) -> tuple[list[Any], np.ndarray, np.ndarray]:
            tokens = len(domain)
            given = room(tokens, phase) if room is not None and tokens >= big else None
            ids, weights = given if given is not None else (None, None)
            ids = np.empty((L, tokens, k), dtype=np.uint16) if ids is None else ids
            weights = np.empty((L, tokens, k), dtype=weights_dtype) if weights is None else weights
            jobs = [run(self.route, step, domain[a:a + CHUNK_TOKENS], base, a // CHUNK_TOKENS,
                        ids[:, a:a + CHUNK_TOKENS], weights[:, a:a + CHUNK_TOKENS])
                    for a in range(0, tokens, CHUNK_TOKENS)]
            return jobs, ids, weights

        # a step takes the room offered only when it keeps every worker busy by itself: the steps before it
        # must be finished first (the pool then runs dry between the two)
        big = 2 * workers * CHUNK_TOKENS if workers > 1 else 0
        if workers <= 1:
            for step, domain, origin, base, phase in self.inputs():
                _, ids, weights = submit(lambda f, *a: f(*a), step, domain, base, phase)
                yield ids, weights, origin, phase
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque[tuple[list[Future], np.ndarray, np.ndarray, np.ndarray, str]] = deque()

            def done() -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
                futs, ids, weights, o, ph = pending.popleft()
                for f in futs:
                    f.result()
                return ids, weights, o, ph

            for step, domain, origin, base, phase in self.inputs():
                while room is not None and len(domain) >= big and pending:
                    yield done()
                futs, ids, weights = submit(pool.submit, step, domain, base, phase)
                pending.append((futs, ids, weights, origin, phase))
                # keep the pool fed, memory bounded
                while pending and sum(len(p[0]) for p in pending) - len(pending[0][0]) >= 2 * workers:
                    yield done()
            while pending:
                yield done()


def generate_steps(model: ModelSpec, cfg: SynthConfig | None = None, threads: int | None = None,
                   compact: bool = False, weights_dtype: Any = np.float32, room: Room | None = None,
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
    """Yield ``(ids [L, T, k] int64, weights [L, T, k] float32, origin [T] int64, phase)`` per step.

    The same ``(model, cfg)`` always yields the same steps, whatever ``threads`` (default: up to 8 cores) and
    whether numba is installed. ``compact=True`` yields ids as uint16 (the trace's on-disk dtype; mind overflow in
    arithmetic); ``weights_dtype=np.float16`` yields the weights as a trace stores them (rounded from float32).
    ``room``: where a large step's arrays may come from (see ``_Router.steps``; :func:`synthesize` routes into the
    trace file's pages).
    """
    cfg = cfg or SynthConfig()
    cfg.check()
    if model.num_experts > 0xFFFF:
        raise MoesimError(f"synthetic traces support up to 65535 experts, model has {model.num_experts}")
    if model.num_groups > 1 and model.topk_groups * (model.num_experts // model.num_groups) < model.top_k:
        raise MoesimError(f"model {model.name!r}: {model.topk_groups} groups of "
                          f"{model.num_experts // model.num_groups} experts cannot hold top-{model.top_k}")
    for ids, weights, origin, phase in _Router(model, cfg).steps(threads, weights_dtype, room):
        yield (ids if compact else ids.astype(np.int64)), weights, origin, phase


def synthesize(model: ModelSpec, cfg: SynthConfig | None, path: str | Path,
               progress: Any = None) -> Path:
    """Write a synthetic token trace of ``model`` to ``path`` atomically; return the path.

    ``progress``, if given, is called with (step, steps) after each step.
    """
    cfg = cfg or SynthConfig()
    cfg.check()
    path = Path(path)
    skew, strength = routing_defaults(model)
    resolved = {"skew": skew if cfg.skew is None else cfg.skew,
                "domain_strength": strength if cfg.domain_strength is None else cfg.domain_strength}
    if cfg.routing == "uniform":
        resolved = {"skew": 0.0, "domain_strength": 0.0, "layer_corr": 0.0}
    meta = {"source": "moesim.trace.synth", "synth": {**cfg.to_dict(), **resolved}}
    with TraceWriter(path, model, kind="tokens", weights=cfg.weights, origin=cfg.origin,
                     num_ranks=cfg.num_ranks if cfg.origin else None, meta=meta, atomic=True) as writer:
        steps = generate_steps(model, cfg, compact=True, weights_dtype=np.float16, room=writer.reserve_step)
        for i, (ids, weights, origin, phase) in enumerate(steps):
            writer.add_step(ids, weights if cfg.weights else None, origin if cfg.origin else None, phase,
                            handed_over=True)
            if progress is not None:
                progress(i + 1, cfg.steps)
    return path
