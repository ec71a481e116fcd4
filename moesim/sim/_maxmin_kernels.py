"""numba kernels of :mod:`moesim.sim.maxmin_jit` (imported only by its ``load()``, where numba is installed)."""

from __future__ import annotations

import numba
import numpy as np

from moesim.sim.maxmin import narrow_first


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _solve(routes: np.ndarray, capacity: np.ndarray, rtol: float) -> np.ndarray:
    return _solve_w(routes, np.ones(routes.shape[0]), capacity, rtol)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _solve_w(routes: np.ndarray, mult: np.ndarray, capacity: np.ndarray, rtol: float) -> np.ndarray:
    """Row f of ``routes`` stands for ``mult[f]`` flows with that route (all get the same max-min rate); with
    ``mult`` all ones the float operations are those of ``maxmin_rates_numpy`` (x * 1.0 == x). Routes of up to 4
    hops run a copy compiled for their hop count (its loops unrolled: ~1.2x)."""
    H = routes.shape[1]
    if H == 1:
        return _solve_h(routes, mult, capacity, rtol, 1)
    if H == 2:
        return _solve_h(routes, mult, capacity, rtol, 2)
    if H == 3:
        return _solve_h(routes, mult, capacity, rtol, 3)
    if H == 4:
        return _solve_h(routes, mult, capacity, rtol, 4)
    return _solve_h(routes, mult, capacity, rtol, H)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _solve_h(routes, mult, capacity, rtol, H):
    """``_solve_w`` for routes of ``H`` hops (a compile-time constant where the caller passes one). The per-flow
    passes are branch-free (flags or-ed in, rows written to both lists and the right count advanced): the
    local-minimum tests follow no pattern a branch predictor could learn (~1.6x)."""
    F = routes.shape[0]
    n_links = capacity.shape[0]
    pad = n_links - 1
    rate = np.full(F, np.inf)
    if F == 0:
        return rate
    count = np.zeros(n_links)
    for h in range(H):
        for f in range(F):
            count[routes[f, h]] += mult[f]
    remcap = capacity.copy()
    remcap[pad] = np.inf
    # the per-round link loops visit only the links some unfrozen flow crosses (a cluster has many more)
    used = np.empty(n_links, dtype=np.int64)
    nu = 0
    for e in range(n_links):
        if count[e] > 0:
            used[nu] = e
            nu += 1
    c = 1.0 + rtol
    active = np.arange(F)  # unfrozen flows, in their original order (as numpy's compress keeps it)
    frozen = np.empty(F, dtype=np.int64)
    fmin = np.empty(F)
    share = np.empty(n_links)
    notlocal = np.zeros(n_links, dtype=np.uint8)
    sub = np.zeros(n_links)
    cnt = np.zeros(n_links)
    n = F
    while True:
        for u in range(nu):
            e = used[u]
            share[e] = remcap[e] / count[e]
            notlocal[e] = 0
        for i in range(n):
            f = active[i]
            m = share[routes[f, 0]]
            for h in range(1, H):
                s = share[routes[f, h]]
                m = s if s < m else m
            fmin[i] = m
            t = m * c
            for h in range(H):
                e = routes[f, h]
                notlocal[e] |= np.uint8(share[e] > t)
        notlocal[pad] = 1
        nh = 0
        nk = 0
        for i in range(n):
            f = active[i]
            keep = np.uint8(1)  # every link of the flow has a flow with a smaller share: not frozen this round
            for h in range(H):
                keep &= notlocal[routes[f, h]]
            m = fmin[i]
            rate[f] = m if m > 0.0 else 0.0  # (a kept flow's is overwritten in a later round)
            frozen[nh] = f
            active[nk] = f
            nh += 1 - keep
            nk += keep
        if nh == 0 or nk == 0:
            for i in range(nk if nh == 0 else 0):
                rate[active[i]] = np.inf  # (no link froze: unconstrained flows)
            break
        # per link: flows frozen this round, summed hop by hop in flow order (numpy's bincount order)
        for u in range(nu):
            e = used[u]
            sub[e] = 0.0
            cnt[e] = 0.0
        for h in range(H):
            for j in range(nh):
                f = frozen[j]
                e = routes[f, h]
                sub[e] += rate[f] * mult[f]
                cnt[e] += mult[f]
        nu2 = 0
        for u in range(nu):
            e = used[u]
            count[e] -= cnt[e]
            remcap[e] -= sub[e]
            if count[e] > 0:  # (links no unfrozen flow crosses any more leave the per-round loops)
                used[nu2] = e
                nu2 += 1
        nu = nu2
        n = nk
    return rate


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _class_add(c, cnt, present, ppos, nstate):
    """One more flow of class ``c``: ``cnt`` [C] flows per class, ``present[:nstate[0]]`` the classes with flows
    (``ppos`` [C]: each one's index there, -1 if absent)."""
    if cnt[c] == 0.0:
        ppos[c] = nstate[0]
        present[nstate[0]] = c
        nstate[0] += 1
    cnt[c] += 1.0


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _class_remove(c, cnt, present, ppos, nstate):
    """One flow of class ``c`` fewer (the inverse of ``_class_add``; the last present class takes the gap)."""
    cnt[c] -= 1.0
    if cnt[c] == 0.0:
        nc = nstate[0] - 1
        p = ppos[c]
        last = present[nc]
        present[p] = last
        ppos[last] = p
        ppos[c] = -1
        nstate[0] = nc


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _gather(rows, store):
    """Routes [F, H] of flows by their rows of the route store [R, H]."""
    out = np.empty((rows.shape[0], store.shape[1]), dtype=np.int64)
    for f in range(rows.shape[0]):
        for h in range(store.shape[1]):
            out[f, h] = store[rows[f], h]
    return out


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _solve_classes(rows, store, wide, cls, cls_rt, cls_tier, cls_nn, capacity, rtol, cnt, scr_rate, present, nc):
    """Max-min rates of flows with routes ``store[rows]`` [F, H] and class ids ``cls`` [F]: the same allocation as
    ``_solve(store[rows], ...)`` (certified, else that solve runs), at a fraction of its work where many flows share
    their narrowest links (see ``maxmin_rates_classes``). ``cnt`` [C]: flows per class, ``present[:nc]``: the
    classes with flows (both kept by the caller); ``scr_rate`` [C] is scratch. A flow's first
    ``cls_nn[class]`` hops are its class's narrowest links (rows ordered narrow first), the rest wider: ``wide``
    [F, W] (pad-filled), read in flow order by the certificate."""
    F = rows.shape[0]
    H = store.shape[1]
    n_links = capacity.shape[0]
    pad = n_links - 1
    if F == 0:
        return np.full(0, np.inf)
    c1 = np.inf
    n1 = 0  # classes of the narrowest tier
    for i in range(nc):
        t = cls_tier[present[i]]
        if t < c1:
            c1 = t
            n1 = 0
        n1 += t == c1
    # stage 1: the flows of the narrowest tier, one row per class, constrained by their tier's links only
    HT = cls_rt.shape[1]
    n2 = 0
    rt1 = np.empty((n1, HT), dtype=np.int64)
    mult = np.empty(n1)
    j = 0
    for i in range(nc):
        c = present[i]
        if cls_tier[c] == c1:
            mult[j] = cnt[c]
            for h in range(HT):
                rt1[j, h] = cls_rt[c, h]
            j += 1
        else:
            n2 += int(cnt[c])
    r1 = _solve_w(rt1, mult, capacity, rtol)
    j = 0
    for i in range(nc):  # each present class's stage-1 rate, -1 for the wider tiers' (one read per flow below)
        c = present[i]
        if cls_tier[c] == c1:
            scr_rate[c] = r1[j]
            j += 1
        else:
            scr_rate[c] = -1.0
    rate = np.empty(F)
    # stage-1 load and largest rate on the wider links (a flow's hops past its class's narrow ones; the pad's
    # entries are never read)
    load = np.zeros(n_links)
    top = np.zeros(n_links)
    idx2 = np.empty(n2, dtype=np.int64)
    k = 0
    for f in range(F):
        r = scr_rate[cls[f]]
        if r >= 0.0:
            rate[f] = r
            for h in range(wide.shape[1]):
                e = wide[f, h]
                if e == pad:
                    break
                load[e] += r
                if n2 > 0:  # (only a wider-tier flow compares with it)
                    t = top[e]
                    top[e] = r if r > t else t
        else:
            idx2[k] = f
            k += 1
    ok = True
    for e in range(pad):
        if capacity[e] > c1 and load[e] > capacity[e] * (1.0 + rtol):
            ok = False  # a wider link would bind the narrow tier: not certified
            break
    if ok and n2 > 0:
        # stage 2: every other flow on its whole route, over what stage 1 left
        residual = capacity.copy()
        for e in range(pad):
            x = capacity[e] - load[e]
            residual[e] = x if x > 0.0 else 0.0
        rt2 = np.empty((n2, H), dtype=np.int64)
        for i in range(n2):
            w = rows[idx2[i]]
            for h in range(H):
                rt2[i, h] = store[w, h]
        r2 = _solve(rt2, residual, rtol)
        for i in range(n2):
            r = r2[i]
            rate[idx2[i]] = r
            for h in range(H):
                e = rt2[i, h]
                if e != pad and r * (1.0 + rtol) < top[e]:
                    ok = False  # a narrow-tier flow is faster on its link: the certificate fails
    if not ok:
        return _solve(_gather(rows, store), capacity, rtol)
    return rate


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _solve_classes_uncounted(routes, cls, cls_rt, cls_tier, cls_nn, capacity, rtol, cnt, scr_rate):
    C = cnt.shape[0]
    present = np.empty(C, dtype=np.int64)
    ppos = np.full(C, -1, dtype=np.int64)
    nstate = np.zeros(1, dtype=np.int64)
    F, H = routes.shape
    wide = np.full((F, H), capacity.shape[0] - 1, dtype=np.int64)
    for f in range(F):
        _class_add(cls[f], cnt, present, ppos, nstate)
        for h in range(cls_nn[cls[f]], H):
            wide[f, h - cls_nn[cls[f]]] = routes[f, h]
    rate = _solve_classes(np.arange(F), routes, wide, cls, cls_rt, cls_tier, cls_nn, capacity, rtol, cnt,
                          scr_rate, present, nstate[0])
    cnt[:] = 0.0
    return rate


