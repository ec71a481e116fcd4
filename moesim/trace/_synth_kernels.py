"""numba kernels of the synthetic router (imported only where numba is installed, through
:func:`moesim.trace.synth_route.route_kernel`): one pass per token over a layer, the same floating-point operations
in the same order as :func:`moesim.trace.synth_route.route_layer_numpy`, so both give bit-identical ids and
weights (tested). Why compiled: numpy needs a dozen [tokens, candidates] temporaries per pick; here a token's
candidates stay in a 1 KiB buffer and ids land straight in the step's output array.
"""

from __future__ import annotations

import numba
import numpy as np

_U32 = 2.0 ** -32  # uint32 raw bits b -> uniform (b + 0.5) * 2^-32 in (0, 1)


@numba.njit(cache=True, nogil=True)
def half_bits(f: int) -> int:
    """float16 bits of the float32 of bits ``f`` (sign, zero, subnormal and normal; round to nearest even, as
    numpy's float32 -> float16 cast): weights leave the loop as the trace stores them, without numpy's separate
    conversion pass. Only finite values below 65520 (router weights lie in [0, 1])."""
    sign = (f >> 16) & 0x8000
    exp = f & 0x7F800000
    if exp <= 0x38000000:  # zero or a float16 subnormal
        if exp < 0x33000000:
            return sign
        sig = (0x00800000 + (f & 0x007FFFFF)) >> (113 - (exp >> 23))
        if (sig & 0x3FFF) != 0x1000 or (f & 0x7FF) != 0:
            sig += 0x1000
        return sign + (sig >> 13)
    sig = f & 0x007FFFFF
    if (sig & 0x3FFF) != 0x1000:
        sig += 0x1000
    return sign + ((exp - 0x38000000) >> 13) + (sig >> 13)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def route_layer(w: np.ndarray, sg: np.ndarray, mass: np.ndarray, domain: np.ndarray, prev: np.ndarray,
                succ: np.ndarray, factor: float, bits: np.ndarray, exps: np.ndarray, kg: int, block: int,
                sigmoid: bool, sig_scale: float, ex: np.ndarray, bl: np.ndarray, ids_out: np.ndarray,
                w_out: np.ndarray, h_out: np.ndarray) -> None:
    """Route the tokens of one layer (see synth_route.route_layer_numpy for the definition and the shapes).

    ``ex``, ``bl``: synth_route.geometry's tables, so that no integer division runs per token. Weights go to
    ``w_out [T, k]`` float32, or as float16 bits to ``h_out [T, k]`` uint16 when it has rows."""
    T = domain.shape[0]
    E = w.shape[1]
    G, nbg = sg.shape[1], sg.shape[2]
    per = E // G
    k = ids_out.shape[1]
    ng = kg if G > 1 else 0
    kgs = kg if G > 1 else 1
    n = kgs * per
    nb = kgs * nbg
    cand = np.zeros(n + k)  # + spare entries (and block sums) for successors outside the kept groups
    S = np.zeros(nb + k)
    cnt = np.empty(nb, np.int64)
    chosen = np.zeros(kgs, np.int64)
    slot = np.empty(G, np.int64)
    gm = np.empty(G)
    tt = np.empty(k)
    bonus = prev.shape[0] > 0
    half = h_out.shape[0] > 0
    f32 = np.empty(1, np.float32)
    f32_bits = f32.view(np.uint32)
    for t in range(T):
        d = domain[t]
        # -- groups: kg of G without replacement, in proportion to their mass ---------------------------
        if G > 1:
            tot = 0.0
            for g in range(G):
                slot[g] = -1
                gm[g] = mass[d, g]
                tot += gm[g]
            for r in range(ng):
                target = (bits[t, r] + 0.5) * _U32 * tot
                c = 0.0
                pick = 0
                last = 0
                for g in range(G):  # branch-free, as for the experts below
                    free = slot[g] < 0
                    c += gm[g] if free else 0.0
                    pick += c <= target
                    last = g if free else last
                if pick == G:
                    pick = last
                chosen[r] = pick
                slot[pick] = r
                tot = tot - gm[pick]
                if not tot > 0.0:  # rounding ate the rest: recount
                    tot = 0.0
                    for g in range(G):
                        if slot[g] < 0:
                            tot += gm[g]
        else:
            slot[0] = 0
        # -- candidates (the kept groups' experts) and their block sums, successor bonus ----------------
        for j in range(kgs):
            src = chosen[j] * per
            cand[j * per:(j + 1) * per] = w[d, src:src + per]
            for bb in range(nbg):
                S[j * nbg + bb] = sg[d, chosen[j], bb]
                cnt[j * nbg + bb] = bl[2, j * nbg + bb] - bl[1, j * nbg + bb]
        if bonus:  # branch-free: a successor outside the kept groups lands in a spare last entry of its own
            # (one per successor, so they form no chain of loads and stores through one shared entry)
            for j in range(k):
                s = succ[prev[t, j]]
                sl = slot[ex[0, s]]
                p = sl * per + ex[1, s] if sl >= 0 else n + j
                q = sl * nbg + ex[2, s] if sl >= 0 else nb + j
                x = cand[p]
                xb = x * factor
                cand[p] = xb
                S[q] += xb - x
        tot = 0.0
        for b in range(nb):
            tot += S[b]
        # -- k experts without replacement (block, then inside it), race times of the exponential race ---
        acc = 0.0
        for r in range(k):
            target = (bits[t, ng + r] + 0.5) * _U32 * tot
            # the first block whose running sum passes the target = the number of running sums <= target (the
            # sums never fall): counted without an early exit, so the loop has no branch to mispredict; cb, the
            # last sum <= target, is what the blocks before it hold (kept in a register, not stored and reloaded)
            cn = 0.0
            cb = 0.0
            pb = 0
            for b in range(nb):
                cn += S[b]
                below = cn <= target
                pb += below
                cb = cn if below else cb
            if pb == nb:  # rounding carried the target past the end: the last block with candidates left
                pb = nb - 1
                while cnt[pb] == 0:
                    pb -= 1
                target2 = np.inf
            else:
                target2 = target - cb
            j = bl[0, pb]
            a = bl[1, pb]
            stop = bl[2, pb]
            c2 = 0.0
            pi = a
            for p in range(a, stop):
                c2 += cand[p]
                pi += c2 <= target2
            if pi == stop:  # the same at the end of the block: its last candidate left
                pi = stop - 1
                while cand[pi] == 0.0:
                    pi -= 1
            x = cand[pi]
            acc += exps[t, r] / tot
            tt[r] = acc
            ids_out[t, r] = chosen[j] * per + (pi - j * per)
            cand[pi] = 0.0
            cnt[pb] -= 1
            sb = S[pb] - x if cnt[pb] > 0 else 0.0
            S[pb] = sb if sb > 0.0 else 0.0
            tot = tot - x
            if not tot > 0.0:  # rounding ate the rest: recount exactly
                tot = 0.0
                for b in range(nb):
                    s2 = 0.0
                    for p in range(bl[1, b], bl[2, b]):
                        if cand[p] > 0.0:
                            s2 += cand[p]
                    S[b] = s2
                    tot += s2
        # -- router weights from the race times ---------------------------------------------------------
        ssum = 0.0
        t0 = tt[0]
        for r in range(k):
            v = 1.0 / (1.0 + tt[r] * sig_scale) if sigmoid else t0 / tt[r]
            tt[r] = v
            ssum += v
        for r in range(k):
            if half:
                f32[0] = tt[r] / ssum
                h_out[t, r] = half_bits(f32_bits[0])
            else:
                w_out[t, r] = tt[r] / ssum
