"""Discrete-event engine: one simpy process per GPU per step, flows on a max-min fair network.

What it models, per step, on every GPU ``g`` independently (no global barrier inside a step):

    [dense layers] -> for each MoE layer: attention -> gate -> dispatch -> expert -> combine

- *compute* stages take the cost model's time for that GPU's own work (``cost.attention_time`` and
  ``cost.gate_time`` of the tokens whose dense part it computes, ``cost.expert_time`` of its slots'
  token-choices), with the cost model adjusted to the layout exactly as the analytic engine does
  (:func:`moesim.sim.analytic.layout_cost`);
- *exchange* stages start one flow to every peer the GPU sends bytes to (routes from the topology), then wait
  until all of *its own* incoming flows of that exchange arrived: a GPU starts its experts as soon as its own
  inputs are in, so a slow GPU only delays the GPUs that wait on its bytes, and stragglers emerge from
  imbalance instead of being imposed by a barrier. Flows share links max-min fairly (:mod:`moesim.sim.network`),
  and each arrives its path latency after its last byte left.
- Steps run back to back: a step begins when every GPU finished the previous one (the serving engine forms the
  next batch only when the whole model step is done). The time of a step is that span.

Layouts (``SimConfig.layout``, workloads as :mod:`moesim.sim.workload` builds them; bytes = tokens ×
``model.token_bytes``):

- ``ep``: dispatch sends ``send_tokens[src, dst]`` (the diagonal stays local: no flow), combine sends the same
  amounts back (``send_tokens.T``).
- ``ep-tp-attn``: every rank holds all tokens (the workload's dispatch is diagonal: no flows); attention's output
  is all-reduced after attention, the experts' outputs are combined by a reduce-scatter + all-gather.
- ``tp``: every expert is sharded over all GPUs; attention and MoE outputs are all-reduced.

Collectives (all-reduce = reduce-scatter then all-gather) are *pairwise* flows: in each half every GPU sends
``nbytes / G`` to every other GPU at once (``nbytes`` = step tokens × token bytes). Each GPU moves
``(G-1)/G · nbytes`` per half, as a ring would; a ring would add ``G-1`` latencies per half where this adds
one. The analytic engine prices the same bytes, so the two engines agree where nothing contends.

Dense layers (``model.num_dense_layers`` with ``config.dense_layers``, DeepSeek-V3's first three) run first in
each step, per GPU, with the analytic engine's costs (:func:`moesim.sim.analytic.dense_layers_time`), followed
in the TP layouts by the all-reduces of their attention and FFN outputs. Their critical-path time is reported in
``extra["dense_layer_time"]`` (not in ``phase_time``, as in the analytic engine).

``overlap_comm``: each GPU runs its step as two micro-batches (DeepSeek's two-micro-batch overlap): two processes
per GPU sharing one compute stream (a simpy resource), so one micro-batch's transfers overlap the other's
compute. Each micro-batch does half of every stage's work and bytes — like the analytic engine, this assumes the
split costs no extra time (in memory-bound decode a real half batch reads every expert's weights again).

Reported (``phase_time[s, l, :]``: dense, gate, dispatch, expert, combine): the step's *critical path*, traced
back from the GPU that finished last through the flows it waited on (a wait is charged from the moment the
awaited flow was sent, and the path continues on its sender; a compute stage includes any wait for the GPU's
compute stream), so the parts plus the dense layers sum to the step time exactly, as in the analytic engine.
``extra["events"]``: per-GPU timeline slices ``(gpu, name, start, end)`` for the Chrome trace (capped at
``max_events``; ``extra["events_dropped"]`` counts the rest; names get ``/mb1`` for the second micro-batch).
``extra["sim_events"]``: simpy events scheduled (for events/s); ``flows``, ``rate_recomputations``: the flow
network's work.
"""

from __future__ import annotations

import bisect
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import simpy

from moesim.errors import MoesimError
from moesim.sim.maxmin import dominated_links
from moesim.sim.network import FlowNetwork

