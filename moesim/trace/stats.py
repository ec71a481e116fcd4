"""Statistics of a routing trace: what decides how hard expert placement is.

Why: before placing experts or replaying a trace one wants to know how skewed the load is per layer, how it
moves over time (does a static placement suffice, how often to rebalance), and how a token's experts co-occur
(within a layer: which experts to co-locate; across layers: how predictable the next layer is).

Definitions (per MoE layer, load = token-choices per expert over the window):
- ``imbalance`` = busiest expert load / mean expert load (1 = perfectly even; E/top_k at most).
- ``step_imbalance`` = the same per step, averaged over steps (what one step's latency sees).
- ``entropy`` = Shannon entropy of the load share divided by log(E) (1 = uniform, 0 = one expert).
- ``drift`` = total-variation distance between the load shares of consecutive windows, averaged over layers
  (0 = the same distribution, 1 = disjoint); ``hot_overlap`` = Jaccard overlap of the windows' hot sets.
- ``cross_layer_nmi`` = normalised mutual information between a token's first expert in layer l and in l+1.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from moesim.trace.format import PHASE_NAMES
from moesim.trace.reader import Trace

DEFAULT_MAX_TOKENS = 1 << 16


def imbalance(load: np.ndarray) -> np.ndarray:
    """[..., E] -> [...]: busiest / mean load (1.0 where a row is all zero)."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean(axis=-1)
    return np.divide(load.max(axis=-1), mean, out=np.ones_like(mean), where=mean > 0)


def entropy(load: np.ndarray) -> np.ndarray:
    """[..., E] -> [...]: normalised Shannon entropy of the load share, in [0, 1]."""
    load = np.asarray(load, dtype=np.float64)
    total = load.sum(axis=-1, keepdims=True)
    p = np.divide(load, total, out=np.zeros_like(load), where=total > 0)
    h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=-1)
    E = load.shape[-1]
    return h / np.log(E) if E > 1 else np.ones_like(h)


def window_drift(load: np.ndarray, windows: int, hot: int) -> dict[str, Any]:
    """Drift of ``load [S, L, E]`` between ``windows`` consecutive equal windows of steps."""
    S = load.shape[0]
    windows = max(1, min(windows, S))
    bounds = np.linspace(0, S, windows + 1).astype(int)
    shares = []
    hot_sets = []
    for a, b in itertools.pairwise(bounds):
        w = load[a:b].sum(axis=0).astype(np.float64)  # [L, E]
        total = w.sum(axis=1, keepdims=True)
        shares.append(np.divide(w, total, out=np.zeros_like(w), where=total > 0))
        order = np.argsort(-w, axis=1, kind="stable")[:, :hot]
        hot_sets.append([set(row[w[i, row] > 0].tolist()) for i, row in enumerate(order)])  # idle experts aren't hot
    tv, overlap = [], []
    for i in range(1, len(shares)):
        tv.append(float(0.5 * np.abs(shares[i] - shares[i - 1]).sum(axis=1).mean()))
        jac = [len(x & y) / len(x | y) if x | y else 1.0 for x, y in zip(hot_sets[i], hot_sets[i - 1])]
        overlap.append(float(np.mean(jac)))
    return {"windows": windows, "bounds": bounds.tolist(), "tv": tv, "hot_overlap": overlap,
            "tv_mean": float(np.mean(tv)) if tv else 0.0}


def _token_ids(trace: Trace, start: int, stop: int, max_tokens: int) -> np.ndarray | None:
    """ids [L, T', k] of up to ``max_tokens`` tokens from steps start..stop-1 (None for load-only traces)."""
    if trace.kind != "tokens":
        return None
    parts, n = [], 0
    for step in trace.steps(start, stop):
        assert step.ids is not None
        take = min(step.num_tokens, max_tokens - n)
        parts.append(np.array(step.ids[:, :take]))  # stored dtype (uint16): 4x less memory than int64
        n += take
        if n >= max_tokens:
            break
    if not parts:
        return None
    return np.concatenate(parts, axis=1)


