"""Discrete-event engine: one simpy process per GPU per step, flows on a max-min fair network.

What it models, per step and MoE layer, on every GPU ``g`` independently (no global barrier inside a step):

    dense (attention, norms) -> gate -> dispatch -> expert -> combine -> next layer

- *compute* phases take the cost model's time for that GPU's own work (``cost.dense_time``, ``cost.gate_time``
  of the tokens whose dense part it computes; ``cost.expert_time`` of its slots' token-choices);
- *exchange* phases start one flow to every peer it sends bytes to (routes from ``topology.route``), then wait
  until all of *its own* incoming flows of that exchange arrived: a GPU starts its experts as soon as its own
  inputs are in, so a slow GPU only delays the GPUs that wait on its bytes, and stragglers emerge from
  imbalance instead of being imposed by a barrier. Flows share links max-min fairly (:mod:`moesim.sim.network`).
- Steps run back to back: a step begins when every GPU finished the previous one (the scheduler forms the
  next batch only when the whole model step is done). The time of a step is that span.

Layouts (``SimConfig.layout``; bytes = tokens × ``model.token_bytes``):

- ``ep``: dispatch sends ``send_tokens[src, dst]`` (the workload's matrix; its diagonal stays local, no flow),
  combine sends the same amounts back (``send_tokens.T``).
- ``ep-tp-attn`` (vLLM's EP beside tensor-parallel attention): every rank holds all tokens, so the dispatch is
  the workload's matrix as well (the workload has it local: no flow where it is zero); attention's output is
  all-reduced and the experts' outputs are combined by a reduce-scatter + all-gather over all GPUs.
- ``tp``: every expert is sharded over all GPUs; attention and MoE outputs are all-reduced.

Collectives (all-reduce = reduce-scatter then all-gather) are modelled as *pairwise* flows: in each half every
GPU sends ``nbytes / G`` to every other GPU at once (what NCCL's all-to-all-like algorithms on a switched
fabric do). Each GPU moves ``(G-1)/G · nbytes`` per half, as a ring would; a ring would add ``G-1`` latencies
per half where this adds one. The analytic engine prices the same bytes, so the two engines agree when
nothing contends.

Reported per layer (``phase_time[s, l, :]``: dense, gate, dispatch, expert, combine): the step's *critical
path*, traced back from the GPU that finished last through the flows it waited on (a wait is charged from the
moment the awaited flow was sent, and the path continues on its sender), so the parts sum to the step time
exactly, as in the analytic engine, and show whose work and which transfers the step waited for.
``extra["events"]``: per-GPU timeline slices
``(gpu, name, start, end)`` for the Chrome trace (capped at ``max_events``; ``extra["events_dropped"]`` counts
the rest).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import simpy

from moesim.errors import MoesimError
from moesim.sim.network import FlowNetwork, dominated_links

PHASES = ("dense", "gate", "dispatch", "expert", "combine")
# Default bandwidth hand-over quantum (see FlowNetwork): 0.5 µs, half of one NVLink hop's latency
# (~1 µs, ASTRA-sim's HGX-H100 setting); measured +0.24 % step time vs exact on a 64-GPU DeepSeek-V3-like
# all-to-all (8 layers, 128 tokens per GPU), 11x fewer rate recomputations.
DEFAULT_QUANTUM = 5e-7
DEFAULT_MAX_EVENTS = 200_000


@dataclass
class _Phase:
    kind: str  # "compute" | "exchange"
    slot: int  # index into PHASES
    name: str  # timeline label
    data: np.ndarray  # compute: [L, G] seconds; exchange: [L, G, G] bytes (src, dst), diagonal ignored


def _route_table(topology: Any, G: int) -> np.ndarray:
    """[G*G, H] edge indices of every GPU pair's route, padded with -1."""
    routes = [list(topology.route(s, d)) if s != d else [] for s in range(G) for d in range(G)]
    H = max([len(r) for r in routes] + [1])
    table = np.full((G * G, H), -1, dtype=np.int64)
    for i, r in enumerate(routes):
        table[i, :len(r)] = r
    return table


def _allreduce(nbytes: np.ndarray, G: int) -> np.ndarray:
    """[L] bytes all-reduced -> [L, G, G] bytes of one pairwise half (reduce-scatter or all-gather)."""
    out = np.broadcast_to((nbytes / G)[:, None, None], (nbytes.size, G, G)).copy()
    idx = np.arange(G)
    out[:, idx, idx] = 0.0
    return out


