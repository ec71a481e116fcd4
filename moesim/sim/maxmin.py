"""Max-min fair rates of flows over links (the fluid model's allocation), and the links that can never bind.

Pure functions over a padded route table, used by the DES's flow network (:mod:`moesim.sim.network`) and by the
analytic engine (:func:`dominated_links`). The compiled counterparts live in :mod:`moesim.sim.maxmin_jit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moesim.sim import maxmin_jit as _jit

# Relative tolerance when deciding which links are saturated at the current fair-share level.
_LEVEL_RTOL = 1e-9


def maxmin_rates(routes: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Max-min fair rates (see :func:`maxmin_rates_numpy`): the compiled per-flow solve where numba is installed
    (:mod:`moesim.sim.maxmin_jit`, bit-identical results), else numpy."""
    if _jit.load():
        return _jit.maxmin_rates_jit(routes, capacity, _LEVEL_RTOL)
    return maxmin_rates_numpy(routes, capacity)


def maxmin_rates_numpy(routes: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Max-min fair rates (the allocation progressive filling reaches), computed in parallel rounds.

    routes [F, H] int: link indices of each flow, padded with ``len(capacity) - 1`` (a pad link whose
    capacity must be ``inf``); capacity [E+1] bytes/s. Returns rates [F] (bytes/s; ``inf`` for a flow that
    crosses no finite link).

    Progressive filling saturates one link level at a time (one round per distinct level: ~ one per link).
    Here every round freezes all links that are a *local* minimum of the fair share ``remaining capacity /
    unfrozen flows`` among the links their flows cross: while the fill level rises, a link's fair share
    never decreases (a flow frozen below a link's share leaves more for the others), so a local-minimum link
    saturates at exactly its current share, whatever happens elsewhere. Same allocation, far fewer rounds.
    """
    F = routes.shape[0]
    rate = np.full(F, np.inf)
    if F == 0:
        return rate
    n_links = capacity.shape[0]
    pad = n_links - 1
    cur = np.ascontiguousarray(routes.T)  # [H, F]: reductions over the short hop axis run fast on axis 0
    H = cur.shape[0]
    count = np.bincount(cur.ravel(), minlength=n_links).astype(np.float64)
    remcap = capacity.astype(np.float64, copy=True)
    remcap[pad] = np.inf
    idx = None  # flows still unfrozen (None: all, in the first round)
    c = 1.0 + _LEVEL_RTOL
    with np.errstate(divide="ignore", invalid="ignore"):
        while True:
            # count[e] = entries of e in cur, so every link read below has count > 0 (others' shares unused)
            share = remcap / count
            fs = share.take(cur)  # [H, F']
            fmin = fs.min(axis=0)
            # a link is not a local minimum if some flow crossing it has a smaller share elsewhere
            local = np.bincount(np.where(fs > fmin * c, cur, pad).ravel(), minlength=n_links) == 0
            local[pad] = False
            hit = local.take(cur).any(axis=0)
            r = np.maximum(fmin[hit], 0.0)
            if r.size == 0:
                break  # what is left crosses only unconstrained links (the busiest finite link is always local)
            rate[hit if idx is None else idx[hit]] = r
            fr = cur.compress(hit, axis=1).ravel()  # (array methods: no numpy wrapper overhead)
            count -= np.bincount(fr, minlength=n_links)
            remcap -= np.bincount(fr, weights=r[None, :].repeat(H, axis=0).ravel(), minlength=n_links)
            if r.size == cur.shape[1]:
                break
            keep = ~hit
            idx = keep.nonzero()[0] if idx is None else idx[keep]
            cur = cur.compress(keep, axis=1)
    return rate


def dominated_links(routes: Sequence[Sequence[int]], edge_bw: Any) -> np.ndarray:
    """Links that can never constrain max-min rates given every route flows will ever take: bool [E].

    Link ``e`` is dominated by ``e2`` when every route crossing ``e`` also crosses ``e2`` and ``e2`` is no
    wider (ties: the higher index goes). Then ``load(e) <= load(e2) <= bw(e2) <= bw(e)`` for any set of flows,
    so ``e``'s capacity constraint is implied and dropping it leaves the feasible set — and the max-min
    allocation — unchanged. (Rail-optimised fabrics have chains of such links: GPU->NIC->leaf.) Unused
    links are dominated too. Pass the result as ``FlowNetwork(ignore_links=...)``; it is only valid if no
    flow ever takes a route outside ``routes`` (lists of link indices, or a [P, H] table padded with -1).
    """
    import scipy.sparse as sp

    bw = np.asarray(edge_bw, dtype=np.float64).ravel()
    E = bw.size
    if isinstance(routes, np.ndarray) and routes.ndim == 2:  # a route table padded with -1 (the DES's)
        rows, cols = (routes >= 0).nonzero()
        cols = routes[rows, cols]
    else:
        rows = np.array([i for i, r in enumerate(routes) for _ in r], dtype=np.int64)
        cols = np.array([e for r in routes for e in r], dtype=np.int64)
    if not cols.size:
        return np.ones(E, dtype=bool)
    M = sp.csr_matrix((np.ones(cols.size), (rows, cols)), shape=(len(routes), E))
    M.data[:] = 1.0
    M.sum_duplicates()
    M.data[:] = 1.0
    co = (M.T @ M).toarray()  # [E, E] routes crossing both
    n = np.diag(co).copy()
    subset = (co >= n[:, None]) & (n[:, None] > 0)  # subset[e, e2]: routes(e) within routes(e2)
    np.fill_diagonal(subset, False)
    same = subset & subset.T
    idx = np.arange(E)
    wider = bw[:, None] > bw[None, :]
    tie = (bw[:, None] == bw[None, :]) & (~same | (idx[None, :] < idx[:, None]))
    dominated = (subset & (wider | tie)).any(axis=1)
    return dominated | (n == 0)


def narrow_first(routes: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Routes [F, H] with each row's links ordered by capacity, then index (pads, infinite, last): a flow's
    narrowest links — its class's — come first, so the compiled certificate visits only the wider ones."""
    routes = np.asarray(routes, dtype=np.int64)
    order = np.lexsort((routes, np.asarray(capacity)[routes]), axis=1)
    return np.take_along_axis(routes, order, axis=1)
