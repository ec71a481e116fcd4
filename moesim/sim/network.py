"""A flow-level (fluid) network for the discrete-event engine: concurrent flows share links max-min fairly.

Model (the fluid model of SimGrid's network models and of ASTRA-sim's analytical network backend):

- A *flow* moves ``nbytes`` along a fixed list of directed links (its route, edge indices of a topology).
- While it transmits, a flow has a rate (bytes/s). Rates are the **max-min fair** allocation over every link
  the active flows cross (progressive filling / water-filling): all flows grow at the same pace; a link that
  fills up freezes the flows crossing it at the current level; the others keep growing.
- Rates are recomputed whenever a flow starts or ends (event-driven). Between two such events every rate is
  constant, so the next completion time is exact: ``min(remaining / rate)``. One timer is pending at a time;
  a generation counter makes a superseded timer a no-op (no interrupts needed). All starts and ends that
  happen at the same simulated instant are batched into one recomputation.
- Optional ``quantum`` (seconds, default 0 = exact): flows that would end within one quantum of the next
  completion are retired together at the last one's end. Each one's arrival time stays exact (its rate
  was constant until its own end); only the hand-over of its freed bandwidth to the others waits up to one
  quantum, so their ends shift slightly (mostly later; max-min sharing is not monotone, so a third flow may
  gain). This trades a small error for far fewer rate recomputations when thousands of flows end at distinct
  times. Likewise, flows started within one quantum of the next batch of completions begin transmitting at
  that batch (their arrival is then up to one quantum late). ``rel_quantum`` widens the quantum to a fraction
  of the median time the flows in flight still need (a scale-free error: long transfers, long quantum).
- Propagation latency: a flow's bytes have all *arrived* ``sum(edge_latency[route])`` after its last byte left
  (``t_done = t_start + transmission + latency``, the ``latency + size / bandwidth`` of an isolated flow).
  Latency does not occupy links.
- A flow with an empty route (a GPU sending to itself) or zero bytes arrives after its path latency (0 for
  an empty route) and uses no link.

Limits (by design): no packets, no queues or buffers, no head-of-line blocking, no congestion control or
slow start, no incast collapse, no protocol overheads beyond what the link bandwidth already discounts;
max-min fairness is the ideal that fair-queuing switches approach, real NVLink/IB fabrics deviate from it
under heavy incast. Bytes per link are counted (when a flow finishes) for utilisation.

Cost: each recomputation is vectorised numpy over a padded route table [hops, flows] (an implicit flow-link
incidence matrix, link loads by ``bincount``), in rounds that each freeze every locally-bottlenecked link (see
:func:`maxmin_rates`; ~10 rounds for a 64-GPU all-to-all, the later ones small), over the links that can bind
only (:func:`dominated_links`). A 64-GPU all-to-all of 4032 flows costs ~0.5 ms per recomputation on one core;
the number of recomputations is at most (time with flows in flight) / quantum plus the distinct start times.
With numba installed (``pip install moesim[fast]``) each batch point — advance, retire, take in, solve, arm the
next hand-over — is one compiled call (:mod:`moesim.sim.maxmin_jit`) over the flow buffers of
:mod:`moesim.sim.flowbuf`, and the
solve works on *classes*: flows whose narrowest links are the same (on a rail-optimised cluster with PXN, the
eight GPUs of a node reaching one remote GPU through the same two NICs) get one row, the wider tiers are solved
per flow over what the narrow one left, and a certificate (wider links not overloaded, no wider-tier flow slower
than a narrow one on a shared link) proves the result is the max-min allocation, else the per-flow solve runs.
Same allocation up to round-off; a DES step 5-6x faster than numpy at 64 and 256 GPUs (``benchmarks/bench_des.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import simpy

from moesim.errors import MoesimError
from moesim.sim import maxmin_jit as _jit
from moesim.sim.flowbuf import CompiledFlows
from moesim.sim.maxmin import _LEVEL_RTOL, maxmin_rates, narrow_first

# Relative float tolerance on the simulated clock when deciding that a flow's projected end has come.
_TIME_EPS = 1e-15

class FlowNetwork:
    """Flows over links with max-min fair sharing, driven by a simpy environment.

    ``FlowNetwork(env, edge_bw, edge_latency)`` or ``FlowNetwork(env, topology)`` (anything with
    ``edge_bw`` / ``edge_latency`` arrays). ``transfer(route, nbytes)`` returns an event that fires when
    the flow's bytes have all arrived; ``transfer_many`` starts a batch of flows, each counted towards a
    :meth:`group` (an event that fires once its expected number of flows all arrived) — the DES uses groups
    so that a GPU waits on one event for all of its incoming flows.
    """

    def __init__(self, env: simpy.Environment, edge_bw: Any, edge_latency: Any = None, *,
                 quantum: float = 0.0, rel_quantum: float = 0.0, ignore_links: Any = None) -> None:
        if edge_latency is None and hasattr(edge_bw, "edge_bw"):
            edge_bw, edge_latency = edge_bw.edge_bw, edge_bw.edge_latency
        bw = np.asarray(edge_bw, dtype=np.float64).ravel()
        lat = np.asarray(edge_latency if edge_latency is not None else np.zeros_like(bw), dtype=np.float64).ravel()
        if bw.shape != lat.shape:
            raise MoesimError(f"edge_bw has {bw.size} links but edge_latency has {lat.size}")
        if np.any(~(bw > 0)):
            raise MoesimError(f"link {int(np.argmax(~(bw > 0)))} has a non-positive or NaN bandwidth")
        if np.any(~(lat >= 0)) or np.any(~np.isfinite(lat)):
            raise MoesimError(f"link {int(np.argmax(~((lat >= 0) & np.isfinite(lat))))} has a negative or "
                              "non-finite latency")
        if not (quantum >= 0 and np.isfinite(quantum)):
            raise MoesimError(f"quantum must be a non-negative number of seconds, got {quantum!r}")
        self.env = env
        # compiled batch points where numba is installed (first use: compile or load its cache)
        self._compiled = _jit.load()
        if not (0 <= rel_quantum < 1):
            raise MoesimError(f"rel_quantum must be in [0, 1), got {rel_quantum!r}")
        self.quantum = float(quantum)
        self.rel_quantum = float(rel_quantum)
        self.num_links = bw.size
        self.edge_bw = bw
        self.edge_latency = lat
        self._pad = bw.size  # index of the pad link (infinite capacity)
        self._cap = np.append(bw, np.inf)
        self._lat_pad = np.append(lat, 0.0)  # per link, and 0 for the pad
        self._tab_rt: np.ndarray | None = None
        self._tab_src: Any = None  # the table object set_routes was given (for ``like``)
        self._tab_crt = self._tab_lat = np.empty(0)
        # links whose capacity never binds (see dominated_links) are left out of the rate computation
        self._cmap = np.arange(bw.size + 1)
        if ignore_links is not None:
            ign = np.asarray(ignore_links, dtype=bool).ravel()
            if ign.size != bw.size:
                raise MoesimError(f"ignore_links has {ign.size} entries for {bw.size} links")
            self._cmap[:bw.size][ign] = self._pad
        # routes of every flow that crosses links, by start batch (link_bytes sums them when asked)
        # (flow ids, routes [F, H] or None, route-table rows [F] or None) of every start batch
        self._started: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = []
        # active flows (compact arrays)
        self._croutes = np.empty((0, 1), dtype=np.int64)  # constraining links only (for the rates)
        self._remaining = np.empty(0)
        self._rate = np.empty(0)
        self._lat = np.empty(0)
        self._group = np.empty(0, dtype=np.int64)
        self._fid = np.empty(0, dtype=np.int64)
        self._cls = np.empty(0, dtype=np.int64)  # class of each active flow (see _class_ids)
        self._finish = np.empty(0)  # projected end of transmission at the current rates
        # flow classes: flows whose narrowest constraining links are the same (the compiled solve's unit)
        self._cls_index: dict[bytes, int] = {}
        self._cls_rt = np.empty((0, 1), dtype=np.int64)  # [C, HT] each class's narrowest links, pad-filled
        self._cls_tier = np.empty(0)  # [C] their capacity
        self._cls_nn = np.empty(0, dtype=np.int64)  # [C] how many they are (a flow's first hops: narrow_first)
        # the compiled batch points' flow buffers, route store and flows per class
        self._cf = CompiledFlows(self._pad)
        self._tab_off = 0  # the route table's first row in the route store
        self._tab_wide: np.ndarray | None = None  # the table's wider hops (compiled only; see _attach_table)
        # (first store row, full routes) of every route table set: link_bytes of the compiled flows by table row
        self._row_tables: list[tuple[int, np.ndarray]] = []
        self._last = 0.0
        self._gen = 0
        self._timer_at = np.inf  # when the armed completion timer fires
        self._update_pending = False
        self._pending_adds: list[tuple[np.ndarray, ...]] = []
        # every flow ever started, by id
        self._req = np.empty(1024)
        self._start = np.empty(1024)
        self._end = np.empty(1024)
        self.num_flows = 0
        # groups: pending count, latest arrival, event
        self._g_pending = np.zeros(64, dtype=np.int64)
        self._g_latest = np.zeros(64)
        self._g_last = np.full(64, -1, dtype=np.int64)  # id of the flow that arrived last (-1: none yet)
        self._g_event: list[simpy.Event] = []
        self._g_value: list[Any] = []
        self.recomputations = 0

    # ---- public API -------------------------------------------------------------------------------
    def group(self, nflows: int) -> tuple[int, simpy.Event]:
        """A new group expecting ``nflows`` flows: (group id, event that fires when they all arrived).

        The event's value is the group id."""
        if nflows < 0:
            raise MoesimError("a group cannot expect a negative number of flows")
        gids, evs = self.group_many([nflows])
        return int(gids[0]), evs[0]

    def group_many(self, counts: Any) -> tuple[np.ndarray, list[simpy.Event]]:
        """Several groups at once: (group ids [n], their events)."""
        cnt = np.asarray(counts, dtype=np.int64).ravel()
        if cnt.size and cnt.min() < 0:
            raise MoesimError("a group cannot expect a negative number of flows")
        g0 = len(self._g_event)
        gids = np.arange(g0, g0 + cnt.size)
        while g0 + cnt.size > self._g_pending.size:
            n = self._g_pending.size
            self._g_pending = np.concatenate([self._g_pending, np.zeros(n, dtype=np.int64)])
            self._g_latest = np.concatenate([self._g_latest, np.zeros(n)])
            self._g_last = np.concatenate([self._g_last, np.full(n, -1, dtype=np.int64)])
        self._g_pending[gids] = cnt
        self._g_latest[gids] = self.env.now
        evs = [self.env.event() for _ in range(cnt.size)]
        self._g_event.extend(evs)
        self._g_value.extend(gids.tolist())
        for g in np.flatnonzero(cnt == 0).tolist():
            evs[g].succeed(g0 + g)
        return gids, evs

    def transfer(self, route_edges: Sequence[int], nbytes: float) -> simpy.Event:
        """Start one flow now; the event fires (value: the flow id) once all its bytes arrived."""
        gid, ev = self.group(1)
        self._g_value[gid] = self.num_flows  # the id transfer_many gives this flow
        self.transfer_many([route_edges], [nbytes], [gid])
        return ev

    def transfer_many(self, routes: Sequence[Sequence[int]] | np.ndarray, nbytes: Any, groups: Any) -> np.ndarray:
        """Start flows now: routes (list of edge-index lists, or a [F, H] array padded with -1), bytes [F],
        group id [F] (from :meth:`group`). Returns the new flow ids [F]."""
        nb, grp = self._check_flows(nbytes, groups)
        rt = self._route_table(routes, nb.size)
        lat = self._lat_pad[rt].sum(axis=1)
        crt = narrow_first(self._cmap[rt], self._cap)
        crt = crt[:, :max(int((crt < self._pad).any(axis=0).sum()), 1)]
        return self._start_flows(rt, crt, lat, nb, grp, self._class_ids(crt))

    def set_routes(self, table: np.ndarray, like: FlowNetwork | None = None) -> None:
        """Declare a fixed route table [P, H] (edge indices padded with -1), e.g. one row per GPU pair, so that
        :meth:`transfer_routes` can start flows by row number without re-deriving routes and latencies.
        ``like``: a network given the same table over the same links (the DES's previous step): its derived
        tables are shared instead of derived again."""
        if (like is not None and like._tab_src is table and self._tab_rt is None and not self._cls_index
                and np.array_equal(like._cap, self._cap) and np.array_equal(like._cmap, self._cmap)
                and np.array_equal(like._lat_pad, self._lat_pad)):
            for name in ("_tab_src", "_tab_rt", "_tab_crt", "_tab_lat", "_tab_cls", "_tab_empty", "_tab_wide",
                         "_cls_rt", "_cls_tier", "_cls_nn"):
                setattr(self, name, getattr(like, name))
            self._cls_index = dict(like._cls_index)
            if self._compiled:
                self._cf.grow_classes(len(self._cls_index))
            self._attach_table()
            return
        rt = self._route_table(np.asarray(table), np.shape(table)[0])
        crt = narrow_first(self._cmap[rt], self._cap)
        if self._tab_rt is not None:  # flows started on the old table keep their routes (for link_bytes)
            old = self._tab_rt
            self._started = [(f, old[w], None) if w is not None else (f, r, w) for f, r, w in self._started]
        self._tab_rt = rt
        self._tab_crt = np.ascontiguousarray(crt[:, :max(int((crt < self._pad).any(axis=0).sum()), 1)])
        self._tab_lat = self._lat_pad[rt].sum(axis=1)
        self._tab_cls = self._class_ids(self._tab_crt)
        self._tab_empty = (rt >= self._pad).all(axis=1)
        self._tab_src = table
        self._tab_wide = None
        self._attach_table()

    def _attach_table(self) -> None:
        """The compiled state's view of the route table just set: its rows in the route store (wider hops derived
        once, shared with networks given ``like``) and its place for link_bytes. Nothing for the numpy network."""
        if not self._compiled:
            return
        if self._tab_wide is None:
            self._tab_wide = self._cf.wide_hops(self._tab_crt, self._cls_nn[self._tab_cls])
        self._tab_off = self._cf.store_extend(self._tab_crt, self._tab_wide)
        self._row_tables.append((self._tab_off, self._tab_rt))

    def transfer_routes(self, rows: Any, nbytes: Any, groups: Any, *, checked: bool = False) -> np.ndarray:
        """Start flows along rows of the table given to :meth:`set_routes`; otherwise as :meth:`transfer_many`.

        ``checked=True``: the caller guarantees int64 rows and groups of the size of ``nbytes`` (float64, finite,
        >= 0) naming existing groups and rows (the DES, which validated its workload): no checks, no copies.
        """
        if self._tab_rt is None:
            raise MoesimError("transfer_routes needs a route table (set_routes) first")
        if checked:
            if self._compiled:
                return self._start_rows(rows, nbytes, groups)
            return self._start_flows(None, self._tab_crt[rows], self._tab_lat[rows], nbytes, groups,
                                     self._tab_cls[rows], rows)
        nb, grp = self._check_flows(nbytes, groups)
        r = np.asarray(rows, dtype=np.int64).ravel()
        if r.size != nb.size:
            raise MoesimError(f"{r.size} routes for {nb.size} flow sizes")
        return self._start_flows(None, self._tab_crt[r], self._tab_lat[r], nb, grp, self._tab_cls[r], r)

    def _check_flows(self, nbytes: Any, groups: Any) -> tuple[np.ndarray, np.ndarray]:
        nb = np.asarray(nbytes, dtype=np.float64).ravel()
        grp = np.broadcast_to(np.asarray(groups, dtype=np.int64), nb.shape).copy()
        if not np.all(np.isfinite(nb) & (nb >= 0)):
            raise MoesimError("flow sizes must be finite and non-negative")
        if nb.size and (grp.min() < 0 or grp.max() >= len(self._g_event)):
            raise MoesimError("flow names an unknown group")
        return nb, grp

    def _start_flows(self, rt: np.ndarray | None, crt: np.ndarray, lat: np.ndarray, nb: np.ndarray,
                     grp: np.ndarray, cls: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Start flows with full routes ``rt`` [F, H], or (``rt`` None) along route-table ``rows`` [F]."""
        fids = self._new_ids(nb)
        # nothing to move, or no link to cross
        empty = self._tab_empty[rows] if rt is None else (rt >= self._pad).all(axis=1)
        instant = (nb <= 0) | empty
        if instant.any():
            self._end[fids[instant]] = self.env.now + lat[instant]
            self._arrive(grp[instant], self.env.now + lat[instant], fids[instant])
            live = ~instant
            crt, lat, nb, grp, fids_live = crt[live], lat[live], nb[live], grp[live], fids[live]
            rt = None if rt is None else rt[live]
            cls = cls[live]
            rows = None if rows is None else rows[live]
        else:
            fids_live = fids
        if nb.size:
            if not (self._compiled and rows is not None):  # (compiled: bytes counted per table row as flows end)
                self._started.append((fids_live, None, rows) if rows is not None else (fids_live, rt, None))
            if self._compiled:
                cf = self._cf
                srows = (rows + self._tab_off if rows is not None
                         else np.arange(cf.store_extend(crt, cf.wide_hops(crt, self._cls_nn[cls])), cf.store_n))
                cf.add(nb, lat, grp, fids_live, srows, cls)
            else:
                self._pending_adds.append((None, nb, lat, grp, fids_live, crt, cls))
            self._request_start_update()
        return fids

    def _start_rows(self, rows: np.ndarray, nb: np.ndarray, grp: np.ndarray) -> np.ndarray:
        """:meth:`_start_flows` along route-table rows in one compiled call (the DES's path: ~10 numpy calls
        fewer per start)."""
        n0, F = self.num_flows, nb.size
        self._records_for(F)
        added, done, bad = self._cf.start_rows(rows, nb, grp, n0, self.env.now, self._tab_off, self._tab_lat,
                                               self._tab_cls, self._tab_empty,
                                               (self._req, self._start, self._end),
                                               (self._g_pending, self._g_latest, self._g_last))
        self.num_flows += F
        fids = np.arange(n0, n0 + F)
        if done.size or bad >= 0:
            self._fire(done.tolist(), bad)
        if added:
            self._request_start_update()
        return fids

    def _request_start_update(self) -> None:
        if not (self.quantum > 0 and self._timer_at <= self.env.now + self.quantum):
            # (with a quantum, flows starting within one quantum of the next batch of completions join
            # at that batch, up to one quantum late: one rate recomputation for both)
            self._request_update()

    @property
    def link_bytes(self) -> np.ndarray:
        """[E] bytes of the flows that have finished crossing each link (in-flight flows count 0 until they
        arrive: their delivered bytes are 0 until then)."""
        out = np.zeros(self._pad + 1)
        by_route = [(f, r) for f, r, _ in self._started if r is not None]
        if by_route:
            fids = np.concatenate([f for f, _ in by_route])
            rts = self._stack([r for _, r in by_route])
            out += np.bincount(rts.ravel(), weights=self._delivered(fids).repeat(rts.shape[1]),
                               minlength=self._pad + 1)
        by_row = [(f, w) for f, _, w in self._started if w is not None]
        if by_row and self._tab_rt is not None:  # bytes per route-table row first, then through the table
            fids = np.concatenate([f for f, _ in by_row])
            per_row = np.bincount(np.concatenate([w for _, w in by_row]), weights=self._delivered(fids),
                                  minlength=self._tab_rt.shape[0])
            out += np.bincount(self._tab_rt.ravel(), weights=per_row.repeat(self._tab_rt.shape[1]),
                               minlength=self._pad + 1)
        for off, rt in self._row_tables if self._compiled else ():
            per_row = self._cf.row_bytes[off:off + rt.shape[0]]
            out += np.bincount(rt.ravel(), weights=per_row.repeat(rt.shape[1]), minlength=self._pad + 1)
        return out[:self._pad]

    def _delivered(self, fids: Any) -> np.ndarray:
        """Bytes delivered by flows ``fids``: all of them once arrived, none before (no per-flow record kept)."""
        return np.where(np.isnan(self._end[fids]), 0.0, self._req[fids])

    def group_last(self, gid: int) -> tuple[int, float]:
        """(id of the flow that arrived last in group ``gid`` or -1 if none, its arrival time)."""
        return int(self._g_last[gid]), float(self._g_latest[gid])

    def flow_record(self) -> dict[str, np.ndarray]:
        """Per flow ever started: requested and delivered bytes, start and arrival time (nan while in flight)."""
        n = self.num_flows
        return {"requested": self._req[:n].copy(), "delivered": self._delivered(slice(0, n)),
                "start": self._start[:n].copy(), "end": self._end[:n].copy()}

    @property
    def active_flows(self) -> int:
        if self._compiled:
            return self._cf.active
        return int(self._remaining.size + sum(a[1].size for a in self._pending_adds))

    # ---- internals --------------------------------------------------------------------------------
    def _class_ids(self, crt: np.ndarray) -> np.ndarray:
        """Class id [F] of flows with constraining routes ``crt`` [F, H]: flows whose narrowest links (those of the
        route's smallest capacity) are the same share a class, registered here on first sight.

        In a rail-optimised cluster with PXN, every GPU of a node reaches a given remote GPU through the same pair
        of NICs, so eight flows share a class and the compiled solve works on one row for them."""
        pad = self._pad
        cap = self._cap[crt]  # pad: inf
        tier = cap.min(axis=1) if crt.shape[1] else np.full(crt.shape[0], np.inf)
        narrow = np.sort(np.where((cap == tier[:, None]) & (crt < pad), crt, pad), axis=1)
        rows, inv = np.unique(narrow, axis=0, return_inverse=True)
        inv = np.asarray(inv).ravel()
        ids = np.empty(rows.shape[0], dtype=np.int64)
        new_rows: list[np.ndarray] = []
        for i, row in enumerate(rows):
            key = row[row < pad].tobytes()
            c = self._cls_index.get(key)
            if c is None:
                c = self._cls_index[key] = len(self._cls_index)
                new_rows.append(row[row < pad])
            ids[i] = c
        if new_rows:
            HT = max([self._cls_rt.shape[1]] + [r.size for r in new_rows] + [1])
            table = np.full((len(self._cls_index), HT), pad, dtype=np.int64)
            n0 = self._cls_rt.shape[0]
            table[:n0, :self._cls_rt.shape[1]] = self._cls_rt
            for i, r in enumerate(new_rows):
                table[n0 + i, :r.size] = r
            self._cls_rt = table
            self._cls_tier = np.append(self._cls_tier, [self._cap[r].min() if r.size else np.inf for r in new_rows])
            self._cls_nn = np.append(self._cls_nn, [r.size for r in new_rows]).astype(np.int64)
            if self._compiled:
                self._cf.grow_classes(len(self._cls_index))
        return ids[inv]

    def _route_table(self, routes: Any, F: int) -> np.ndarray:
        if isinstance(routes, np.ndarray) and routes.ndim == 2:
            rt = routes.astype(np.int64, copy=True)
            if rt.shape[0] != F:
                raise MoesimError(f"{rt.shape[0]} routes for {F} flow sizes")
            rt[rt < 0] = self._pad
        else:
            routes = list(routes)
            if len(routes) != F:
                raise MoesimError(f"{len(routes)} routes for {F} flow sizes")
            H = max([len(r) for r in routes] + [1])
            rt = np.full((F, H), self._pad, dtype=np.int64)
            for i, r in enumerate(routes):
                if len(r):
                    rt[i, :len(r)] = r
        if rt.size and (rt.min() < 0 or rt.max() > self._pad):
            raise MoesimError(f"route names a link outside 0..{self.num_links - 1}")
        return rt

    def reserve(self, nflows: int) -> None:
        """Room for ``nflows`` more flows' records (a caller that knows how many it will start saves the
        repeated growth: ~1 s of copying and page faults over a 256-GPU step's 5 M flows)."""
        need = self.num_flows + int(nflows)
        if need > self._req.size:
            for name in ("_req", "_start", "_end"):
                old = getattr(self, name)
                new = np.empty(need)
                new[:self.num_flows] = old[:self.num_flows]
                setattr(self, name, new)

    def _records_for(self, F: int) -> None:
        """Room for ``F`` more flows' records, doubling (unless :meth:`reserve` made it already)."""
        if self.num_flows + F > self._req.size:
            self.reserve(max(F, self.num_flows + F))

    def _new_ids(self, nb: np.ndarray) -> np.ndarray:
        n0, F = self.num_flows, nb.size
        self._records_for(F)
        fids = np.arange(n0, n0 + F)
        self._req[n0:n0 + F] = nb
        self._start[n0:n0 + F] = self.env.now
        self._end[n0:n0 + F] = np.nan
        self.num_flows += F
        return fids

    def _arrive(self, groups: np.ndarray, when: np.ndarray, fids: np.ndarray) -> None:
        """Count flows (arriving at ``when``) towards their groups; fire completed groups at their latest arrival."""
        if self._compiled:
            done, bad = _jit.arrive_core(groups, when, fids, self._g_pending, self._g_latest, self._g_last)
        else:
            done, bad = [], -1
            pending, latest, last = self._g_pending, self._g_latest, self._g_last
            for g, t, f in zip(groups.tolist(), when.tolist(), fids.tolist()):
                if t >= latest[g]:
                    latest[g] = t
                    last[g] = f
                pending[g] -= 1
                if pending[g] == 0:
                    done.append(g)
                elif pending[g] < 0:
                    bad = g
                    break
        self._fire(done.tolist() if isinstance(done, np.ndarray) else done, bad)

    def _fire(self, done: list[int], bad: int) -> None:
        """Fire the events of completed groups at their latest arrival; then report a group that got too many."""
        now = self.env.now
        for g in done:
            ev, val = self._g_event[g], self._g_value[g]
            delay = float(self._g_latest[g]) - now
            if delay <= 0:
                ev.succeed(val)
            else:
                self.env.timeout(delay).callbacks.append(lambda _e, ev=ev, val=val: ev.succeed(val))
        if bad >= 0:
            raise MoesimError(f"group {bad} received more flows than it expected")

    def _advance(self) -> None:
        """Move every active flow forward to now at its current rate."""
        now = self.env.now
        dt = now - self._last
        self._last = now
        if dt <= 0 or self._remaining.size == 0:
            return
        self._remaining -= np.minimum(self._rate * dt, self._remaining)

    def _request_update(self) -> None:
        if not self._update_pending:
            self._update_pending = True
            # a zero-delay event queued behind everything already due now: batches same-instant changes
            self.env.timeout(0).callbacks.append(self._update)

    def _complete_due(self) -> None:
        if self._remaining.size == 0:
            return
        # due: projected end reached (exact for the flows the timer was armed for), or nothing left to send
        now = self.env.now
        due = (self._finish <= now + _TIME_EPS * abs(now)) | (self._remaining <= 0)
        done = due.nonzero()[0]
        if done.size == 0:
            return
        # a finished flow has moved all its bytes (the float residue of rate × time is snapped away)
        fid = self._fid[done]
        arrival = np.minimum(self._finish[done], self.env.now) + self._lat[done]
        self._end[fid] = arrival
        groups = self._group[done]
        keep = (~due).nonzero()[0]
        self._croutes = self._croutes[keep]
        self._remaining, self._rate, self._finish = self._remaining[keep], self._rate[keep], self._finish[keep]
        self._lat, self._group, self._fid = self._lat[keep], self._group[keep], self._fid[keep]
        self._cls = self._cls[keep]
        self._arrive(groups, arrival, fid)

    def _stack(self, parts: list[np.ndarray]) -> np.ndarray:
        """Route tables [F_i, H_i] stacked into one [sum F_i, max H_i], padded with the pad link."""
        if len(parts) == 1:
            return parts[0]
        H = max(p.shape[1] for p in parts)
        if all(p.shape[1] == H for p in parts):
            return np.concatenate(parts)
        out = np.full((sum(p.shape[0] for p in parts), H), self._pad, dtype=np.int64)
        i = 0
        for p in parts:
            out[i:i + p.shape[0], :p.shape[1]] = p
            i += p.shape[0]
        return out

    def _update(self, _event: Any = None) -> None:
        """Batch point: take in new flows, retire finished ones, recompute rates, arm the next timer."""
        self._update_pending = False
        if self._compiled:
            self._update_compiled()
            return
        self._advance()
        self._complete_due()
        if self._pending_adds:
            adds = self._pending_adds
            self._pending_adds = []
            self._croutes = self._stack([self._croutes] + [a[5] for a in adds])
            self._remaining = np.concatenate([self._remaining] + [a[1] for a in adds])
            self._lat = np.concatenate([self._lat] + [a[2] for a in adds])
            self._group = np.concatenate([self._group] + [a[3] for a in adds])
            self._fid = np.concatenate([self._fid] + [a[4] for a in adds])
            self._cls = np.concatenate([self._cls] + [a[6] for a in adds])
        self._gen += 1
        self._timer_at = np.inf
        if self._remaining.size == 0:
            self._rate = np.empty(0)
            self._finish = np.empty(0)
            return
        self._rate = maxmin_rates(self._croutes, self._cap)
        self.recomputations += 1
        with np.errstate(divide="ignore"):
            ttf = self._remaining / self._rate
        first = max(float(ttf.min()), 0.0)
        self._finish = self.env.now + ttf
        q = self.quantum
        if self.rel_quantum > 0:
            # relative part: a fraction of the median time the flows in flight still need
            mid = ttf.size // 2
            q = max(q, self.rel_quantum * float(np.partition(ttf, mid)[mid]))
        if q > 0:
            # retire every flow ending within one quantum of the first in one batch, at the last one's end
            delay = float(ttf[ttf <= first + q].max())
        else:
            delay = first
        gen = self._gen
        self._timer_at = self.env.now + delay
        self.env.timeout(delay).callbacks.append(lambda _e: self._on_timer(gen))

    def _update_compiled(self) -> None:
        """:meth:`_update` in one compiled call over the flow buffers (:func:`moesim.sim.maxmin_jit.update_core`:
        the same steps; rates from the class-aggregated solve, equal to the per-flow one up to round-off)."""
        now = self.env.now
        dt = now - self._last
        self._last = now
        nd, bad, delay = self._cf.update(dt, now, _TIME_EPS, self._cap, _LEVEL_RTOL, self.quantum, self.rel_quantum,
                                         self._cls_rt, self._cls_tier, self._cls_nn,
                                         (self._req, self._end),
                                         (self._g_pending, self._g_latest, self._g_last))
        if nd or bad >= 0:
            self._fire(self._cf.done_buf[:nd].tolist(), bad)
        self._gen += 1
        self._timer_at = np.inf
        if delay < 0:
            return
        self.recomputations += 1
        gen = self._gen
        self._timer_at = now + delay
        self.env.timeout(delay).callbacks.append(lambda _e: self._on_timer(gen))

    def _on_timer(self, gen: int) -> None:
        if gen != self._gen:
            return  # superseded by a later start or end
        self._timer_at = np.inf
        self._request_update()
