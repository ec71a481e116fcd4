"""Analytic engine: every (step, layer) at once, in numpy; the busiest GPU and the busiest link decide.

Per step ``s`` and MoE layer ``l`` (phases run one after another, every GPU waits for the slowest):

    dense    = max_g [attention(gpu_tokens) + gate(gpu_tokens)]          (+ all-reduce of attention in TP layouts)
    dispatch = comm_time(send_tokens · token_bytes)                       (ep; zero when nothing leaves a GPU)
    expert   = max_g expert_time(token-choices of g's slots)
    combine  = comm_time(send_tokensᵀ · token_bytes)                      (ep) or reduce-scatter + all-gather

``comm_time(bytes[src, dst])`` = max over links of (bytes crossing the link on the fixed routes of
``topology.routing_matrix()``) / bandwidth, plus the largest path latency among the pairs that exchange bytes:
a contention-aware bound in which the busiest link sets the pace (every flow through it shares it, as the DES's
max-min fair network does when that link is the only bottleneck). Per-token ``ep`` workloads of many GPUs carry
:class:`~moesim.sim.cells.SendCells`; on topologies whose links each carry whole cells (rails: per-GPU NVLink
and NICs, checked once per topology) the same sums come from those 2·G·P numbers per side instead of the G² pairs.

Collectives (TP layouts) are priced as the discrete-event engine models them: all-reduce = reduce-scatter then
all-gather, each half a pairwise exchange where every GPU sends ``nbytes / G`` to every other GPU, so each GPU
moves ``2·(G-1)/G·nbytes`` in all (``nbytes`` = step tokens × token bytes).

``overlap_comm``: a layer takes max(compute, communication) (two micro-batches overlapping, an optimistic bound);
phases are scaled to that span. Dense layers (``model.num_dense_layers``, DeepSeek-V3's first three) are charged
per step as attention + a dense FFN of ``model.dense_ffn_size`` (data-parallel in ``ep``, as DeepSeek's
deployment runs the dense MLPs; tensor-parallel in the TP layouts).
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import scipy.sparse as sp

from moesim.cost import CostModel
from moesim.errors import MoesimError
from moesim.sim.config import SimConfig
from moesim.sim.fixed import collective_latency, exchange_latency
from moesim.sim.fixed import step_time as fixed_step_time
from moesim.sim.result import PHASES, SimResult
from moesim.sim.workload import Workload

TIMELINE_STEPS = 8  # per-GPU phase times kept for the report's timeline (first steps only)


# -- costs per layout -----------------------------------------------------------------------------------------
def _shard_expert(p: dict[str, Any], G: int) -> dict[str, Any]:
    """Expert cost of a 1/G FFN shard, fed 1/G of each token-choice (the TP workload's convention)."""
    q = dict(p)
    if q["kind"] == "roofline":
        # FLOPs of a shard-choice = 1/G of the choice's FLOPs at full width = the choice's FLOPs at width F/G;
        # weights read: 1/G of each used expert; activations: every choice's full hidden state in and out.
        q["bytes_per_expert"] = p["bytes_per_expert"] / G
        q["bytes_per_choice"] = p["bytes_per_choice"] * G
    elif q["kind"] == "affine":  # a + b·n + c·used, n counted in shard-choices (n/G): b unchanged, c/G
        q["c"] = p["c"] / G
    elif q["kind"] == "table":  # per-expert time t(x) at full width; a shard: t(G·x')/G
        q["x"] = (np.asarray(p["x"], dtype=float) / G).tolist()
        q["y"] = (np.asarray(p["y"], dtype=float) / G).tolist()
    return q


def _shard_attention(p: dict[str, Any], G: int) -> dict[str, Any]:
    """Attention sharded over G GPUs (heads split), fed T/G token-equivalents: weights read 1/G each."""
    q = dict(p)
    if q["kind"] == "roofline":
        q["bytes_fixed"] = p["bytes_fixed"] / G
    elif q["kind"] == "affine":
        q["a"] = p["a"]  # fitted on DP runs: the fixed part is mostly launches
    return q


def _replicate_gate(p: dict[str, Any], G: int) -> dict[str, Any]:
    """Router replicated on every GPU over all T tokens, fed T/G token-equivalents: per-token cost × G."""
    q = dict(p)
    if q["kind"] == "roofline":
        q["flops_per_token"] = p["flops_per_token"] * G
        q["bytes_per_token"] = p["bytes_per_token"] * G
    elif q["kind"] == "affine":
        q["b"] = p["b"] * G
    return q


def layout_cost(cost: CostModel, layout: str, num_gpus: int) -> CostModel:
    """The cost model as the workload of ``layout`` feeds it (idempotent; ``ep`` returns ``cost`` itself).

    TP layouts count each GPU's share of the attention as T/G token-equivalents and, in ``tp``, each GPU's expert
    work as 1/G of every token-choice; this rescales the cost components so those counts give the TP shard's
    time: attention weights read 1/G per GPU, the router run on all tokens on every GPU, expert weights 1/G.
    """
    G = int(num_gpus)
    if layout == "ep" or G == 1:
        return cost
    tag = f"{layout}/{G}"
    if cost.info.get("layout") == tag:
        return cost
    if cost.info.get("layout"):
        raise MoesimError(f"cost model already adjusted for layout {cost.info['layout']}, not {tag}")
    expert = _shard_expert(cost.expert, G) if layout == "tp" else cost.expert
    return CostModel(expert, _shard_attention(cost.attention, G), _replicate_gate(cost.gate, G),
                     {**cost.info, "layout": tag})


# -- communication ---------------------------------------------------------------------------------------------
def custom_comm(config: Any) -> bool:
    """True when the ep exchanges need :mod:`moesim.sim.comm` (a backend other than flat, or wire dtypes)."""
    name = getattr(config, "comm", "flat")
    fixed = getattr(config, "fixed", None)
    return (getattr(name, "name", name) != "flat" or getattr(config, "dispatch_dtype", None) is not None
            or getattr(config, "combine_dtype", None) is not None or (fixed is not None and fixed.collectives))


class _CommTables:
    """The routing matrix extended so that one sparse product gives, per exchange, the bytes on every link,
    the bytes of the pairs at each path latency (to find the largest latency in use) and the bytes between GPUs
    of the same / different nodes; the diagonal (a GPU to itself) is left out everywhere."""

    def __init__(self, topology: Any) -> None:
        from moesim.sim.maxmin import dominated_links

        G = int(topology.num_gpus)
        R = topology.routing_matrix().tocsr()
        self.num_links = R.shape[1]
        self.bw = np.asarray(topology.edge_bw, dtype=float)
        # only links that can be the busiest take part in the per-exchange product: a link whose routes all
        # cross another link that is no wider never carries more bytes per bandwidth (sim.network.dominated_links)
        routes = [R.indices[R.indptr[p]:R.indptr[p + 1]] for p in range(G * G)]
        self.keep = np.flatnonzero(~dominated_links(routes, self.bw)) if self.num_links else np.zeros(0, int)
        K = len(self.keep)
        plat = np.asarray(topology.path_latency(), dtype=float).ravel()
        off = ~np.eye(G, dtype=bool).ravel()
        self.levels, level_of = np.unique(np.round(plat, 15), return_inverse=True)
        inter = np.asarray(topology.is_inter_node(), dtype=bool).ravel()
        pairs = np.flatnonzero(off)
        nl = len(self.levels)
        rows = np.concatenate([pairs, pairs])
        cols = np.concatenate([K + level_of[pairs], K + nl + inter[pairs].astype(int)])
        extra = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(G * G, K + nl + 2))
        Rk = R[:, self.keep].tocsr()
        Rk.resize((G * G, K + nl + 2))
        fwd = (Rk + extra).tocsr()
        perm = (np.arange(G * G) % G) * G + np.arange(G * G) // G  # row s*G+d of the transpose = pair (d, s)
        # stored transposed ([X, G*G] CSR): the product runs as sparse @ (small contiguous blocks of exchanges)
        self.fwd_t = fwd.T.tocsr()
        self.back_t = fwd[perm].T.tocsr()
        self.links_t, self.links_back_t = R.T.tocsr(), R[perm].T.tocsr()  # [E, G*G] for the link totals
        # exchanges whose bytes do not depend on the source (load-only workloads: send[o, d] = r[d] for all o):
        # the same products with the pairs of each destination summed up front, G columns instead of G²
        pair = np.arange(G * G)
        agg = sp.csr_matrix((np.ones(G * G), (pair % G, pair)), shape=(G, G * G))  # pair (o, d) -> d
        self.fwd_dst_t = (agg @ fwd).T.tocsr()
        self.back_dst_t = (agg @ fwd[perm]).T.tocsr()
        self.links_dst_t, self.links_back_dst_t = (agg @ R).T.tocsr(), (agg @ R[perm]).T.tocsr()
        # link rows carry 1/bandwidth: the product gives each kept link's busy seconds directly
        inv = sp.diags(np.concatenate([1.0 / self.bw[self.keep], np.ones(nl + 2)]))
        for name in ("fwd_t", "back_t", "fwd_dst_t", "back_dst_t"):
            setattr(self, name, (inv @ getattr(self, name)).tocsr())
        # per-token workloads with SendCells: the same products from G·2P cells per side, when every column is
        # constant over the pairs of each cell of one side (rails: per-GPU NVLink and NIC links, per-pair latency
        # classes); None where the topology's routes do not split so (then the G² pairs are priced)
        self.cell_p = int(getattr(topology, "gpus_per_node", 0) or 0)
        self.cell_t: tuple[Any, Any, Any, Any] | None = None
        if self.cell_p and G % self.cell_p == 0 and self.cell_p < G:
            fs = _cell_split((inv @ fwd.T).T.tocsr(), G, self.cell_p)
            ls = _cell_split(R, G, self.cell_p)
            if fs is not None and ls is not None:
                self.cell_t = (fs[0].T.tocsr(), fs[1].T.tocsr(), ls[0].T.tocsr(), ls[1].T.tocsr())

    def run(self, flat: np.ndarray, transpose: bool, per_dst: bool = False
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """flat [N, G*G] bytes -> (seconds [N], link bytes summed [E], intra-node [N], inter-node [N]).

        ``per_dst``: flat is [N, G], the bytes every source sends to each destination (the same for all sources).
        """
        # sparse products, not BLAS: a multi-threaded GEMM of these thin shapes stalls on a busy machine (measured
        # 20 ms instead of 0.07 ms for [640, 64] x [64, 20] under load), and the routing matrix is mostly zeros
        if per_dst:
            m, links = (self.back_dst_t, self.links_back_dst_t) if transpose else (self.fwd_dst_t, self.links_dst_t)
        else:
            m, links = (self.back_t, self.links_back_t) if transpose else (self.fwd_t, self.links_t)
        out = self._sparse(flat, m)  # [K + levels + 2, N]: rows are contiguous, reductions over them elementwise
        return self._finish(out, np.asarray(links @ flat.sum(axis=0)).ravel())

    def run_cells(self, src_t: np.ndarray, dst_t: np.ndarray, transpose: bool, scale: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """SendCells as columns, src_t, dst_t [G*2P, N] tokens -> as :meth:`run` gives for their exchanges in
        bytes (× ``scale``; ``cell_t`` set). The combine (``transpose``) sends every pair back: its source cells
        are the dispatch's destination cells."""
        assert self.cell_t is not None
        cs, cd, ls, ld = self.cell_t
        a, b = (dst_t, src_t) if transpose else (src_t, dst_t)
        out = cs @ a
        out += cd @ b
        out *= scale  # linear in the bytes; the latency test (> 0) does not change
        total = (ls @ a.sum(axis=1) + ld @ b.sum(axis=1)) * scale
        return self._finish(out, total)

    def _finish(self, out: np.ndarray, total: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """out [K + levels + 2, N] per-exchange column sums -> (seconds, link bytes, intra-node, inter-node)."""
        K, nl = len(self.keep), len(self.levels)
        N = out.shape[1]
        busy = out[:K].max(axis=0) if K else np.zeros(N)  # seconds: rows are scaled by 1/bandwidth
        lat = np.zeros(N)
        for i, level in enumerate(self.levels):  # ascending: the largest latency among the pairs in use stays
            if level > 0:
                np.putmask(lat, out[K + i] > 0, level)
        busy += lat
        return busy, np.asarray(total).ravel(), out[K + nl], out[K + nl + 1]

    @staticmethod
    def _sparse(flat: np.ndarray, m: Any) -> np.ndarray:
        """m [X, C] sparse, flat [N, C] -> m @ flat.T [X, N], in blocks that keep the transposed copy in cache."""
        if flat.shape[1] < 64:  # narrow (per-destination rows): one transposed copy is cheap, one product
            return m @ np.ascontiguousarray(flat.T)
        out = np.empty((m.shape[0], len(flat)))
        block = max(16, _BLOCK_ELEMS // max(flat.shape[1], 1))
        for i in range(0, len(flat), block):
            out[:, i:i + block] = m @ np.ascontiguousarray(flat[i:i + block].T)
        return out


def _cell_split(m: Any, G: int, P: int) -> tuple[Any, Any] | None:
    """m [G*G, C] per-pair columns -> (ms, md) [G*2P, C] with ``vec(B) @ m == src(B) @ ms + dst(B) @ md`` for
    every B [G, G] (src / dst: its SendCells), each column taken whole by the side over whose cells it is
    constant; None when some column is constant over neither side's cells."""
    coo = sp.coo_matrix(m)
    coo.eliminate_zeros()
    C = m.shape[1]
    pair, col, val = coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data
    s, d = pair // G, pair % G
    inter = (s // P != d // P).astype(np.int64)
    sides = ((s * 2 + inter) * P + d % P, (d * 2 + inter) * P + s % P)
    # pairs per cell (the same for both sides): P for the own node's cells, N - 1 for the other nodes' cells
    size = np.where(np.arange(2 * P) < P, 1, G // P - 1)[None, :].repeat(G, axis=0).ravel()
    ok, groups = [], []
    for cell in sides:
        key = cell * C + col
        order = np.argsort(key, kind="stable")
        k_sorted, v_sorted = key[order], val[order]
        uniq, start, cnt = np.unique(k_sorted, return_index=True, return_counts=True)
        if len(uniq):
            vmin, vmax = np.minimum.reduceat(v_sorted, start), np.maximum.reduceat(v_sorted, start)
        else:
            vmin = vmax = np.zeros(0)
        good = (cnt == size[uniq // C]) & (vmin == vmax)
        col_ok = np.ones(C, dtype=bool)
        col_ok[uniq[~good] % C] = False
        ok.append(col_ok)
        groups.append((uniq, vmin))
    use_src = ok[0]
    if not np.all(use_src | ok[1]):
        return None
    out = []
    for side, (uniq, vmin) in enumerate(groups):
        c = uniq % C
        sel = use_src[c] if side == 0 else ~use_src[c]
        out.append(sp.csr_matrix((vmin[sel], (uniq[sel] // C, c[sel])), shape=(G * 2 * P, C)))
    return out[0], out[1]


_BLOCK_ELEMS = 65536  # bytes of one block of exchanges / 8: 512 KiB (64 GPUs: 16 exchanges)
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tables(topology: Any) -> _CommTables:
    try:
        t = _TABLES.get(topology)
    except TypeError:  # not weak-referenceable: no cache
        return _CommTables(topology)
    if t is None:
        t = _CommTables(topology)
        _TABLES[topology] = t
    return t


def _comm(topology: Any, bytes_matrix: np.ndarray, transpose: bool = False, scale: float = 1.0
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """bytes [..., G, G] -> (seconds [...], link bytes [E] summed, intra-node bytes [...], inter-node bytes [...]).

    ``transpose``: price the reverse exchange (dst -> src), as the combine does, without copying the matrix.
    ``scale``: multiplies the bytes (tokens -> bytes). A matrix broadcast along its source axis (stride 0, as
    :func:`~moesim.sim.workload.workload_from_counts` makes them) is priced from its [..., G] destination row.
    """
    G = int(topology.num_gpus)
    b = np.asarray(bytes_matrix)
    lead = b.shape[:-2]
    per_dst = b.ndim >= 2 and b.shape[-2] > 1 and b.strides[-2] == 0
    if per_dst:
        flat = np.asarray(b[..., 0, :], dtype=float).reshape(-1, G) * scale
    else:
        flat = np.asarray(b, dtype=float).reshape(-1, G * G)
        if scale != 1.0:
            flat = flat * scale
    t, link, intra, inter = _tables(topology).run(flat, transpose, per_dst)
    return t.reshape(lead), link, intra.reshape(lead), inter.reshape(lead)


def _comm_cells(topology: Any, cells: Any, transpose: bool = False, scale: float = 1.0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """As :func:`_comm` for ``send_tokens`` (× ``scale``), priced from its SendCells; None where the topology's
    links do not split into cells of the workload's node size (the caller prices the pairs)."""
    t = _tables(topology)
    if cells is None or t.cell_t is None or cells.gpus_per_node != t.cell_p:
        return None
    lead = cells.src.shape[:-2]
    src_t, dst_t = cells.columns()
    sec, link, intra, inter = t.run_cells(src_t, dst_t, transpose, scale)
    return sec.reshape(lead), link, intra.reshape(lead), inter.reshape(lead)


def comm_time(topology: Any, bytes_matrix: np.ndarray) -> np.ndarray:
    """bytes [..., G, G] (src, dst) -> seconds [...]: busiest link (its bytes / bandwidth) + max path latency."""
    return _comm(topology, bytes_matrix)[0]


def pairwise_half(nbytes: np.ndarray, num_gpus: int) -> np.ndarray:
    """[...] bytes all-reduced -> [..., G, G] bytes of one half (reduce-scatter or all-gather): nbytes/G per pair."""
    G = int(num_gpus)
    nb = np.asarray(nbytes, dtype=float)
    out = np.broadcast_to((nb / G)[..., None, None], nb.shape + (G, G)).copy()
    out[..., np.arange(G), np.arange(G)] = 0.0
    return out


def _split_bytes(topology: Any, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bytes [S, ..., G, G] -> (intra-node [S], inter-node [S]) off-diagonal totals."""
    S = b.shape[0]
    _, _, intra, inter = _comm(topology, b)
    return intra.reshape(S, -1).sum(axis=1), inter.reshape(S, -1).sum(axis=1)


# -- dense layers ----------------------------------------------------------------------------------------------
def dense_layers_time(workload: Workload, topology: Any, cost: CostModel, model: Any,
                      config: SimConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per step: (seconds [S] of the model's dense layers, compute seconds per GPU [S, G], bytes [S, G, G]).

    Each dense layer: attention + gate as in a MoE layer, then a dense FFN of ``model.dense_ffn_size``
    priced as one expert of that width (data-parallel on each GPU's tokens in ``ep``; a 1/G shard in the TP
    layouts, whose activations are all-reduced).
    """
    S, G = workload.num_steps, workload.num_gpus
    n = int(getattr(model, "num_dense_layers", 0) or 0)
    if not config.dense_layers or n == 0 or S == 0:
        return np.zeros(S), np.zeros((S, G)), np.zeros((S, G, G))
    F = float(getattr(model, "dense_ffn_size", 0) or model.ffn_size)
    ratio = F / model.ffn_size
    c = layout_cost(cost, config.layout, G)
    tok = np.asarray(workload.gpu_tokens[:, 0, :], dtype=float)  # [S, G]
    ph = np.asarray(workload.phase)[:, None]
    per = c.attention_time(tok, ph, workload.kv_broadcast(2)) + c.gate_time(tok)
    # the dense FFN is TP-sharded in both TP layouts; ``c`` already shards experts in ``tp`` but not in ep-tp-attn
    ffn_cost = c if config.layout in ("ep", "tp") else CostModel(_shard_expert(c.expert, G), c.attention, c.gate,
                                                                 {**c.info, "layout": f"tp/{G}"})
    per = per + ffn_cost.expert_time(tok[..., None]) * ratio
    t = per.max(axis=1)
    nbytes = np.zeros((S, G, G))
    if config.layout != "ep" and G > 1:
        half = pairwise_half(np.asarray(workload.step_tokens, dtype=float) * model.token_bytes, G)
        # attention and FFN outputs, two halves each, plus each all-reduce's fixed latency
        t = t + 4 * comm_time(topology, half) + 2 * collective_latency(config, G, topology.gpus_per_node)
        nbytes = 4 * half
    return n * t, n * per, n * nbytes


# -- the engine -------------------------------------------------------------------------------------------------
def _max_last(a: np.ndarray) -> np.ndarray:
    """a.max(axis=-1): for a short last axis one elementwise pass per entry (numpy's per-row reduction is slower)."""
    n = a.shape[-1]
    if n > 16 or n == 0:
        return a.max(axis=-1)
    out = a[..., 0].copy()
    for i in range(1, n):
        np.maximum(out, a[..., i], out=out)
    return out


def _compact(a: np.ndarray) -> np.ndarray:
    """View of ``a`` with its broadcast axes (stride 0) cut to length 1: elementwise costs computed once."""
    return a[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for st, n in zip(a.strides, a.shape))]


def run_analytic(workload: Workload, topology: Any, cost: CostModel, model: Any,
                 config: SimConfig | None = None, *, timeline_steps: int = TIMELINE_STEPS) -> SimResult:
    """Step times and their breakdown for every step of ``workload`` (see the module docstring)."""
    config = config or SimConfig()
    G = int(topology.num_gpus)
    if workload.num_gpus != G:
        raise MoesimError(f"workload is for {workload.num_gpus} GPUs but topology {topology.name!r} has {G}")
    if workload.layout != config.layout:
        raise MoesimError(f"workload was built for layout {workload.layout!r}, config says {config.layout!r}")
    cost = layout_cost(cost, config.layout, G)
    S, L, slots = workload.slot_tokens.shape
    W = slots // G
    tb = float(model.token_bytes)
    phase_time = np.zeros((S, L, len(PHASES)))
    gpu_tok = _compact(np.asarray(workload.gpu_tokens, dtype=float))  # broadcast axes priced once
    if config.include_dense:
        att = np.asarray(cost.attention_time(gpu_tok, np.asarray(workload.phase)[:, None, None],
                                             workload.kv_broadcast(3)), dtype=float)
        gate = np.asarray(cost.gate_time(gpu_tok), dtype=float)
    else:
        att = gate = np.zeros((S, 1, 1))
    dense = att + gate
    g_star = dense.argmax(axis=2)[..., None]  # a broadcast GPU axis: GPU 0, as argmax picks among equals
    phase_time[..., 0] = np.take_along_axis(att, g_star, axis=2)[..., 0]
    phase_time[..., 1] = np.take_along_axis(gate, g_star, axis=2)[..., 0]
    # busy seconds of the dense part per GPU, summed over layers (on the compact array: a broadcast layer axis
    # is one multiplication)
    dense_busy = dense[:, 0, :] * L if dense.shape[1] == 1 else dense.sum(axis=1)
    att, gate, dense = (np.broadcast_to(a, (S, L, G)) for a in (att, gate, dense))
    expert = np.asarray(cost.expert_time(workload.slot_tokens.reshape(S, L, G, W)), dtype=float)  # [S, L, G]
    phase_time[..., 3] = _max_last(expert)
    link_bytes = np.zeros(int(topology.num_links))
    # send_tokens [S, L, G, G] tokens (or their SendCells), priced in bytes (× tb)
    b_intra, b_inter = np.zeros(S), np.zeros(S)
    if config.layout == "ep" and G > 1 and custom_comm(config):
        # an all-to-all backend or wire dtypes (moesim.sim.comm): its own bytes per pair, link efficiencies and
        # fixed per-kernel latencies; the DES charges the same (des.step_stages)
        from moesim.sim import comm

        ctopo = comm.effective_topology(topology, config.comm)
        disp_b, comb_b = comm.exchange_bytes(workload, model, config, topology.gpus_per_node)
        lat_d, lat_c = exchange_latency(config, G, topology.gpus_per_node)
        t_disp, lb, bi, bo = _comm(ctopo, disp_b)
        t_comb, lb2, ci, co = _comm(ctopo, comb_b)
        phase_time[..., 2] = t_disp + lat_d
        phase_time[..., 4] = t_comb + lat_c
        link_bytes += lb + lb2
        b_intra += bi.sum(axis=1) + ci.sum(axis=1)
        b_inter += bo.sum(axis=1) + co.sum(axis=1)
    elif config.layout in ("ep", "ep-tp-attn") and G > 1:
        by_cells = _comm_cells(topology, workload.cells, scale=tb) if config.layout == "ep" else None
        t_disp, lb, bi, bo = by_cells or _comm(topology, workload.send_tokens, scale=tb)
        phase_time[..., 2] = t_disp
        link_bytes += lb
        bi, bo = bi.sum(axis=1), bo.sum(axis=1)
        b_intra += bi
        b_inter += bo
    comm_overlappable = phase_time[..., 2].copy()
    if config.layout == "ep" and G > 1 and custom_comm(config):
        comm_overlappable += phase_time[..., 4]
    elif config.layout == "ep" and G > 1:
        by_cells = _comm_cells(topology, workload.cells, transpose=True, scale=tb)
        t_comb, lb, _, _ = by_cells or _comm(topology, workload.send_tokens, transpose=True, scale=tb)
        phase_time[..., 4] = t_comb
        link_bytes += lb
        b_intra += bi
        b_inter += bo
        comm_overlappable += t_comb
    elif config.layout in ("ep-tp-attn", "tp") and G > 1:
        half = pairwise_half(np.asarray(workload.step_tokens, dtype=float) * tb, G)  # [S, G, G]
        t_half, lb_half, hi, ho = _comm(topology, half)  # [S]
        n_halves = 4 if config.include_dense else 2
        lat_ar = collective_latency(config, G, topology.gpus_per_node)  # per all-reduce (two halves)
        phase_time[..., 4] = 2 * t_half[:, None] + lat_ar
        if config.include_dense:
            phase_time[..., 0] += 2 * t_half[:, None] + lat_ar
        link_bytes += lb_half * L * n_halves
        b_intra += hi * L * n_halves
        b_inter += ho * L * n_halves
        comm_overlappable += n_halves * t_half[:, None]
    if config.overlap_comm:
        layer = phase_time.sum(axis=2)
        compute = _max_last(dense) + phase_time[..., 3]
        span = np.maximum(compute, comm_overlappable)
        with np.errstate(invalid="ignore", divide="ignore"):
            phase_time *= np.where(layer > 0, span / np.where(layer > 0, layer, 1.0), 0.0)[..., None]
    d_time, d_busy, d_bytes = dense_layers_time(workload, topology, cost, model, config)
    if d_bytes.any():
        link_bytes += topology.link_load(d_bytes).sum(axis=0)
        bi, bo = _split_bytes(topology, d_bytes)
        b_intra += bi
        b_inter += bo
    f_time = fixed_step_time(getattr(config, "fixed", None), workload, model, topology.device)
    step_time = phase_time.sum(axis=(1, 2)) + d_time + f_time
    moe_time = expert.sum(axis=1)
    gpu_busy = dense_busy + moe_time + d_busy
    gpu_load = workload.slot_tokens.reshape(S, L, G, W).sum(axis=(0, 3))
    n_tl = min(S, max(int(timeline_steps), 0))
    extra: dict[str, Any] = {
        "engine": "analytic",
        "dense_layer_time": d_time,
        "fixed_time": f_time,
        "gpu_phase_times": {"steps": n_tl, "attention": att[:n_tl], "gate": gate[:n_tl], "expert": expert[:n_tl],
                            "phase_time": phase_time[:n_tl], "dense_layer_time": d_time[:n_tl],
                            "dense_layer_busy": d_busy[:n_tl]},
    }
    return SimResult(step_time=step_time, phase_time=phase_time, gpu_busy=gpu_busy, moe_time=moe_time,
                     bytes_intra=b_intra, bytes_inter=b_inter, link_bytes=link_bytes, gpu_load=gpu_load,
                     step_tokens=np.asarray(workload.step_tokens), phase=np.asarray(workload.phase),
                     first_step=int(workload.first_step), extra=extra)
