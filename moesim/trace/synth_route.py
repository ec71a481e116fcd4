"""One layer of the synthetic router: the one definition of how a token picks its experts, in numpy
(:func:`route_layer_numpy`) and compiled (:mod:`moesim.trace._synth_kernels`, optional: needs numba, the ``fast``
extra; ``MOESIM_NO_JIT=1`` disables it). Both run the same floating-point operations in the same order, so they
give bit-identical ids and weights (tested); :func:`route_layer` takes the compiled one where it loads.

The law is the one the Gumbel-top-k sampler drew before (Kool et al. 2019), drawn the cheap way: top-k of
``w_e / Exp(1)`` is the order in which independent exponential clocks of rates ``w_e`` ring, and that race is
sequential sampling without replacement — the next expert is ``e`` with probability ``w_e / (remaining total)``,
and the clock rings ``Exp(1) / (remaining total)`` later. So a pick costs one uniform (inverse CDF over the
remaining weights: first over blocks of ``BLOCK`` candidates, then inside the block) and one exponential, where
the race needed a random number and a log per candidate. The ring times ``t`` give the perturbed logits
``shift - log t`` of the chosen experts, hence the router weights, with the same law as before.

Per token (domain ``d``, the previous layer's experts ``prev``):

1. grouped models: ``topk_groups`` groups drawn the same way, without replacement in proportion to their mass
   ``sum_e w[d, e]`` (``mass``);
2. the kept groups' experts are the candidates, in group order (order drawn), experts ascending inside a group;
   the successor ``succ[p]`` of each previous expert ``p``, where it is a candidate, has its weight multiplied by
   ``factor`` = exp(layer_corr) (its block's sum gains the difference);
3. ``top_k`` experts without replacement as above.

All weights are positive float64 (``exp(max(logit - shift, -80))``); sums run left to right. A pick's target
that rounding carries past the last remaining candidate takes the last one; a remaining total that rounding
drives to zero is recounted exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.jit import optional_kernel

BLOCK = 16  # candidates per block of the two-level inverse-CDF scan (~sqrt of 128 candidates)
_U32 = 2.0 ** -32


def layer_tables(logits: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``logits [C, E]`` float32 (per domain) -> (w [C, E] float64, block sums sg [C, G, ceil(per/BLOCK)],
    group masses [C, G], shift = max logit). Shared by both implementations, so they start from the same bits."""
    C, E = logits.shape
    G = max(num_groups, 1)
    per = E // G
    shift = float(logits.max())
    w = np.exp(np.maximum(logits - np.float32(shift), np.float32(-80.0))).astype(np.float64)
    nbg = -(-per // BLOCK)
    padded = np.zeros((C, G, nbg * BLOCK))
    padded[:, :, :per] = w.reshape(C, G, per)
    sg = np.ascontiguousarray(np.cumsum(padded.reshape(C, G, nbg, BLOCK), axis=3)[..., -1])
    mass = np.ascontiguousarray(np.cumsum(sg, axis=2)[..., -1])
    return w, sg, mass, shift


def geometry(num_experts: int, num_groups: int, kept: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer tables of the candidate layout (computed once; the compiled loop then divides nothing):
    ex [3, E] = (group, index in group, block in group) of each expert; bl [3, nb] = (group slot, first, end
    candidate position) of each of the ``nb = kept * ceil(per / BLOCK)`` candidate blocks."""
    G = max(num_groups, 1)
    kgs = kept if G > 1 else 1
    per = num_experts // G
    e = np.arange(num_experts)
    ex = np.stack([e // per, e % per, (e % per) // BLOCK])
    nbg = -(-per // BLOCK)
    b = np.arange(kgs * nbg)
    start = (b // nbg) * per + (b % nbg) * BLOCK
    bl = np.stack([b // nbg, start, np.minimum(start + BLOCK, (b // nbg) * per + per)])
    return np.ascontiguousarray(ex, dtype=np.int64), np.ascontiguousarray(bl, dtype=np.int64)


def draws(rng: np.random.Generator, T: int, ng: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The random numbers of one layer: raw bits [T, ng + k] uint32 (one uniform per group and expert pick) and
    exponentials [T, k] float32 (one per ring)."""
    n = T * (ng + k)
    bits = rng.bit_generator.random_raw(-(-n // 2)).view(np.uint32)[:n].reshape(T, ng + k)
    return bits, rng.standard_exponential((T, k), dtype=np.float32)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Row sums of [T, n] left to right (as the compiled loop adds; numpy's sum adds pairwise)."""
    return np.cumsum(a, axis=1)[:, -1] if a.shape[1] else np.zeros(a.shape[0])


def _last_true(mask: np.ndarray) -> np.ndarray:
    """Index of the last True of each row of [T, n]."""
    return mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)


def route_layer_numpy(w: np.ndarray, sg: np.ndarray, mass: np.ndarray, domain: np.ndarray, prev: np.ndarray,
                      succ: np.ndarray, factor: float, bits: np.ndarray, exps: np.ndarray, kg: int, block: int,
                      sigmoid: bool, sig_scale: float, ex: np.ndarray, bl: np.ndarray, ids_out: np.ndarray,
                      w_out: np.ndarray) -> None:
    """Route the T tokens of one layer into ``ids_out [T, k]`` (uint16, pick order) and ``w_out [T, k]`` (float32).

    ``w, sg, mass``: :func:`layer_tables`; ``domain [T]`` int; ``prev [T, k]`` the previous layer's ids (``[0, k]``:
    no successor bonus); ``succ [E]`` previous-layer expert -> its successor here; ``bits, exps``: :func:`draws`;
    ``kg``: groups kept (grouped models); ``sigmoid``: weights ``1 / (1 + t * sig_scale)`` (sig_scale =
    exp(-shift)) normalised, else softmax ``t_0 / t``; ``ex, bl``: :func:`geometry` (used by the compiled loop).
    """
    T = len(domain)
    C, E = w.shape
    G, nbg = sg.shape[1], sg.shape[2]
    per = E // G
    k = ids_out.shape[1]
    ng = kg if G > 1 else 0
    kgs = kg if G > 1 else 1
    nb = kgs * nbg
    W = nbg * block
    rows = np.arange(T)
    slot = np.full((T, G), -1, dtype=np.int64)
    chosen = np.zeros((T, kgs), dtype=np.int64)
    if G > 1:
        gm = mass[domain]
        tot = _seqsum(gm)
        for r in range(ng):
            target = (bits[:, r] + 0.5) * _U32 * tot
            avail = slot < 0
            c = np.cumsum(np.where(avail, gm, 0.0), axis=1)
            pick = (c <= target[:, None]).sum(axis=1)
            miss = pick == G
            if miss.any():
                pick[miss] = _last_true(avail[miss])
            chosen[:, r] = pick
            slot[rows, pick] = r
            tot = tot - gm[rows, pick]
            bad = ~(tot > 0.0)
            if bad.any():
                tot[bad] = _seqsum(np.where(slot[bad] < 0, gm[bad], 0.0))
    else:
        slot[:, 0] = 0
    cand = np.zeros((T, kgs, W))
    cand[:, :, :per] = w.reshape(C, G, per)[domain[:, None], chosen]
    flat = cand.reshape(T, kgs * W)
    S = sg[domain[:, None], chosen].reshape(T, nb)
    sizes = np.minimum(block, per - np.arange(nbg) * block)
    cnt = np.tile(sizes, (T, kgs))
    for j in range(prev.shape[1] if prev.shape[0] else 0):
        s = succ[prev[:, j]]
        sl = slot[rows, s // per]
        f = sl >= 0
        r_, i, sl = rows[f], s[f] % per, sl[f]
        p = sl * W + i
        x = flat[r_, p]
        xb = x * factor
        flat[r_, p] = xb
        S[r_, sl * nbg + i // block] += xb - x
    tot = _seqsum(S)
    blocks = cand.reshape(T, nb, block)
    tt = np.empty((T, k))
    acc = np.zeros(T)
    for r in range(k):
        target = (bits[:, ng + r] + 0.5) * _U32 * tot
        c = np.cumsum(S, axis=1)
        pb = (c <= target[:, None]).sum(axis=1)
        miss = pb == nb
        pb[miss] = 0
        target2 = target - np.where(pb > 0, c[rows, np.maximum(pb - 1, 0)], 0.0)
        if miss.any():
            pb[miss] = _last_true(cnt[miss] > 0)
            target2[miss] = np.inf
        blk = blocks[rows, pb]
        pi = (np.cumsum(blk, axis=1) <= target2[:, None]).sum(axis=1)
        miss = pi == block
        if miss.any():
            pi[miss] = _last_true(blk[miss] > 0.0)
        x = blk[rows, pi]
        acc = acc + exps[:, r] / tot
        tt[:, r] = acc
        j = pb // nbg
        ids_out[:, r] = chosen[rows, j] * per + (pb - j * nbg) * block + pi
        blocks[rows, pb, pi] = 0.0
        cnt[rows, pb] -= 1
        sb = np.where(cnt[rows, pb] > 0, S[rows, pb] - x, 0.0)
        S[rows, pb] = np.where(sb > 0.0, sb, 0.0)
        tot = tot - x
        bad = ~(tot > 0.0)
        if bad.any():
            S[bad] = np.cumsum(blocks[bad], axis=2)[..., -1]
            tot[bad] = _seqsum(S[bad])
    v = 1.0 / (1.0 + tt * sig_scale) if sigmoid else tt[:, :1] / tt
    w_out[:] = v / _seqsum(v)[:, None]


def route_kernel() -> Any:
    """The compiled layer router (moesim.trace._synth_kernels.route_layer) or None: numba missing or
    MOESIM_NO_JIT set. Loaded on first use, so importing moesim never imports numba."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = optional_kernel("moesim.trace._synth_kernels", "route_layer") or False
    return _KERNEL or None


_KERNEL: Any = None


def route_layer(*args: Any, compiled: bool | None = None) -> None:
    """:func:`route_layer_numpy`'s arguments; compiled where available (``compiled=False``: numpy). A float16
    ``w_out`` gets the float32 weights rounded to float16 (the compiled loop writes the bits directly)."""
    *head, w_out = args
    kernel = route_kernel() if compiled is not False else None
    half = w_out.dtype == np.float16
    if kernel is not None:
        none = np.empty((0, w_out.shape[1]), dtype=np.float32)
        kernel(*head, none, w_out.view(np.uint16)) if half else kernel(*head, w_out, none.view(np.uint16))
    elif half:
        w32 = np.empty(w_out.shape, dtype=np.float32)
        route_layer_numpy(*head, w32)
        w_out[:] = w32
    else:
        route_layer_numpy(*head, w_out)