PHASES = ("dense", "gate", "dispatch", "expert", "combine")
# Default bandwidth hand-over quantum (see FlowNetwork): the larger of 2 µs (about two NVLink hop latencies;
# ASTRA-sim's validated HGX-H100 setting is ~0.94 µs per hop, below which a fluid model says little anyway) and
# 5 % of the median time the flows in flight still need (so long prefill transfers do not multiply the work).
# Measured vs the exact network (quantum 0) on DeepSeek-V3, 4 MoE layers, synthetic decode, dgx-h100:8:
# 64 tokens/GPU +0.16 % step time with 25x fewer rate recomputations; 512 tokens/GPU +0.08 %, 16x fewer
# (benchmarks/bench_des.py --quantum/--rel-quantum to redo it).
DEFAULT_QUANTUM = 2e-6
DEFAULT_REL_QUANTUM = 0.05
DEFAULT_MAX_EVENTS = 200_000
DENSE_LAYER = -1  # layer index of the stages of the model's dense layers


@dataclass
class _Stage:
    kind: str  # "compute" | "exchange"
    slot: int  # index into PHASES
    layer: int  # MoE layer, or DENSE_LAYER
    name: str  # timeline label
    data: np.ndarray  # compute: [G] seconds; exchange: [G, G] bytes (src, dst), diagonal ignored


def _route_table(topology: Any, G: int) -> np.ndarray:
    """[G*G, H] edge indices of every GPU pair's route, padded with -1 (the topology's own table if it has one)."""
    if hasattr(topology, "route_table"):
        return np.asarray(topology.route_table(), dtype=np.int64)
    routes = [list(topology.route(s, d)) if s != d else [] for s in range(G) for d in range(G)]
    H = max([len(r) for r in routes] + [1])
    table = np.full((G * G, H), -1, dtype=np.int64)
    for i, r in enumerate(routes):
        table[i, :len(r)] = r
    return table


def _half(nbytes: float, G: int) -> np.ndarray:
    """[G, G] bytes of one pairwise half of an all-reduce of ``nbytes``."""
    out = np.full((G, G), nbytes / G)
    np.fill_diagonal(out, 0.0)
    return out


def step_stages(workload: Any, s: int, topology: Any, cost: Any, model: Any, config: Any) -> list[_Stage]:
    """The stages every GPU runs in step ``s``, in order, with per-GPU seconds or bytes.

    ``cost`` must already be adjusted to the layout (:func:`moesim.sim.analytic.layout_cost`).
    """
    from moesim.sim.analytic import custom_comm, dense_layers_time
    from moesim.sim.fixed import collective_latency, exchange_latency

    layout = getattr(config, "layout", "ep")
    G = int(topology.num_gpus)
    tb = float(model.token_bytes)
    gpu_tokens = np.asarray(workload.gpu_tokens[s], dtype=np.float64)  # [L, G]
    slot_tokens = np.asarray(workload.slot_tokens[s], dtype=np.float64)  # [L, slots]
    L = slot_tokens.shape[0]
    W = slot_tokens.shape[1] // G
    send = np.asarray(workload.send_tokens[s], dtype=np.float64) * tb  # [L, G, G]
    comb = None
    lat_d = lat_c = 0.0
    if layout == "ep" and G > 1 and custom_comm(config):  # backend / dtypes: the analytic engine's bytes
        from moesim.sim import comm

        send, comb = (x[0] for x in comm.exchange_bytes(workload.window(s, s + 1), model, config,
                                                        topology.gpus_per_node))
        lat_d, lat_c = exchange_latency(config, G, topology.gpus_per_node)
    tp = layout in ("ep-tp-attn", "tp") and G > 1
    half = _half(float(workload.step_tokens[s]) * tb, G) if tp else None
    lat_ar = collective_latency(config, G, topology.gpus_per_node) if tp else 0.0

    def allreduce(slot: int, layer: int, names: tuple[str, str]) -> list[_Stage]:
        """Two pairwise halves and, with fixed costs, the all-reduce's latency (as the analytic engine)."""
        out = [_Stage("exchange", slot, layer, n, half) for n in names]
        if lat_ar > 0:
            out.append(_Stage("compute", slot, layer, "allreduce-latency", np.full(G, lat_ar)))
        return out
    stages: list[_Stage] = []
    # the model's dense layers (DeepSeek-V3's first three), as the analytic engine prices them
    n_dense = int(getattr(model, "num_dense_layers", 0) or 0) if getattr(config, "dense_layers", True) else 0
    if n_dense:
        _, busy, _ = dense_layers_time(workload.window(s, s + 1), topology, cost, model, config)
        per = np.asarray(busy[0], dtype=np.float64) / n_dense  # [G]
        for _ in range(n_dense):
            stages.append(_Stage("compute", 0, DENSE_LAYER, "dense-layer", per))
            if tp:
                stages += allreduce(0, DENSE_LAYER, ("attn-reduce-scatter", "attn-all-gather"))
                stages += allreduce(0, DENSE_LAYER, ("ffn-reduce-scatter", "ffn-all-gather"))
    include_dense = getattr(config, "include_dense", True)
    if include_dense:
        ph = np.asarray(workload.phase[s])
        kv = None if workload.kv_len is None else np.asarray(workload.kv_len[s])
        att = np.asarray(cost.attention_time(gpu_tokens, ph, kv), dtype=np.float64)  # [L, G]
        gate = np.asarray(cost.gate_time(gpu_tokens), dtype=np.float64)
    expert = np.asarray(cost.expert_time(slot_tokens.reshape(L, G, W)), dtype=np.float64)  # [L, G]
    for layer in range(L):
        if include_dense:
            stages.append(_Stage("compute", 0, layer, "attention", att[layer]))
            if tp:
                stages += allreduce(0, layer, ("attn-reduce-scatter", "attn-all-gather"))
            stages.append(_Stage("compute", 1, layer, "gate", gate[layer]))
        if lat_d > 0:  # the backend's fixed per-kernel latency, charged to the phase on every GPU
            stages.append(_Stage("compute", 2, layer, "dispatch-latency", np.full(G, lat_d)))
        if layout in ("ep", "ep-tp-attn"):
            stages.append(_Stage("exchange", 2, layer, "dispatch", send[layer]))
        stages.append(_Stage("compute", 3, layer, "expert", expert[layer]))
        if lat_c > 0:
            stages.append(_Stage("compute", 4, layer, "combine-latency", np.full(G, lat_c)))
        if layout == "ep":
            stages.append(_Stage("exchange", 4, layer, "combine", send[layer].T if comb is None else comb[layer]))
        elif tp:
            stages += allreduce(4, layer, ("reduce-scatter", "all-gather"))
    return stages


