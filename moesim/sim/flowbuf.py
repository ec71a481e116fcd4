"""The compiled flow network's state: flow buffers, the route store, flows per class (numba kernels in
:mod:`moesim.sim._maxmin_kernels`; used by :class:`moesim.sim.network.FlowNetwork` where numba is installed).

Per flow in flight one row of ``ff`` [cap, 4] float (remaining bytes, rate, projected end, path latency) and of
``fi`` [cap, 4 + W] int (group, flow id, class, row of the route store, the hops past the class's narrow links,
pad-filled): a batch point walks these in order and nothing else per flow. Routes live once in the *route store*
(the route table's rows, shared between a replay's steps, then the routes of flows started without the table);
the flows in flight per class are counted as flows come and go, so the class-aggregated solve starts from them.
"""

from __future__ import annotations

import numpy as np

from moesim.sim import maxmin_jit as _jit


class CompiledFlows:
    """Flow buffers of a network over links ``0..pad-1`` (``pad``: the index of the infinite pad link)."""

    def __init__(self, pad: int) -> None:
        self.pad = pad
        self.ff = np.empty((256, 4))
        self.fi = np.full((256, 5), pad, dtype=np.int64)
        self.done_buf = np.empty(256, dtype=np.int64)
        self.n_act = 0  # rows [0, n_act) in flight, then n_new just started (joining at the next batch point)
        self.n_new = 0
        self.store = np.full((0, 1), pad, dtype=np.int64)  # constraining routes, narrow first; rows [0, store_n)
        self.wide = np.full((0, 1), pad, dtype=np.int64)  # each store row's hops past its class's narrow ones
        self.row_bytes = np.zeros(0)  # bytes delivered by the finished flows of each store row (for link_bytes)
        self.store_n = 0
        # flows in flight per class (see _maxmin_kernels._class_add)
        self.cnt = np.empty(0)
        self.present = np.empty(0, dtype=np.int64)
        self.ppos = np.empty(0, dtype=np.int64)
        self.nstate = np.zeros(1, dtype=np.int64)
        self.scr_rate = np.empty(0)

    @property
    def active(self) -> int:
        return self.n_act + self.n_new

    def grow_classes(self, C: int) -> None:
        """Room for ``C`` classes, keeping the counts of the flows in flight."""
        c0 = self.cnt.size
        self.cnt = np.concatenate([self.cnt, np.zeros(C - c0)])
        self.present = np.concatenate([self.present, np.zeros(C - c0, dtype=np.int64)])
        self.ppos = np.concatenate([self.ppos, np.full(C - c0, -1, dtype=np.int64)])
        self.scr_rate = np.zeros(C)

    def wide_hops(self, crt: np.ndarray, nn: np.ndarray) -> np.ndarray:
        """[F, W] the hops of constraining routes ``crt`` [F, H] (narrow first) past the first ``nn`` [F] (their
        class's narrow links), pad-filled: what the certificate reads per flow."""
        W = max(int((crt.shape[1] - nn).max()) if crt.shape[0] else 0, 1)
        idx = nn[:, None] + np.arange(W)[None, :]
        ext = np.concatenate([crt, np.full((crt.shape[0], W), self.pad, dtype=np.int64)], axis=1)
        return np.ascontiguousarray(np.take_along_axis(ext, idx, axis=1))

    def store_extend(self, crt: np.ndarray, wide: np.ndarray) -> int:
        """Append routes [F, H] and their wider hops [F, W] to the store; returns the row of the first. An empty
        store takes the arrays themselves (the route table's, shared between a replay's steps: never written)."""
        n0 = self.store_n
        if n0 == 0:
            self.store, self.wide = np.ascontiguousarray(crt), wide
            self.row_bytes = np.zeros(crt.shape[0])
            self.store_n = crt.shape[0]
            return 0
        if n0 + crt.shape[0] > self.row_bytes.size:
            self.row_bytes = np.concatenate([self.row_bytes, np.zeros(max(self.row_bytes.size, crt.shape[0]))])
        for name, part in (("store", crt), ("wide", wide)):
            old = getattr(self, name)
            F, W = part.shape
            if n0 + F > old.shape[0] or old.shape[1] < W:
                grown = np.full((max(2 * old.shape[0], n0 + F), max(W, old.shape[1])), self.pad, dtype=np.int64)
                grown[:n0, :old.shape[1]] = old[:n0]
                setattr(self, name, grown)
            arr = getattr(self, name)
            arr[n0:n0 + F, :W] = part
            arr[n0:n0 + F, W:] = self.pad
        self.store_n = n0 + crt.shape[0]
        return n0

    def room(self, F: int) -> None:
        """Buffers for ``F`` more flows, with a column per wider hop of the store."""
        i1 = self.active + F
        size = self.ff.shape[0]
        W = self.wide.shape[1]
        if i1 > size or self.fi.shape[1] < 4 + W:
            size = max(2 * size if i1 > size else size, i1)
            ff = np.empty((size, 4))
            fi = np.full((size, max(4 + W, self.fi.shape[1])), self.pad, dtype=np.int64)
            ff[:self.active], fi[:self.active, :self.fi.shape[1]] = self.ff[:self.active], self.fi[:self.active]
            self.ff, self.fi = ff, fi
            self.done_buf = np.empty(size, dtype=np.int64)

    def add(self, nb: np.ndarray, lat: np.ndarray, grp: np.ndarray, fids: np.ndarray, srows: np.ndarray,
            cls: np.ndarray) -> None:
        """Buffer started flows (routes: store rows ``srows``) to join at the next batch point."""
        self.room(nb.size)
        i0, i1 = self.active, self.active + nb.size
        W = self.wide.shape[1]
        self.ff[i0:i1, 0] = nb
        self.ff[i0:i1, 3] = lat
        self.fi[i0:i1, 0] = grp
        self.fi[i0:i1, 1] = fids
        self.fi[i0:i1, 2] = cls
        self.fi[i0:i1, 3] = srows
        self.fi[i0:i1, 4:4 + W] = self.wide[srows]
        self.fi[i0:i1, 4 + W:] = self.pad
        self.n_new += nb.size

    def start_rows(self, rows: np.ndarray, nb: np.ndarray, grp: np.ndarray, f0: int, now: float, tab_off: int,
                   tab_lat: np.ndarray, tab_cls: np.ndarray, tab_empty: np.ndarray, rec: tuple,
                   groups: tuple) -> tuple[int, np.ndarray, int]:
        """Start flows ``f0, f0+1, ...`` along route-table ``rows`` in one compiled call: their records
        (``rec``: requested, start, end), the ones with nothing to move or no link to cross arrived
        at once and counted towards their ``groups`` (pending, latest, last), the rest buffered. Returns (flows
        buffered, groups completed in order, a group that got too many flows or -1)."""
        self.room(nb.size)
        added, done, bad = _jit.start_core(rows, nb, grp, f0, now, tab_off, tab_lat, tab_cls, tab_empty, self.wide,
                                           self.pad, self.ff, self.fi, self.active, *rec, *groups)
        self.n_new += added
        return added, done, bad

    def update(self, dt: float, now: float, eps: float, cap: np.ndarray, rtol: float, quantum: float,
               rel_quantum: float, cls_rt: np.ndarray, cls_tier: np.ndarray, cls_nn: np.ndarray, rec: tuple,
               groups: tuple) -> tuple[int, int, float]:
        """One batch point (``_maxmin_kernels.update_core``); returns (groups completed — ``done_buf[:k]`` —,
        a group that got too many flows or -1, delay to the next hand-over or -1 if nothing is in flight)."""
        req, end = rec
        K, nd, bad, delay = _jit.update_core(
            self.ff, self.fi, self.n_act, self.n_new, dt, now, eps, cap, rtol, quantum, rel_quantum, self.store,
            cls_rt, cls_tier, cls_nn, self.cnt, self.present, self.ppos, self.nstate, self.scr_rate, req, end,
            self.row_bytes, *groups, self.done_buf)
        self.n_act, self.n_new = K, 0
        return nd, bad, delay