def step_plan(workload: Any, s: int, cost: Any, model: Any, config: Any, G: int) -> list[_Phase]:
    """The phases every GPU runs in each layer of step ``s``, with their per-GPU costs and bytes."""
    layout = getattr(config, "layout", "ep")
    tb = float(model.token_bytes)
    gpu_tokens = np.asarray(workload.gpu_tokens[s], dtype=np.float64)  # [L, G]
    slot_tokens = np.asarray(workload.slot_tokens[s], dtype=np.float64)  # [L, slots]
    L = slot_tokens.shape[0]
    W = slot_tokens.shape[1] // G
    send = np.asarray(workload.send_tokens[s], dtype=np.float64) * tb  # [L, G, G]
    plan: list[_Phase] = []
    if getattr(config, "include_dense", True):
        if hasattr(cost, "attention_time"):  # attention and router separately (their sum is dense_time)
            ph = np.asarray(workload.phase[s])
            plan.append(_Phase("compute", 0, "attention",
                               np.asarray(cost.attention_time(gpu_tokens, ph), dtype=np.float64)))
            plan.append(_Phase("compute", 1, "gate", np.asarray(cost.gate_time(gpu_tokens), dtype=np.float64)))
        else:
            plan.append(_Phase("compute", 0, "dense", np.asarray(cost.dense_time(gpu_tokens), dtype=np.float64)))
    expert = np.asarray(cost.expert_time(slot_tokens.reshape(L, G, W)), dtype=np.float64)
    if layout == "ep":
        plan += [_Phase("exchange", 2, "dispatch", send),
                 _Phase("compute", 3, "expert", expert),
                 _Phase("exchange", 4, "combine", np.swapaxes(send, 1, 2))]
    elif layout in ("ep-tp-attn", "tp"):
        total = float(workload.step_tokens[s]) * tb * np.ones(L)
        half = _allreduce(total, G) if G > 1 else np.zeros((L, G, G))
        if getattr(config, "include_dense", True):
            plan += [_Phase("exchange", 0, "attn-reduce-scatter", half), _Phase("exchange", 0, "attn-all-gather", half)]
        if layout == "ep-tp-attn":
            plan.append(_Phase("exchange", 2, "dispatch", send))
        plan += [_Phase("compute", 3, "expert", expert),
                 _Phase("exchange", 4, "reduce-scatter", half), _Phase("exchange", 4, "all-gather", half)]
    else:
        raise MoesimError(f"unknown layout {layout!r}; known: ep, ep-tp-attn, tp")
    return plan


class _StepRun:
    """Simulates one step: G GPU processes over one FlowNetwork."""

    def __init__(self, env: simpy.Environment, plan: list[_Phase], routes: np.ndarray, G: int,
                 bw: np.ndarray, lat: np.ndarray, quantum: float, events: list, max_events: int,
                 rel_quantum: float = 0.0, ignore_links: np.ndarray | None = None) -> None:
        self.env, self.plan, self.routes, self.G = env, plan, routes, G
        self.net = FlowNetwork(env, bw, lat, quantum=quantum, rel_quantum=rel_quantum, ignore_links=ignore_links)
        L = plan[0].data.shape[0] if plan else 0
        self.L = L
        # per (phase, layer, gpu): start and end times
        self.start = np.zeros((len(plan), L, G))
        self.end = np.zeros((len(plan), L, G))
        self.events, self.max_events = events, max_events
        self.dropped = 0
        self.src: list[int] = []  # sending GPU of each flow id
        # one group per exchange phase, layer and receiving GPU, expecting its incoming flows
        self.group_ids: dict[int, np.ndarray] = {}
        self.group_events: dict[int, list[simpy.Event]] = {}
        off = ~np.eye(G, dtype=bool)
        for i, ph in enumerate(plan):
            if ph.kind == "exchange":
                counts = ((ph.data > 0) & off).sum(axis=1)  # [L, G] incoming flows per receiver
                gids, evs = self.net.group_many(counts.ravel())
                self.group_ids[i] = gids.reshape(L, G)
                self.group_events[i] = evs

    def gpu(self, g: int):
        env, G = self.env, self.G
        for layer in range(self.L):
            for i, ph in enumerate(self.plan):
                t0 = env.now
                self.start[i, layer, g] = t0
                if ph.kind == "compute":
                    dt = float(ph.data[layer, g])
                    if dt > 0:
                        yield env.timeout(dt)
                else:
                    row = ph.data[layer, g]
                    dst = np.flatnonzero(row > 0)
                    dst = dst[dst != g]
                    if dst.size:
                        self.net.transfer_many(self.routes[g * G + dst], row[dst], self.group_ids[i][layer, dst])
                        self.src.extend([g] * dst.size)
                    yield self.group_events[i][layer * G + g]
                t1 = env.now
                self.end[i, layer, g] = t1
                if t1 > t0:
                    if len(self.events) < self.max_events:
                        self.events.append((g, ph.name, t0, t1))
                    else:
                        self.dropped += 1


    def critical_path(self) -> np.ndarray:
        """[L, len(PHASES)] seconds of the step's critical path spent in each layer and phase.

        Walks back from the GPU that finished last: a compute phase, or a wait that ended without waiting on a
        flow, counts its own duration; a wait that ended when a flow arrived counts the flow's time in flight
        (from the moment its sender started it) and continues on the sender's timeline. The parts add up to
        the step time exactly.
        """
        P, L = len(self.plan), self.L
        per = np.zeros((L, len(PHASES)))
        if P == 0 or L == 0:
            return per
        g = int(self.end[P - 1, L - 1].argmax())
        t = float(self.end[P - 1, L - 1, g])
        for k in range(L * P - 1, -1, -1):
            layer, i = divmod(k, P)
            ph = self.plan[i]
            s0 = float(self.start[i, layer, g])
            if ph.kind == "exchange":
                f, arrival = self.net.group_last(int(self.group_ids[i][layer, g]))
                if f >= 0 and arrival > s0:
                    ts = float(self.net._start[f])  # the sender started it when it began this exchange
                    per[layer, ph.slot] += t - ts
                    g, t = self.src[f], ts
                    continue
            per[layer, ph.slot] += t - s0
            t = s0
        return per