class _StepRun:
    """One step: G × M lane processes (GPU g, micro-batch m) over one FlowNetwork."""

    def __init__(self, env: simpy.Environment, lanes: list[list[_Stage]], routes: np.ndarray, G: int,
                 net: FlowNetwork, events: list, max_events: int) -> None:
        self.env, self.lanes, self.routes, self.G = env, lanes, routes, G
        self.M = len(lanes)
        self.net = net
        K = len(lanes[0])
        self.K = K
        self.start = np.zeros((self.M, K, G))
        self.end = np.zeros((self.M, K, G))
        self.events, self.max_events = events, max_events
        self.dropped = 0
        self.stream = [simpy.Resource(env, capacity=1) for _ in range(G)] if self.M > 1 else None
        off = ~np.eye(G, dtype=bool)
        # one group per (micro-batch, exchange stage, receiving GPU), expecting its incoming flows
        self.gid = np.full((self.M, K, G), -1, dtype=np.int64)
        self.gev: dict[tuple[int, int], list[simpy.Event]] = {}
        nflows = 0
        for m, stages in enumerate(lanes):
            for k, st in enumerate(stages):
                if st.kind == "exchange":
                    counts = ((st.data > 0) & off).sum(axis=0)  # incoming flows per receiver
                    gids, evs = net.group_many(counts)
                    self.gid[m, k] = gids
                    self.gev[m, k] = evs
                    nflows += int(counts.sum())
        net.reserve(nflows)
        # the first flow id of every start and its (sending GPU, micro-batch): a start's flows have consecutive ids
        self.start_f0: list[int] = []
        self.start_src: list[tuple[int, int]] = []

    def lane(self, g: int, m: int):
        env, G = self.env, self.G
        suffix = f"/mb{m}" if m else ""
        for k, st in enumerate(self.lanes[m]):
            t0 = env.now
            self.start[m, k, g] = t0
            if st.kind == "compute":
                dt = float(st.data[g])
                if dt > 0:
                    if self.stream is not None:
                        with self.stream[g].request() as req:
                            yield req
                            t0 = env.now
                            yield env.timeout(dt)
                    else:
                        yield env.timeout(dt)
            else:
                row = st.data[g]
                dst = (row > 0).nonzero()[0]
                dst = dst[dst != g]
                if dst.size:
                    f0 = int(self.net.transfer_routes(g * G + dst, row[dst], self.gid[m, k, dst], checked=True)[0])
                    self.start_f0.append(f0)
                    self.start_src.append((g, m))
                yield self.gev[m, k][g]
            t1 = env.now
            self.end[m, k, g] = t1
            if t1 > t0:
                if len(self.events) < self.max_events:
                    self.events.append((g, st.name + suffix, t0, t1))
                else:
                    self.dropped += 1

    def critical_path(self, L: int) -> tuple[np.ndarray, float]:
        """([L, len(PHASES)] critical-path seconds per MoE layer and phase, seconds in dense layers).

        Walks back from the lane that finished last: a compute stage, or a wait that ended without waiting on
        a flow, counts its own duration; a wait that ended when a flow arrived counts the flow's time in flight
        (from the moment its sender started it) and continues on the sender's timeline. The parts add up to
        the step time exactly.
        """
        per = np.zeros((L, len(PHASES)))
        dense = 0.0
        if self.K == 0:
            return per, dense
        last = self.end[:, -1, :]  # [M, G]
        m, g = (int(x) for x in np.unravel_index(int(last.argmax()), last.shape))
        t = float(last[m, g])
        for k in range(self.K - 1, -1, -1):
            st = self.lanes[m][k]
            s0 = float(self.start[m, k, g])
            if st.kind == "exchange":
                f, arrival = self.net.group_last(int(self.gid[m, k, g]))
                if f >= 0 and arrival > s0:
                    ts = float(self.net._start[f])  # the sender started it when it began this exchange
                    if st.layer == DENSE_LAYER:
                        dense += t - ts
                    else:
                        per[st.layer, st.slot] += t - ts
                    g, m = self.start_src[bisect.bisect_right(self.start_f0, f) - 1]
                    t = ts
                    continue
            if st.layer == DENSE_LAYER:
                dense += t - s0
            else:
                per[st.layer, st.slot] += t - s0
            t = s0
        return per, dense