def maxmin_rates_classes(routes: np.ndarray, cls: np.ndarray, cls_rt: np.ndarray, cls_tier: np.ndarray,
                         capacity: np.ndarray, rtol: float) -> np.ndarray:
    """routes [F, H], class ids [F], class routes [C, HT] (padded with ``len(capacity) - 1``) and tiers [C] ->
    rates [F] (see ``_solve_classes``; each route is put narrow-first here)."""
    C = cls_rt.shape[0]
    i64, f64 = np.int64, np.float64
    capacity = np.ascontiguousarray(capacity, dtype=f64)
    routes = np.ascontiguousarray(narrow_first(routes, capacity))
    cls_rt = np.ascontiguousarray(cls_rt, dtype=i64)
    nn = (cls_rt < capacity.size - 1).sum(axis=1).astype(i64)
    return _solve_classes_uncounted(routes, np.ascontiguousarray(cls, dtype=i64), cls_rt,
                                    np.ascontiguousarray(cls_tier, dtype=f64), nn, capacity, float(rtol),
                                    np.zeros(C), np.zeros(C))


def maxmin_rates_jit(routes: np.ndarray, capacity: np.ndarray, rtol: float) -> np.ndarray:
    """routes [F, H] int (padded with ``len(capacity) - 1``), capacity [E+1] -> rates [F] (bytes/s)."""
    return _solve(np.ascontiguousarray(routes, dtype=np.int64),
                  np.ascontiguousarray(capacity, dtype=np.float64), float(rtol))