def coactivation(trace: Trace, start: int = 0, stop: int | None = None,
                 max_tokens: int | None = DEFAULT_MAX_TOKENS) -> np.ndarray:
    """[L, E, E] int64: tokens that chose both expert i and expert j in the same layer (diagonal: load).

    Token traces only; uses the first ``max_tokens`` tokens of the window (None: all).
    """
    stop = trace.num_steps if stop is None else stop
    ids = _token_ids(trace, start, stop, max_tokens or 1 << 62)
    L, E = trace.model.num_layers, trace.model.num_experts
    out = np.zeros((L, E, E), dtype=np.int64)
    if ids is None:
        return out
    for layer in range(L):
        x = ids[layer].astype(np.int64)
        key = (x[:, :, None] * E + x[:, None, :]).reshape(-1)
        out[layer] = np.bincount(key, minlength=E * E).reshape(E, E)
    return out


def cross_layer(trace: Trace, start: int = 0, stop: int | None = None,
                max_tokens: int | None = DEFAULT_MAX_TOKENS) -> np.ndarray:
    """[L-1, E, E] int64: tokens with expert i among their choices in layer l and expert j in layer l+1."""
    stop = trace.num_steps if stop is None else stop
    ids = _token_ids(trace, start, stop, max_tokens or 1 << 62)
    L, E = trace.model.num_layers, trace.model.num_experts
    out = np.zeros((max(L - 1, 0), E, E), dtype=np.int64)
    if ids is None:
        return out
    for layer in range(L - 1):
        a, b = ids[layer].astype(np.int64), ids[layer + 1]
        key = (a[:, :, None] * E + b[:, None, :]).reshape(-1)
        out[layer] = np.bincount(key, minlength=E * E).reshape(E, E)
    return out


def _nmi(joint: np.ndarray) -> float:
    """Normalised mutual information (by the smaller marginal entropy) of a joint count table."""
    total = joint.sum()
    if total == 0:
        return 0.0
    p = joint / total
    px, py = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float(np.sum(p[nz] * np.log(p[nz] / np.outer(px, py)[nz])))
    hx = -float(np.sum(px[px > 0] * np.log(px[px > 0])))
    hy = -float(np.sum(py[py > 0] * np.log(py[py > 0])))
    h = min(hx, hy)
    return mi / h if h > 0 else 0.0