def _scheduled(env: simpy.Environment) -> int:
    """Events ``env`` has scheduled so far (for events/s): simpy numbers each one from its ``_eid`` counter, so
    reading it costs nothing per event (an overridden ``schedule`` cost ~10 % of a 64-GPU step)."""
    eid = getattr(env, "_eid", None)
    return int(next(eid)) if eid is not None else -1


def run_des(workload: Any, topology: Any, cost: Any, model: Any, config: Any = None,
            progress: Callable[[int, int], None] | bool | None = None, *,
            quantum: float = DEFAULT_QUANTUM, rel_quantum: float = DEFAULT_REL_QUANTUM,
            max_events: int = DEFAULT_MAX_EVENTS) -> Any:
    """Replay ``workload`` on ``topology`` event by event; returns a SimResult with the analytic engine's fields.

    ``progress``: a callable ``(steps_done, steps_total)`` (anything else: no reports).
    ``quantum`` / ``rel_quantum``: the flow network's bandwidth hand-over quantum (seconds / fraction of the
    median remaining transmission time; 0 and 0 = exact, slower), see :class:`moesim.sim.network.FlowNetwork`.
    """
    with _gc_out_of_the_way():
        return _run_des(workload, topology, cost, model, config, progress, quantum=quantum,
                        rel_quantum=rel_quantum, max_events=max_events)


