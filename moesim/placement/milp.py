"""Exact placement by mixed-integer programming (scipy.optimize.milp, the HiGHS solver), one layer at a time.

The busiest GPU's load under an even split over replicas, Σ_e load_e · n_eg / r_e with r_e = Σ_g n_eg, is not
linear. We make it linear by enumerating each expert's replica count (per-expert split is then fixed):

    z_ek ∈ {0,1}     expert e has exactly k replicas            Σ_k z_ek = 1
    u_egk ∈ {0,1}    a replica of e on GPU g if e has k of them Σ_g u_egk = k · z_ek   (so u_egk = 0 unless z_ek)
    slots            Σ_e Σ_k u_egk = S                           for every GPU g
    load             Σ_e Σ_k (load_e / k) · u_egk ≤ T            for every GPU g
    minimise T (+ the inter-node term below); GPU loads sorted (load_g ≥ load_g+1) to cut GPU symmetry.

k ≤ G and u ≤ 1 are the replica cap (no GPU holds an expert twice). This is exact: any capped placement maps
to one feasible point with the same busiest load and back. k runs over
1 .. min(N − E + 1, G) (N slots) when the model is small; on large layers (E·G·K above ``full_limit`` variables) each
expert's k is restricted to a window around its water-filling count, which the result's info records
("restricted": the optimum is then the optimum of that restricted model, and the gap is measured against the
global lower bound of base.lower_bound, which stays valid).

Inter-node term (optional, ``internode_weight`` λ > 0 with a ``coactivation`` [L, E, E] matrix): for the
``max_pairs`` most co-activated expert pairs (i, j) of the layer, binary h_em ≤ Σ_{g in node m} Σ_k u_egk says
expert e has a replica on node m, s_ijm ≤ h_im, s_ijm ≤ h_jm, d_ij ≥ 1 − Σ_m s_ijm (the pair shares no node),
and the objective adds λ · mean_load · Σ c_ij d_ij / Σ c_ij: a token that uses both experts can be served
within one node only when they share one.

Small layers are solved exactly another way, free of the GPU symmetry that makes the model above weak: a
GPU's content is a *pattern* (a set of S replicas (e, k) of distinct experts); x_p ∈ ℤ≥0 GPUs use pattern
p; Σ_p x_p = G; Σ_p mult_p(e, k) · x_p = k · z_ek; Σ_k z_ek = 1. For a target T only patterns of load ≤ T are
allowed, and a bisection over the sorted pattern loads finds the least feasible T (the exact optimum) in about
log2(#patterns) small feasibility MILPs. Used when the patterns number at most ``pattern_limit``.

A time limit is shared over the layers; each layer's result is the better of HiGHS's incumbent and the greedy
heuristic's placement (so it is never worse than greedy); info reports the gap reached per layer.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from moesim.mapping import ExpertMapping
from moesim.placement.base import lower_bound, replica_counts
from moesim.placement.simple import greedy


def milp_layer(load: np.ndarray, num_gpus: int, slots_per_gpu: int, *, time_limit: float = 10.0,
               kmax: np.ndarray | None = None, kmin: np.ndarray | None = None, gpus_per_node: int = 8,
               coactivation: np.ndarray | None = None, internode_weight: float = 0.0,
               max_pairs: int = 32, upper: float = np.inf) -> dict[str, Any]:
    """Solve one layer. Returns {"phy2log" [N] or None, "busiest", "bound", "status", "gap"} (loads unscaled).

    ``upper``: a known placement's busiest load (greedy's): T ≤ upper cuts off everything worse."""
    E, G, S = len(load), num_gpus, slots_per_gpu
    N = G * S
    scale = max(float(load.sum()) / G, 1e-12)
    w = load / scale
    kmin = np.ones(E, dtype=np.int64) if kmin is None else np.maximum(kmin, 1)
    top = min(N - E + 1, G)  # the replica cap: at most one replica of an expert per GPU
    kmax = np.full(E, top, dtype=np.int64) if kmax is None else np.minimum(kmax, top)
    pairs = [(e, k) for e in range(E) for k in range(int(kmin[e]), int(kmax[e]) + 1)]
    P = len(pairs)
    pe = np.array([p[0] for p in pairs])
    pk = np.array([p[1] for p in pairs], dtype=np.float64)
    n_u = P * G  # u index: p * G + g
    iz = n_u  # z index: iz + p
    iT = n_u + P
    nvar = iT + 1
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    lo: list[float] = []
    hi: list[float] = []
    r = 0

    def add(c: np.ndarray, v: np.ndarray, lb: float, ub: float) -> None:
        nonlocal r
        rows.append(np.full(len(c), r))
        cols.append(np.asarray(c))
        vals.append(np.asarray(v, dtype=np.float64))
        lo.append(lb)
        hi.append(ub)
        r += 1

    g_idx = np.arange(G)
    for e in range(E):  # one replica count per expert
        ps = np.nonzero(pe == e)[0]
        add(iz + ps, np.ones(len(ps)), 1, 1)
    for p in range(P):  # Σ_g u = k z
        add(np.concatenate([p * G + g_idx, [iz + p]]), np.concatenate([np.ones(G), [-pk[p]]]), 0, 0)
    coef = w[pe] / pk  # load per replica of each (e, k)
    for g in range(G):
        add(np.arange(P) * G + g, np.ones(P), S, S)
        add(np.concatenate([np.arange(P) * G + g, [iT]]), np.concatenate([coef, [-1.0]]), -np.inf, 0)
    c = np.zeros(nvar)
    c[iT] = 1.0
    t_max = upper / scale * (1 + 1e-9) if np.isfinite(upper) else np.inf
    ub = np.concatenate([np.ones(P * G), np.ones(P), [t_max]])  # u_egk ≤ 1: never two replicas on one GPU
    integrality = np.concatenate([np.ones(n_u + P), [0]])
    extra = 0
    if internode_weight > 0 and coactivation is not None and gpus_per_node < G and G % gpus_per_node == 0:
        M = G // gpus_per_node
        co = np.triu(np.asarray(coactivation, dtype=np.float64), 1)
        flat = np.argsort(-co, axis=None, kind="stable")[:max_pairs]
        chosen = [(int(i), int(j), co[i, j]) for i, j in zip(*np.unravel_index(flat, co.shape)) if co[i, j] > 0]
        total = sum(x[2] for x in chosen)
        if chosen:
            ih = nvar  # h_em: ih + e*M + m
            is_ = ih + E * M  # s_qm: is_ + q*M + m
            idd = is_ + len(chosen) * M  # d_q
            extra = E * M + len(chosen) * M + len(chosen)
            for e in range(E):
                ps = np.nonzero(pe == e)[0]
                for m in range(M):
                    gs = np.arange(m * gpus_per_node, (m + 1) * gpus_per_node)
                    u = (ps[:, None] * G + gs[None, :]).ravel()
                    add(np.concatenate([[ih + e * M + m], u]), np.concatenate([[1.0], -np.ones(len(u))]), -np.inf, 0)
            for q, (i, j, _) in enumerate(chosen):
                for m in range(M):
                    add(np.array([is_ + q * M + m, ih + i * M + m]), np.array([1.0, -1.0]), -np.inf, 0)
                    add(np.array([is_ + q * M + m, ih + j * M + m]), np.array([1.0, -1.0]), -np.inf, 0)
                add(np.concatenate([[idd + q], is_ + q * M + np.arange(M)]), np.ones(M + 1), 1, np.inf)
            c = np.concatenate([c, np.zeros(extra)])
            for q, (_, _, cij) in enumerate(chosen):
                c[idd + q] = internode_weight * cij / total
            ub = np.concatenate([ub, np.ones(extra)])
            integrality = np.concatenate([integrality, np.ones(extra)])
            nvar += extra
    else:
        # symmetric GPUs: order them by load (valid only without the node-dependent term)
        for g in range(G - 1):
            add(np.concatenate([np.arange(P) * G + g, np.arange(P) * G + g + 1]),
                np.concatenate([coef, -coef]), 0, np.inf)
    A = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, nvar))
    res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=integrality,
               bounds=Bounds(np.zeros(nvar), ub),
               options={"time_limit": max(time_limit, 0.05), "mip_rel_gap": 1e-6, "disp": False})
    out: dict[str, Any] = {"status": int(res.status), "message": str(res.message), "phy2log": None,
                           "busiest": np.inf, "bound": 0.0, "gap": None}
    dual = getattr(res, "mip_dual_bound", None)
    if dual is not None and np.isfinite(dual) and extra == 0:
        out["bound"] = float(dual) * scale
    if res.x is None:
        return out
    u = np.rint(res.x[:n_u]).astype(np.int64).reshape(P, G)
    n = np.zeros((E, G), dtype=np.int64)
    np.add.at(n, pe, u)
    phy = np.concatenate([np.repeat(np.arange(E), n[:, g]) for g in range(G)])
    if len(phy) != N or np.any(n.sum(axis=0) != S) or np.any(n.sum(axis=1) < 1):
        return out
    out["phy2log"] = phy
    out["busiest"] = float(np.max((load / n.sum(axis=1)) @ n))
    out["gap"] = float(res.mip_gap) if getattr(res, "mip_gap", None) is not None else None
    return out


def pattern_layer(load: np.ndarray, num_gpus: int, slots_per_gpu: int, *, time_limit: float = 10.0,
                  upper: float = np.inf, lower: float = 0.0, pattern_limit: int = 20000) -> dict[str, Any] | None:
    """Exact optimum of one layer by patterns + bisection (see the module docstring); None if too many patterns."""
    from itertools import combinations

    E, G, S = len(load), num_gpus, slots_per_gpu
    N = G * S
    K = min(N - E + 1, G)  # the replica cap
    opts = [(e, k) for e in range(E) for k in range(1, K + 1)]
    n_opt = len(opts)
    from math import comb

    if comb(n_opt, S) > 50 * pattern_limit:
        return None
    pats, loads = [], []
    for combo in combinations(range(n_opt), S):
        seen: set[int] = set()
        ok = True
        for o in combo:  # a GPU holds an expert at most once (so one k per expert, too)
            e = opts[o][0]
            if e in seen:
                ok = False
                break
            seen.add(e)
        if ok:
            pats.append(combo)
            loads.append(sum(load[opts[o][0]] / opts[o][1] for o in combo))
            if len(pats) > pattern_limit:
                return None
    loads_arr = np.array(loads)
    mult = sparse.lil_matrix((n_opt, len(pats)))
    for p, combo in enumerate(pats):
        for o in combo:
            mult[o, p] += 1
    mult = mult.tocsr()
    opt_e = np.array([o[0] for o in opts])
    opt_k = np.array([o[1] for o in opts], dtype=np.float64)
    cand = np.unique(loads_arr)
    t0 = time.perf_counter()
    tol = 1e-9 * max(float(cand[-1]), 1.0)
    lo = int(np.searchsorted(cand, lower - tol))
    hi = int(np.searchsorted(cand, upper + tol, side="right")) - 1 if np.isfinite(upper) else len(cand) - 1
    hi = min(max(hi, lo), len(cand) - 1)
    best: np.ndarray | None = None
    proven = True

    def solve(t: float) -> tuple[bool | None, np.ndarray | None]:
        use = np.nonzero(loads_arr <= t + tol)[0]
        P = len(use)
        A_x = mult[:, use]
        zero_e = sparse.csr_matrix((E, P))
        ez = sparse.csr_matrix((np.ones(n_opt), (opt_e, np.arange(n_opt))), shape=(E, n_opt))
        A = sparse.vstack([
            sparse.hstack([A_x, -sparse.diags(opt_k)]),
            sparse.hstack([zero_e, ez]),
            sparse.hstack([sparse.csr_matrix(np.ones((1, P))), sparse.csr_matrix((1, n_opt))]),
        ]).tocsr()
        lo_b = np.concatenate([np.zeros(n_opt), np.ones(E), [G]])
        left = max(time_limit - (time.perf_counter() - t0), 0.01)
        res = milp(np.zeros(P + n_opt), constraints=LinearConstraint(A, lo_b, lo_b),
                   integrality=np.ones(P + n_opt), bounds=Bounds(0, np.concatenate([np.full(P, G), np.ones(n_opt)])),
                   options={"time_limit": left, "disp": False})
        if res.status == 0:
            x = np.rint(res.x[:P]).astype(np.int64)
            return True, np.concatenate([np.repeat(use, x)])
        if res.status == 2:
            return False, None
        return None, None  # time limit: unknown

    while lo < hi:
        if time.perf_counter() - t0 > time_limit:
            proven = False
            break
        mid = (lo + hi) // 2
        ok, sol = solve(cand[mid])
        if ok:
            hi, best = mid, sol
        else:
            if ok is None:
                proven = False
            lo = mid + 1
    if best is None:
        ok, best = solve(cand[hi]) if time.perf_counter() - t0 <= time_limit else (None, None)
        if not ok:
            return {"phy2log": None, "busiest": np.inf, "bound": float(cand[lo]) if proven else lower, "status": 1}
    used = best  # pattern ids, one per GPU
    counts = np.zeros(E, dtype=np.int64)
    for p in used:
        for o in pats[p]:
            counts[opts[o][0]] += 1
    phy = np.concatenate([np.sort([opts[o][0] for o in pats[p]]) for p in sorted(used, key=lambda q: -loads_arr[q])])
    busiest = float(max(loads_arr[p] for p in used))
    return {"phy2log": phy.astype(np.int64), "busiest": busiest, "bound": busiest if proven else lower,
            "status": 0 if proven else 1, "gap": 0.0 if proven else None}


def _solve_layer(job: dict[str, Any]) -> dict[str, Any]:
    """One layer's exact solve (a process pool's unit of work): the pattern model, else the u-model."""
    res = None
    if job["internode_weight"] <= 0:
        res = pattern_layer(job["load"], job["G"], job["S"], time_limit=job["time_limit"], upper=job["upper"],
                            lower=job["lower"], pattern_limit=job["pattern_limit"])
    if res is None:
        res = milp_layer(job["load"], job["G"], job["S"], time_limit=job["time_limit"], kmin=job["kmin"],
                         kmax=job["kmax"], gpus_per_node=job["gpus_per_node"], coactivation=job["co"],
                         internode_weight=job["internode_weight"], max_pairs=job["max_pairs"], upper=job["upper"])
    return res


def milp_place(load: np.ndarray, num_gpus: int, num_slots: int, *, time_limit: float = 30.0,
               gpus_per_node: int = 8, coactivation: np.ndarray | None = None, internode_weight: float = 0.0,
               full_limit: int = 20000, window: int = 2, max_pairs: int = 32,
               pattern_limit: int = 20000, workers: int | None = None) -> tuple[ExpertMapping, dict[str, Any]]:
    """Per-layer MILP placement; returns the mapping and info (gap per layer, status, restricted, bound).

    Warm start: greedy's placement is the incumbent — its busiest load caps T (a cutoff; scipy's HiGHS interface
    takes no initial solution) and it stands wherever the MILP does not *strictly* improve on it (ties go to
    greedy, so equal solutions never flip with the time limit). Every layer gets the same budget,
    ``time_limit / ceil(L / workers)`` (never what earlier layers left over), and layers are solved in ``workers``
    processes (default: up to 8, the CPU count): a layer's result depends only on its own load and budget, and
    a layer solved to optimality (gap 0) gives the same mapping on every run. ``info["gap_per_layer"]`` is the
    proven gap (busiest − best bound) ÷ busiest of each layer.
    """
    import os

    if not (np.isfinite(time_limit) and time_limit > 0):
        raise ValueError(f"time_limit must be positive, got {time_limit}")
    L, E = load.shape
    S = num_slots // num_gpus
    base = greedy(load, num_gpus, num_slots)
    base_busy = (load / np.maximum(base.logcnt, 1))
    base_busy = np.take_along_axis(base_busy, base.phy2log, axis=1).reshape(L, num_gpus, S).sum(2).max(1)
    lb = lower_bound(load, num_gpus, num_slots)
    water = replica_counts(load, num_slots, num_gpus)
    K = min(num_slots - E + 1, num_gpus)
    restricted = E * num_gpus * K > full_limit
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(L, workers if workers is not None else min(8, cpus)))
    per = time_limit / -(-L // workers)  # ceil(L / workers) rounds of layers share the time limit
    jobs = []
    for layer in range(L):
        kmin = kmax = None
        if restricted:
            kmin, kmax = water[layer] - window, water[layer] + window
        jobs.append({"load": load[layer], "G": num_gpus, "S": S, "time_limit": per, "upper": float(base_busy[layer]),
                     "lower": float(lb[layer]), "pattern_limit": pattern_limit, "kmin": kmin, "kmax": kmax,
                     "gpus_per_node": gpus_per_node, "internode_weight": internode_weight, "max_pairs": max_pairs,
                     "co": None if coactivation is None else np.asarray(coactivation)[layer]})
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_solve_layer, jobs))
    else:
        results = [_solve_layer(j) for j in jobs]
    phy2log = base.phy2log.copy()
    gaps, statuses, sources = [], [], []
    for layer, res in enumerate(results):
        statuses.append(res["status"])
        if res["phy2log"] is not None:  # the solution's busiest GPU recomputed from its layout, not the model's T
            phy = np.asarray(res["phy2log"])
            cnt = np.bincount(phy, minlength=E)
            res["busiest"] = float((load[layer][phy] / cnt[phy]).reshape(num_gpus, S).sum(axis=1).max())
        use_milp = res["phy2log"] is not None and (res["busiest"] < base_busy[layer] * (1 - 1e-9)
                                                     or internode_weight > 0)
        if use_milp:
            phy2log[layer] = res["phy2log"]
            busiest = res["busiest"]
            sources.append("milp")
        else:
            busiest = base_busy[layer]
            sources.append("greedy")
        bound = lb[layer] if restricted else max(lb[layer], res["bound"])
        gaps.append(0.0 if busiest <= 0 else max(0.0, (busiest - bound) / busiest))
    info = {"gap": float(max(gaps)), "gap_per_layer": [float(g) for g in gaps], "status": statuses,
            "restricted": bool(restricted), "source": sources, "workers": workers, "layer_time_limit": per,
            "optimal_layers": int(sum(1 for s in statuses if s == 0)), "internode_weight": internode_weight}
    return ExpertMapping(phy2log, num_gpus, E, {"algo": "milp"}), info