def trace_stats(trace: Trace, start: int = 0, stop: int | None = None, *, windows: int = 4, hot: int | None = None,
                max_tokens: int | None = DEFAULT_MAX_TOKENS) -> dict[str, Any]:
    """Summary statistics of steps ``start .. stop-1``; numpy arrays in the result (see :func:`jsonable`).

    Keys: model, kind, layers, experts, top_k, steps, tokens, choices_per_layer [L], phases, truncated, load [L, E],
    imbalance [L], step_imbalance [L], entropy [L], idle [L], hot_experts [L, hot] (ids) with hot_share [L, hot],
    drift {...}, and for token traces cross_layer_nmi [L-1] and pair_share (mean share of a token's top-k pairs
    falling on the layer's 1% most frequent pairs).
    """
    m = trace.model
    stop = trace.num_steps if stop is None else min(stop, trace.num_steps)
    start = max(0, min(start, stop))
    hot = hot or min(m.num_experts, max(4, m.top_k))
    per_step = trace.load(start, stop)  # [S, L, E]
    load = per_step.sum(axis=0)
    total = load.sum(axis=1, keepdims=True).astype(np.float64)
    order = np.argsort(-load, axis=1, kind="stable")[:, :hot]
    share = np.divide(np.take_along_axis(load, order, axis=1), total, out=np.zeros((m.num_layers, hot)),
                      where=total > 0)
    phases: dict[str, int] = {}
    step_tokens = np.zeros(stop - start, dtype=np.int64)
    for chunk in trace.chunks():
        lo, hi = max(start, chunk.first_step), min(stop, chunk.first_step + chunk.num_steps)
        if lo >= hi:
            continue
        step_tokens[lo - start:hi - start] = chunk.step_tokens[lo - chunk.first_step:hi - chunk.first_step]
        for code in chunk.phase[lo - chunk.first_step:hi - chunk.first_step]:
            name = PHASE_NAMES.get(int(code)) or "unknown"
            phases[name] = phases.get(name, 0) + 1
    out: dict[str, Any] = {
        "model": m.name, "kind": trace.kind, "layers": m.num_layers, "experts": m.num_experts, "top_k": m.top_k,
        "start": start, "stop": stop, "steps": stop - start, "tokens": int(step_tokens.sum()),
        "choices_per_layer": load.sum(axis=1), "phases": phases, "truncated": trace.truncated,
        "tokens_per_step": {"min": int(step_tokens.min()) if len(step_tokens) else 0,
                            "mean": float(step_tokens.mean()) if len(step_tokens) else 0.0,
                            "max": int(step_tokens.max()) if len(step_tokens) else 0},
        "load": load, "imbalance": imbalance(load),
        "step_imbalance": imbalance(per_step).mean(axis=0) if len(per_step) else np.ones(m.num_layers),
        "entropy": entropy(load), "idle": (load == 0).sum(axis=1), "hot_experts": order, "hot_share": share,
        "drift": window_drift(per_step, windows, hot) if len(per_step) else {},
    }
    ids = _token_ids(trace, start, stop, max_tokens or 1 << 62) if trace.kind == "tokens" else None
    if trace.kind == "tokens" and m.num_layers > 1:
        E = m.num_experts
        nmi = []
        for layer in range(m.num_layers - 1):
            first = np.zeros(0, np.int64) if ids is None else \
                ids[layer, :, 0].astype(np.int64) * E + ids[layer + 1, :, 0]
            nmi.append(_nmi(np.bincount(first, minlength=E * E).reshape(E, E)))
        out["cross_layer_nmi"] = np.array(nmi)
    if trace.kind == "tokens" and m.top_k > 1:
        out["pair_share"] = _pair_share(ids, m.num_layers, m.num_experts)
    return out


def _pair_share(ids: np.ndarray | None, L: int, E: int) -> np.ndarray:
    """[L]: share of a token's expert pairs (two different experts) that fall on the layer's 1% most frequent pairs.

    Pairs as in the symmetric co-activation matrix with its diagonal removed; counting position pairs p < q
    once and adding the transpose gives that matrix with k(k-1)/2 instead of k^2 keys per token.
    """
    out = np.zeros(L)
    if ids is None or ids.shape[1] == 0:
        return out
    T, k = ids.shape[1], ids.shape[2]
    top = max(1, E * E // 100)
    key = np.empty((k * (k - 1) // 2, T), dtype=np.intp)
    for layer in range(L):
        x = np.ascontiguousarray(ids[layer].T).astype(np.intp)  # [k, T]: rows are contiguous (4x faster)
        xs = x * E
        for n, (p, q) in enumerate(zip(*np.triu_indices(k, 1))):
            np.add(xs[p], x[q], out=key[n])
        half = np.bincount(key.ravel(), minlength=E * E).reshape(E, E)
        off = half + half.T
        np.fill_diagonal(off, 0)
        flat = off.ravel()
        tot = int(flat.sum())
        if tot:
            out[layer] = int(np.partition(flat, flat.size - top)[-top:].sum()) / tot
    return out


def jsonable(stats: dict[str, Any], full: bool = False) -> dict[str, Any]:
    """Stats with numpy arrays as lists and floats rounded; the [L, E] load only when ``full``."""

    def conv(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            if v.dtype.kind == "f":
                return np.round(v, 6).tolist()
            return v.tolist()
        if isinstance(v, (np.integer,)):
            return int(v)
        if isinstance(v, (np.floating, float)):
            return round(float(v), 6)
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return {k: conv(v) for k, v in stats.items() if full or k != "load"}
