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
probabilities proportional to softmax(logits), Kool et al. 2019), in its exponential-race form: top-k of
exp(logit) / Exp(1) (the same ranking: its log is logit + Gumbel), one log per candidate from raw random bits;
vectorised over the tokens of a layer, so top-k ids are distinct per token. The chosen experts' perturbed logits
(a token's own router logits) give the router weights: softmax routers (Mixtral, Qwen3) renormalise the softmax
over the chosen k; sigmoid routers (DeepSeek-V3) normalise the chosen sigmoid scores (norm_topk_prob).
Tokens are routed in chunks of ``CHUNK_TOKENS``, each with its own random stream, on a thread pool over the chunks
of every step (numpy releases the GIL): one large step uses every core, and the result does not depend on the
thread count.
``routing="uniform"`` (``--routing uniform``): every expert equally likely — no popularity, domains or
cross-layer bonus; group limits kept (groups drawn uniformly) — so each token's k experts are a uniform random
k-subset of its groups and every expert's expected load is tokens·k/E. (``--skew 0`` alone keeps the domains and
the cross-layer bonus, so it is not uniform.)
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import MoesimError
from moesim.models import ModelSpec
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
    def route(self, step: int, domain: np.ndarray, base: np.ndarray, chunk: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """ids [L, T, k] uint16 (best first) and router weights [L, T, k] float32 of the tokens ``domain`` [T]
        (chunk ``chunk`` of step ``step``).

        A pure function of its inputs and the chunk's own random stream, so chunks and steps route in parallel.
        """
        m, cfg = self.model, self.cfg
        L, E, k = m.num_layers, m.num_experts, m.top_k
        T = len(domain)
        rng = np.random.default_rng([cfg.seed, 2, step, chunk])
        ids = np.empty((L, T, k), dtype=np.uint16)
        weights = np.empty((L, T, k), dtype=np.float32)
        prev: np.ndarray | None = None
        grouped = m.num_groups > 1
        per = E // m.num_groups
        for layer in range(L):
            logits = self.domains[layer] + base[layer]  # [domains, E]
            shift = logits.max()
            w = np.exp(np.maximum(logits - shift, -80.0))  # [domains, E] float32 weights exp(logit - shift)
            if grouped:
                chosen, scores = _group_candidates(w, domain, m.num_groups, m.topk_groups, rng)
            else:
                chosen, scores = None, np.take(w, domain, axis=0)  # [T, E]
            if prev is not None and self.layer_corr > 0:
                _add_successor_bonus(scores, self.succ[layer][prev], chosen, per, math.exp(self.layer_corr))
            scores /= _exponential(rng, scores.shape)  # w / Exp(1): ranks as logit + Gumbel
            top, top_scores = _top_k(scores, k)  # best first
            if chosen is not None:  # candidate column -> expert id
                top = _pick(chosen, top // per) * per + top % per
            ids[layer] = top
            weights[layer] = _router_weights(np.log(top_scores) + shift, m.router)  # the perturbed logits
            prev = top
        return ids, weights

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

    def steps(self, threads: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
        """Route every step's token chunks on a thread pool (numpy releases the GIL), yielding steps in order."""
        workers = threads or min(os.cpu_count() or 1, 8)

        def chunks(step: int, domain: np.ndarray, base: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray, int]]:
            return [(step, domain[a:a + CHUNK_TOKENS], base, a // CHUNK_TOKENS)
                    for a in range(0, max(len(domain), 1), CHUNK_TOKENS)]

        def join(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
            if len(parts) == 1:
                return parts[0]
            return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=1)

        if workers <= 1:
            for step, domain, origin, base, phase in self.inputs():
                yield (*join([self.route(*c) for c in chunks(step, domain, base)]), origin, phase)
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque[tuple[list[Future], np.ndarray, str]] = deque()
            queued = 0
            for step, domain, origin, base, phase in self.inputs():
                futs = [pool.submit(self.route, *c) for c in chunks(step, domain, base)]
                pending.append((futs, origin, phase))
                queued += len(futs)
                while pending and queued - len(pending[0][0]) >= 2 * workers:  # keep the pool fed, memory bounded
                    futs, o, ph = pending.popleft()
                    queued -= len(futs)
                    yield (*join([f.result() for f in futs]), o, ph)
            while pending:
                futs, o, ph = pending.popleft()
                yield (*join([f.result() for f in futs]), o, ph)


def _exponential(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Exp(1) float32 samples of ``shape`` as −log(U), U in (0, 1) built from the generator's raw bits (23 random
    mantissa bits, the lowest forced to 1: never 0 or 1) — several times faster than Generator.standard_exponential.
    """
    n = int(np.prod(shape))
    r = rng.bit_generator.random_raw(-(-n // 2)).view(np.uint32)[:n].reshape(shape)
    r >>= np.uint32(9)
    r |= np.uint32(0x3F800001)  # 1.m with m's last bit set: (1, 2)
    u = r.view(np.float32)
    u -= np.float32(1.0)
    np.log(u, out=u)
    np.negative(u, out=u)
    return u


def _group_candidates(w: np.ndarray, domain: np.ndarray, num_groups: int, topk_groups: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-style group-limited routing: each token keeps ``topk_groups`` of ``num_groups`` expert groups.

    Groups are drawn without replacement in proportion to their softmax mass (Gumbel-top-k over the groups'
    mass), then experts are chosen only inside them. ``w`` [C, E]: expert weights exp(logit) per domain. Returns the
    kept groups ``chosen [T, topk_groups]`` and their experts' weights ``[T, topk_groups * per]`` (column ``j`` is
    expert ``chosen[:, j // per] * per + j % per``). DeepSeek-V3 picks groups by the sum of each group's two best
    scores; sampling groups by mass keeps the same structure (a token's experts lie in at most ``topk_groups``
    groups, i.e. nodes) at a fraction of the cost, and skips the noise of the groups not chosen.
    """
    T = len(domain)
    C, E = w.shape
    per = E // num_groups
    mass = w.reshape(C, num_groups, per).sum(axis=2)  # [C, G]
    gscore = np.take(mass, domain, axis=0) / _exponential(rng, (T, num_groups))  # mass / Exp(1): Gumbel-top-k
    rows = np.arange(T)
    chosen = np.empty((T, topk_groups), dtype=np.int64)
    for j in range(topk_groups):  # rounds of argmax: no per-row partition
        best = gscore.argmax(axis=1)
        chosen[:, j] = best
        gscore[rows, best] = -np.inf
    rowsel = (domain * num_groups)[:, None] + chosen  # rows of the [C*G, per] logits: one contiguous copy each
    scores = np.take(w.reshape(C * num_groups, per), rowsel, axis=0).reshape(T, topk_groups * per)
    return chosen, scores


def _add_successor_bonus(scores: np.ndarray, succ: np.ndarray, chosen: np.ndarray | None, per: int,
                         factor: float) -> None:
    """Multiply the weights of the successor experts ``succ [T, k]`` of a token's previous experts by ``factor``
    (exp(layer_corr): the logit bonus). With group-limited candidates, successors outside the token's kept groups
    are skipped.
    """
    T, W = scores.shape
    flat = scores.reshape(-1)
    rows = np.arange(T)
    if chosen is None:
        flat[succ + (rows * W)[:, None]] *= np.float32(factor)  # distinct per row: no lost updates
        return
    group = succ // per
    width = int(max(chosen.max(initial=0), group.max(initial=0))) + 1
    slot_of = np.full((T, width), -1, dtype=np.int64)  # [T, groups]: the group's candidate slot, or -1
    slot_of[rows[:, None], chosen] = np.arange(chosen.shape[1])
    slot = np.take_along_axis(slot_of, group, axis=1)
    found = slot >= 0
    pos = slot * per + succ % per + (rows * W)[:, None]
    flat[pos[found]] *= np.float32(factor)


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """([T, k] column indices, [T, k] values) of the k largest scores of each row, largest first.

    k rounds of argmax (each row's best, then the next): much faster in numpy than a per-row partition and sort.
    ``scores`` is overwritten.
    """
    T = scores.shape[0]
    out = np.empty((T, k), dtype=np.int64)
    val = np.empty((T, k), dtype=scores.dtype)
    flat = scores.reshape(-1)
    base = np.arange(T) * scores.shape[1]
    for j in range(k):
        best = scores.argmax(axis=1)
        out[:, j] = best
        pos = base + best
        val[:, j] = flat[pos]
        flat[pos] = -np.inf
    return out, val


def _pick(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``take_along_axis(a, idx, axis=1)`` for 2-D arrays, as one flat take (several times faster)."""
    return np.take(a.reshape(-1), idx + (np.arange(a.shape[0]) * a.shape[1])[:, None])


def _router_weights(top_scores: np.ndarray, router: str) -> np.ndarray:
    """Weights of the chosen experts, normalised over the k of each token."""
    if router == "sigmoid_grouped":
        w = 1.0 / (1.0 + np.exp(-top_scores))
    else:
        w = np.exp(top_scores - top_scores[:, :1])
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def generate_steps(model: ModelSpec, cfg: SynthConfig | None = None, threads: int | None = None,
                   compact: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
    """Yield ``(ids [L, T, k] int64, weights [L, T, k] float32, origin [T] int64, phase)`` per step.

    The same ``(model, cfg)`` always yields the same steps, whatever ``threads`` (default: up to 8 cores).
    ``compact=True`` yields ids as uint16 (the trace's on-disk dtype; mind overflow in arithmetic).
    """
    cfg = cfg or SynthConfig()
    cfg.check()
    if model.num_experts > 0xFFFF:
        raise MoesimError(f"synthetic traces support up to 65535 experts, model has {model.num_experts}")
    if model.num_groups > 1 and model.topk_groups * (model.num_experts // model.num_groups) < model.top_k:
        raise MoesimError(f"model {model.name!r}: {model.topk_groups} groups of "
                          f"{model.num_experts // model.num_groups} experts cannot hold top-{model.top_k}")
    for ids, weights, origin, phase in _Router(model, cfg).steps(threads):
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
        for i, (ids, weights, origin, phase) in enumerate(generate_steps(model, cfg, compact=True)):
            writer.add_step(ids, weights if cfg.weights else None, origin if cfg.origin else None, phase)
            if progress is not None:
                progress(i + 1, cfg.steps)
    return path