@numba.njit(cache=True, nogil=True, error_model="numpy")
def _partition3(a, lo, hi, p1, p2):
    """Reorder ``a[lo:hi+1]`` into ``< p1 | [p1, p2] | > p2``; returns (start, end) of the middle band."""
    lt, i, gt = lo, lo, hi
    while i <= gt:
        v = a[i]
        if v < p1:
            a[lt], a[i] = v, a[lt]
            lt += 1
            i += 1
        elif v > p2:
            a[gt], a[i] = v, a[gt]
            gt -= 1
        else:
            i += 1
    return lt, gt


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _select(a, k):
    """The k-th smallest of ``a`` (reordered in place), as ``np.partition(a, k)[k]`` (no NaN in ``a``).

    Floyd-Rivest style: two pivots drawn from an even sample around the target rank cut the range to a thin band
    in one pass, so transfer times that arrive nearly sorted (flows start in order) cost O(n) where a
    median-of-three quickselect (and numba's ``np.partition``) crawl."""
    lo = 0
    hi = a.shape[0] - 1
    sample = np.empty(64)
    while hi - lo > 512:
        m = hi - lo + 1
        for j in range(64):
            sample[j] = a[lo + (j * (m - 1)) // 63]
        sample.sort()
        pos = ((k - lo) * 63) // (m - 1)
        p1 = sample[max(pos - 3, 0)]
        p2 = sample[min(pos + 3, 63)]
        lt, gt = _partition3(a, lo, hi, p1, p2)
        if k < lt:
            hi = lt - 1
        elif k > gt:
            lo = gt + 1
        else:
            if p1 == p2:
                return p1
            if lt == lo and gt == hi:
                break  # no progress (a wide band of near-equal values): finish with the plain quickselect
            lo, hi = lt, gt
    while lo < hi:
        x, y, z = a[lo], a[(lo + hi) // 2], a[hi]
        pivot = max(min(x, y), min(max(x, y), z))  # median of three
        lt, gt = _partition3(a, lo, hi, pivot, pivot)
        if k < lt:
            hi = lt - 1
        elif k > gt:
            lo = gt + 1
        else:
            return pivot
    return a[k]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _max_upto(a, lim):
    """The largest value of ``a`` at or below ``lim`` (-inf if none); branch-free (~2.5x: the test follows no
    pattern, and the loop vectorises)."""
    d = -np.inf
    for i in range(a.shape[0]):
        v = a[i]
        d = max(d, v if v <= lim else -np.inf)
    return d


_SAMPLE = 128  # sample size and rank margin of _median_handover's pivots
_MARGIN = 14


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _median_handover(ttf, k, first, quantum, rel_quantum):
    """The hand-over delay of a batch point whose quantum the median may widen: the largest ``ttf`` at or below
    ``first + max(quantum, rel_quantum * m)``, m the k-th smallest ``ttf`` (``np.partition(ttf, k)[k]``); ``ttf``
    left as it is, no NaN in it.

    Two pivots p1 <= m <= p2 from a sample bound the limit between T_lo and T_hi; one vectorised pass counts
    the values below p1, in [p1, p2] and in (T_lo, T_hi]. If none lies in (T_lo, T_hi] the limit may as well be
    T_lo, m unneeded; else m is selected among the few in [p1, p2]. A last pass finds the largest at or below
    the limit. Where the sample missed m (~1 % of calls), m is selected in a copy of the whole."""
    n = ttf.shape[0]
    if n > 4 * _SAMPLE:
        # (hashed positions: flows come in runs of similar times, which an even stride aliases with; the rank
        # error of the sample is ~sqrt(S)/2 positions, the margin 2.5 of those)
        sample = np.empty(_SAMPLE)
        for j in range(_SAMPLE):
            sample[j] = ttf[(j * 2654435761) % n]
        sample.sort()
        pos = (k * (_SAMPLE - 1)) // (n - 1)
        p1 = sample[max(pos - _MARGIN, 0)]
        p2 = sample[min(pos + _MARGIN, _SAMPLE - 1)]
        t_lo = first + max(quantum, rel_quantum * p1)
        t_hi = first + max(quantum, rel_quantum * p2)
        below = 0
        m = 0
        nm = 0
        for i in range(n):  # (integer counts only: vectorised)
            v = ttf[i]
            below += np.int64(v < p1)
            m += np.int64(v >= p1) & np.int64(v <= p2)
            nm += np.int64(v > t_lo) & np.int64(v <= t_hi)
        if below <= k < below + m:
            if nm == 0:
                return _max_upto(ttf, t_lo)
            band = np.empty(m + 1)  # (+1: every value is written, the in-band ones kept)
            j = 0
            for i in range(n):
                v = ttf[i]
                band[j] = v
                j += (v >= p1) & (v <= p2)
            return _max_upto(ttf, first + max(quantum, rel_quantum * _select(band[:m], k - below)))
    return _max_upto(ttf, first + max(quantum, rel_quantum * _select(ttf.copy(), k)))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _arrive_one(g, t, f, pending, latest, last, done, nd):
    """Flow ``f`` arrived at ``t`` in group ``g``: the group's latest arrival (ties: the later-counted flow) and
    pending count; a group completed goes to ``done[nd]``. Returns (groups done, ``g`` if it got too many or -1)."""
    if t >= latest[g]:
        latest[g] = t
        last[g] = f
    pending[g] -= 1
    if pending[g] == 0:
        done[nd] = g
        return nd + 1, -1
    return nd, g if pending[g] < 0 else -1


@numba.njit(cache=True, nogil=True, error_model="numpy")
def update_core(ff, fi, n, n_new, dt, now, eps, cap, rtol, quantum, rel_quantum, store, cls_rt, cls_tier, cls_nn,
                cnt, present, ppos, nstate, scr_rate, req, end, row_bytes, g_pending, g_latest, g_last,
                done_groups):
    """One batch point in place over the flow buffers: rows [0, n) are in flight, [n, n + n_new) just started.

    ff [cap, 4] float: remaining bytes, rate, projected end, path latency; fi [cap, 4 + W] int: group, flow id,
    class, row of the route store ``store`` [R, H] (constraining links, narrow first), the hops past the class's
    narrow links (pad-filled). ``cnt``, ``present``, ``ppos``, ``nstate``: the flows per class in flight (see
    ``_class_add``), kept here as flows come and go. Moves the flows forward by ``dt``, retires the due ones
    (their bytes delivered and added to their store row's ``row_bytes``, arrival recorded, counted towards their
    groups as ``arrive_core`` does), compacts the rest and the new ones to the front, solves the rates and finds
    the next hand-over.
    Returns (flows in flight, groups completed — ``done_groups[:k]`` in completion order —, a group that got
    more flows than expected or -1, delay to the next hand-over or -1 if nothing is in flight)."""
    lim = now + eps * abs(now)
    k = 0
    ndone = 0
    bad = -1
    for i in range(n + n_new):
        if i < n:
            if dt > 0:  # move the flow forward at its rate
                r = ff[i, 1] * dt
                ff[i, 0] -= r if r < ff[i, 0] else ff[i, 0]
            if ff[i, 2] <= lim or ff[i, 0] <= 0:
                f = fi[i, 1]
                g = fi[i, 0]
                row_bytes[fi[i, 3]] += req[f]
                t = (ff[i, 2] if ff[i, 2] < now else now) + ff[i, 3]
                end[f] = t
                _class_remove(fi[i, 2], cnt, present, ppos, nstate)
                if bad < 0:
                    ndone, bad = _arrive_one(g, t, f, g_pending, g_latest, g_last, done_groups, ndone)
                continue
        else:
            _class_add(fi[i, 2], cnt, present, ppos, nstate)
        if k != i:
            ff[k, 0] = ff[i, 0]
            ff[k, 3] = ff[i, 3]
            for j in range(fi.shape[1]):
                fi[k, j] = fi[i, j]
        k += 1
    K = k
    if K == 0:
        return 0, ndone, bad, -1.0
    rate = _solve_classes(fi[:K, 3], store, fi[:K, 4:], fi[:K, 2], cls_rt, cls_tier, cls_nn, cap, rtol, cnt,
                          scr_rate, present, nstate[0])
    ttf = np.empty(K)
    first = np.inf
    # the median of ttf widens the quantum only if it exceeds quantum / rel_quantum: count the flows at or below
    thr = quantum / rel_quantum if rel_quantum > 0 else np.inf
    n_le = 0
    for i in range(K):
        ff[i, 1] = rate[i]
        t = ff[i, 0] / rate[i]
        ttf[i] = t
        ff[i, 2] = now + t
        first = min(first, t)
        n_le += t <= thr
    if first < 0.0:
        first = 0.0
    if rel_quantum > 0 and n_le <= K // 2:  # (else the median is <= thr: it cannot widen the quantum)
        delay = _median_handover(ttf, K // 2, first, quantum, rel_quantum)
    elif quantum > 0:
        delay = _max_upto(ttf, first + quantum)
    else:
        delay = first
    return K, ndone, bad, delay


@numba.njit(cache=True, nogil=True, error_model="numpy")
def start_core(rows, nb, grp, f0, now, tab_off, tab_lat, tab_cls, tab_empty, wide, pad, ff, fi, i0, req, start,
               end, g_pending, g_latest, g_last):
    """Start flows ``f0 + j`` along route-table ``rows`` [F] (bytes ``nb``, groups ``grp``): records written; one
    with nothing to move or no link to cross arrives after its path latency, counted towards its group as
    ``arrive_core`` does; the others appended to the flow buffers from row ``i0`` (the caller made room; their
    wider hops from ``wide`` [store rows, W], pad-filled to the buffer's width).
    Returns (flows buffered, groups completed in order, a group that got more flows than expected or -1)."""
    F = rows.shape[0]
    done = np.empty(F, dtype=np.int64)
    nd = 0
    bad = -1
    k = i0
    W = fi.shape[1] - 4
    Ww = wide.shape[1]
    for j in range(F):
        f = f0 + j
        w = rows[j]
        req[f] = nb[j]
        start[f] = now
        if nb[j] <= 0 or tab_empty[w]:
            t = now + tab_lat[w]
            end[f] = t
            if bad < 0:
                nd, bad = _arrive_one(grp[j], t, f, g_pending, g_latest, g_last, done, nd)
            continue
        end[f] = np.nan
        ff[k, 0] = nb[j]
        ff[k, 3] = tab_lat[w]
        fi[k, 0] = grp[j]
        fi[k, 1] = f
        fi[k, 2] = tab_cls[w]
        s = w + tab_off
        fi[k, 3] = s
        for h in range(W):
            fi[k, 4 + h] = wide[s, h] if h < Ww else pad
        k += 1
    return k - i0, done[:nd], bad


@numba.njit(cache=True, nogil=True)
def arrive_core(groups, when, fids, pending, latest, last):
    """Count arrivals towards their groups, in order; returns (groups completed, in the order they
    completed; a group that got more flows than it expected, or -1)."""
    done = np.empty(groups.shape[0], dtype=np.int64)
    nd = 0
    for i in range(groups.shape[0]):
        nd, bad = _arrive_one(groups[i], when[i], fids[i], pending, latest, last, done, nd)
        if bad >= 0:
            return done[:nd], bad
    return done[:nd], -1