@contextmanager
def _gc_out_of_the_way() -> Iterator[None]:
    """Freeze the objects alive before the run (modules, numba, the workload) for its duration: the collector's
    full passes, triggered by the run's many short-lived simpy events, then skip them (0.1-0.2 s of a 64-GPU step).
    Garbage made during the run is collected as usual. Leaves an outer freeze alone."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _run_des(workload: Any, topology: Any, cost: Any, model: Any, config: Any = None,
             progress: Callable[[int, int], None] | bool | None = None, *,
             quantum: float = DEFAULT_QUANTUM, rel_quantum: float = DEFAULT_REL_QUANTUM,
             max_events: int = DEFAULT_MAX_EVENTS) -> Any:
    from moesim.sim.analytic import custom_comm, layout_cost
    from moesim.sim.config import SimConfig
    from moesim.sim.result import SimResult

    config = config or SimConfig()
    G = int(topology.num_gpus)
    S, L, slots = np.asarray(workload.slot_tokens).shape
    if np.shape(workload.send_tokens)[-1] != G:
        raise MoesimError(f"workload is for {np.shape(workload.send_tokens)[-1]} GPUs but topology "
                          f"{topology.name!r} has {G}")
    if slots % G:
        raise MoesimError(f"{slots} slots per layer do not split over {G} GPUs")
    wl_layout = getattr(workload, "layout", config.layout)
    if wl_layout != config.layout:
        raise MoesimError(f"workload was built for layout {wl_layout!r}, config says {config.layout!r}")
    if max_events < 0:
        raise MoesimError("max_events must be >= 0")
    sends = np.asarray(workload.send_tokens)
    if sends.size and not (np.all(np.isfinite(sends)) and sends.min() >= 0):
        # checked once here: the lanes start their flows without per-call checks
        raise MoesimError("flow sizes must be finite and non-negative (the workload's send_tokens)")
    cost = layout_cost(cost, config.layout, G)
    if config.layout == "ep" and custom_comm(config):
        from moesim.sim.comm import effective_topology

        topology = effective_topology(topology, config.comm)  # the backend's achievable link bandwidths
    routes = _route_table(topology, G)
    # the DES only ever sends along these routes, so links that can never bind may be left out of the rates
    ignore = dominated_links(routes, topology.edge_bw)
    bw = np.asarray(topology.edge_bw, dtype=np.float64)
    lat = np.asarray(topology.edge_latency, dtype=np.float64)
    inter = np.asarray(topology.is_inter_node(), dtype=bool)
    intra = ~inter & ~np.eye(G, dtype=bool)
    M = 2 if getattr(config, "overlap_comm", False) else 1
    from moesim.sim.fixed import step_time as fixed_step_time

    fixed_time = fixed_step_time(getattr(config, "fixed", None), workload, model, topology.device)
    env = simpy.Environment()
    events: list[tuple[int, str, float, float]] = []
    dropped = recomputes = flows = 0
    step_time, dense_time = np.zeros(S), np.zeros(S)
    phase_time = np.zeros((S, L, len(PHASES)))
    gpu_busy, moe_time, gpu_finish = np.zeros((S, G)), np.zeros((S, G)), np.zeros((S, G))
    bytes_intra, bytes_inter = np.zeros(S), np.zeros(S)
    link_bytes = np.zeros(bw.size)
    prev_net = None
    for s in range(S):
        stages = step_stages(workload, s, topology, cost, model, config)
        # micro-batches: each does 1/M of the work and of the bytes (as the analytic engine assumes, the split
        # costs nothing extra; a re-costed half batch would read every expert's weights twice)
        lanes = [stages] if M == 1 else [[replace(st, data=st.data / M) for st in stages]] * M
        net = FlowNetwork(env, bw, lat, quantum=quantum, rel_quantum=rel_quantum, ignore_links=ignore)
        net.set_routes(routes, like=prev_net)  # (the route and class tables of the previous step, shared)
        prev_net = net
        run = _StepRun(env, lanes, routes, G, net, events, max_events)
        t_begin = env.now
        procs = [env.process(run.lane(g, m)) for m in range(M) for g in range(G)]
        env.run(until=env.all_of(procs))
        if fixed_time[s] > 0:  # the step's fixed costs (host launches, LM head, ...) follow its layers
            env.run(until=env.now + fixed_time[s])
        step_time[s] = env.now - t_begin
        gpu_finish[s] = run.end[:, -1, :].max(axis=0) - t_begin if run.K else 0.0
        dropped += run.dropped
        link_bytes += net.link_bytes
        recomputes += net.recomputations
        flows += net.num_flows
        for stages in lanes:
            for st in stages:
                if st.kind == "compute":
                    gpu_busy[s] += st.data
                    if st.slot == 3:
                        moe_time[s] += st.data
                else:
                    bytes_inter[s] += float(st.data[inter].sum())
                    bytes_intra[s] += float(st.data[intra].sum())
        phase_time[s], dense_time[s] = run.critical_path(L)
        if callable(progress):
            progress(s + 1, S)
    W = slots // G
    gpu_load = np.asarray(workload.slot_tokens, dtype=np.float64).reshape(S, L, G, W).sum(axis=(0, 3))
    extra = {"engine": "des", "events": events, "events_dropped": dropped, "dense_layer_time": dense_time,
             "fixed_time": fixed_time,
             "quantum": quantum, "rel_quantum": rel_quantum, "micro_batches": M, "flows": flows,
             "rate_recomputations": recomputes, "sim_events": _scheduled(env), "gpu_finish": gpu_finish}
    return SimResult(step_time=step_time, phase_time=phase_time, gpu_busy=gpu_busy, moe_time=moe_time,
                     bytes_intra=bytes_intra, bytes_inter=bytes_inter, link_bytes=link_bytes, gpu_load=gpu_load,
                     step_tokens=np.asarray(workload.step_tokens), phase=np.asarray(workload.phase),
                     first_step=int(workload.first_step), extra=extra)
