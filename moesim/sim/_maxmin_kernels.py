"""numba kernels of :mod:`moesim.sim.maxmin_jit` (imported only by its ``load()``, where numba is installed)."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _solve(routes: np.ndarray, capacity: np.ndarray, rtol: float) -> np.ndarray:
    F, H = routes.shape
    n_links = capacity.shape[0]
    pad = n_links - 1
    rate = np.full(F, np.inf)
    if F == 0:
        return rate
    count = np.zeros(n_links)
    for h in range(H):
        for f in range(F):
            count[routes[f, h]] += 1.0
    remcap = capacity.copy()
    remcap[pad] = np.inf
    c = 1.0 + rtol
    active = np.arange(F)  # unfrozen flows, in their original order (as numpy's compress keeps it)
    frozen = np.empty(F, dtype=np.int64)
    fmin = np.empty(F)
    share = np.empty(n_links)
    notlocal = np.zeros(n_links, dtype=np.bool_)
    sub = np.zeros(n_links)
    cnt = np.zeros(n_links)
    n = F
    while True:
        for e in range(n_links):
            share[e] = remcap[e] / count[e]  # (0/0 and x/0 only on links no flow reads)
            notlocal[e] = False
        for i in range(n):
            f = active[i]
            m = share[routes[f, 0]]
            for h in range(1, H):
                s = share[routes[f, h]]
                if s < m:
                    m = s
            fmin[i] = m
            t = m * c
            for h in range(H):
                e = routes[f, h]
                if share[e] > t:
                    notlocal[e] = True
        notlocal[pad] = True
        nh = 0
        nk = 0
        for i in range(n):
            f = active[i]
            hit = False
            for h in range(H):
                if not notlocal[routes[f, h]]:
                    hit = True
                    break
            if hit:
                rate[f] = fmin[i] if fmin[i] > 0.0 else 0.0
                frozen[nh] = f
                nh += 1
            else:
                active[nk] = f
                nk += 1
        if nh == 0 or nk == 0:
            break
        # per link: flows frozen this round, summed hop by hop in flow order (numpy's bincount order)
        for e in range(n_links):
            sub[e] = 0.0
            cnt[e] = 0.0
        for h in range(H):
            for j in range(nh):
                f = frozen[j]
                e = routes[f, h]
                sub[e] += rate[f]
                cnt[e] += 1.0
        for e in range(n_links):
            count[e] -= cnt[e]
            remcap[e] -= sub[e]
        n = nk
    return rate

def maxmin_rates_jit(routes: np.ndarray, capacity: np.ndarray, rtol: float) -> np.ndarray:
    """routes [F, H] int (padded with ``len(capacity) - 1``), capacity [E+1] -> rates [F] (bytes/s)."""
    return _solve(np.ascontiguousarray(routes, dtype=np.int64),
                  np.ascontiguousarray(capacity, dtype=np.float64), float(rtol))

@numba.njit(cache=True, nogil=True, error_model="numpy")
def update_core(croutes, remaining, rate, finish, lat, group, fid, dt, now, eps,
                 n_croutes, n_remaining, n_lat, n_group, n_fid, cap, rtol, quantum, rel_quantum):
    F, H = croutes.shape
    pad = cap.shape[0] - 1
    if dt > 0:
        for i in range(F):
            r = rate[i] * dt
            remaining[i] -= r if r < remaining[i] else remaining[i]
    lim = now + eps * abs(now)
    nd = 0
    for i in range(F):
        if finish[i] <= lim or remaining[i] <= 0:
            nd += 1
    d_fid = np.empty(nd, dtype=np.int64)
    d_group = np.empty(nd, dtype=np.int64)
    d_arr = np.empty(nd)
    Fn, Hn = n_croutes.shape
    K = F - nd + Fn
    H2 = max(H, Hn) if Fn else H
    o_cr = np.full((K, max(H2, 1)), pad, dtype=np.int64)
    o_rem = np.empty(K)
    o_lat = np.empty(K)
    o_group = np.empty(K, dtype=np.int64)
    o_fid = np.empty(K, dtype=np.int64)
    j = 0
    k = 0
    for i in range(F):
        if finish[i] <= lim or remaining[i] <= 0:
            d_fid[j] = fid[i]
            d_group[j] = group[i]
            d_arr[j] = (finish[i] if finish[i] < now else now) + lat[i]
            j += 1
        else:
            for h in range(H):
                o_cr[k, h] = croutes[i, h]
            o_rem[k] = remaining[i]
            o_lat[k] = lat[i]
            o_group[k] = group[i]
            o_fid[k] = fid[i]
            k += 1
    for i in range(Fn):
        for h in range(Hn):
            o_cr[k, h] = n_croutes[i, h]
        o_rem[k] = n_remaining[i]
        o_lat[k] = n_lat[i]
        o_group[k] = n_group[i]
        o_fid[k] = n_fid[i]
        k += 1
    if K == 0:
        return o_cr, o_rem, np.empty(0), np.empty(0), o_lat, o_group, o_fid, d_fid, d_group, d_arr, -1.0
    o_rate = _solve(o_cr, cap, rtol)
    ttf = np.empty(K)
    first = np.inf
    for i in range(K):
        ttf[i] = o_rem[i] / o_rate[i]
        if ttf[i] < first:
            first = ttf[i]
    if first < 0.0:
        first = 0.0
    o_fin = np.empty(K)
    for i in range(K):
        o_fin[i] = now + ttf[i]
    q = quantum
    if rel_quantum > 0:
        mid = K // 2
        med = np.partition(ttf, mid)[mid]
        if rel_quantum * med > q:
            q = rel_quantum * med
    if q > 0:
        delay = -np.inf
        lim2 = first + q
        for i in range(K):
            if ttf[i] <= lim2 and ttf[i] > delay:
                delay = ttf[i]
    else:
        delay = first
    return o_cr, o_rem, o_rate, o_fin, o_lat, o_group, o_fid, d_fid, d_group, d_arr, delay


@numba.njit(cache=True, nogil=True)
def arrive_core(groups, when, fids, pending, latest, last):
    """Count arrivals towards their groups, in order; returns (groups completed, in the order they
    completed; a group that got more flows than it expected, or -1)."""
    done = np.empty(groups.shape[0], dtype=np.int64)
    nd = 0
    for i in range(groups.shape[0]):
        g = groups[i]
        if when[i] >= latest[g]:
            latest[g] = when[i]
            last[g] = fids[i]
        pending[g] -= 1
        if pending[g] == 0:
            done[nd] = g
            nd += 1
        elif pending[g] < 0:
            return done[:nd], g
    return done[:nd], -1