def run_des(workload: Any, topology: Any, cost: Any, model: Any, config: Any,
            progress: Callable[[int, int], None] | bool | None = None, *,
            quantum: float = DEFAULT_QUANTUM, rel_quantum: float = 0.0,
            max_events: int = DEFAULT_MAX_EVENTS) -> Any:
    """Replay ``workload`` on ``topology`` event by event; returns a SimResult (same fields as the analytic one).

    ``progress``: a callable ``(steps_done, steps_total)``, or a truthy value for nothing (the caller's bar).
    ``quantum``: the flow network's bandwidth hand-over quantum in seconds (0 = exact, slower).
    """
    from moesim.sim.result import SimResult

    G = int(topology.num_gpus)
    S, L, slots = np.asarray(workload.slot_tokens).shape
    if slots % G:
        raise MoesimError(f"{slots} slots per layer do not split over {G} GPUs")
    send_shape = np.shape(workload.send_tokens)
    if send_shape[-2:] != (G, G):
        raise MoesimError(f"workload is for {send_shape[-1]} GPUs but topology {topology.name!r} has {G}")
    routes = _route_table(topology, G)
    # the DES only ever sends along these routes, so links that can never bind may be left out of the rates
    ignore = dominated_links([r[r >= 0] for r in routes], topology.edge_bw)
    bw = np.asarray(topology.edge_bw, dtype=np.float64)
    lat = np.asarray(topology.edge_latency, dtype=np.float64)
    inter = np.asarray(topology.is_inter_node(), dtype=bool)
    off = ~np.eye(G, dtype=bool)
    env = simpy.Environment()
    events: list[tuple[int, str, float, float]] = []
    dropped = 0
    step_time = np.zeros(S)
    phase_time = np.zeros((S, L, len(PHASES)))
    gpu_busy = np.zeros((S, G))
    moe_time = np.zeros((S, G))
    bytes_intra = np.zeros(S)
    bytes_inter = np.zeros(S)
    link_bytes = np.zeros(bw.size)
    gpu_finish = np.zeros((S, G))
    step_start = np.zeros(S)
    recomputes = 0
    flows = 0
    for s in range(S):
        plan = step_plan(workload, s, cost, model, config, G)
        run = _StepRun(env, plan, routes, G, bw, lat, quantum, events, max_events, rel_quantum, ignore)
        t_begin = env.now
        procs = [env.process(run.gpu(g)) for g in range(G)]
        env.run(until=env.all_of(procs))
        step_start[s] = t_begin
        step_time[s] = env.now - t_begin
        dropped += run.dropped
        link_bytes += run.net.link_bytes
        recomputes += run.net.recomputations
        flows += run.net.num_flows
        dur = run.end - run.start  # [P, L, G]
        for i, ph in enumerate(plan):
            if ph.kind == "compute":
                gpu_busy[s] += dur[i].sum(axis=0)
                if ph.slot == 3:
                    moe_time[s] += dur[i].sum(axis=0)
            else:
                b = np.where(off, ph.data, 0.0).sum(axis=0)  # [G, G]
                bytes_inter[s] += float(b[inter].sum())
                bytes_intra[s] += float(b[~inter & off].sum())
        if plan and L:
            gpu_finish[s] = run.end[-1, -1] - t_begin
            phase_time[s] = run.critical_path()
        if callable(progress):
            progress(s + 1, S)
    W = slots // G
    gpu_load = np.asarray(workload.slot_tokens, dtype=np.float64).reshape(S, L, G, W).sum(axis=(0, 3))
    extra = {"engine": "des", "events": events, "events_dropped": dropped, "quantum": quantum,
             "flows": flows, "rate_recomputations": recomputes, "gpu_finish": gpu_finish,
             "step_start": step_start}
    return SimResult(step_time=step_time, phase_time=phase_time, gpu_busy=gpu_busy, moe_time=moe_time,
                     bytes_intra=bytes_intra, bytes_inter=bytes_inter, link_bytes=link_bytes, gpu_load=gpu_load,
                     step_tokens=np.asarray(workload.step_tokens), phase=np.asarray(workload.phase),
                     first_step=int(workload.first_step), extra=extra)
