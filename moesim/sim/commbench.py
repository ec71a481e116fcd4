"""One dispatch + combine alone, driven as DeepEP's own tests drive it (``moesim comm``).

Every rank (GPU) holds ``tokens`` tokens; routing is drawn as in DeepEP's tests (:func:`moesim.sim.comm.draw_routing`:
group-limited top-k with one group per node for the normal kernels, plain top-k for the low-latency ones); experts
sit linearly, ``experts / G`` per GPU (DeepEP asserts ``num_experts % num_ranks == 0``). The exchange is priced by
either engine on a workload of one step and one MoE layer with no compute, so the times are the dispatch and
combine phases alone. Not modelled: DeepEP's tests also mask 10 random choices to -1 in the low-latency test
(<1 % of 1024 selections per rank).

Bandwidth as DeepEP reports it (bytes of one rank over its kernel time; here the mean over ranks over the engine's
phase time): normal kernels on one node count the tokens each rank *receives* de-duplicated per rank, own rank
included (``recv_x.numel()``, NVLink); across nodes the (token, node) pairs each rank *sends*, own node included
(``num_rdma_token_sent``, RDMA); low-latency counts every selection (``num_selections``) with its message bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from moesim.errors import MoesimError


@dataclass
class CommCase:
    """One drawn exchange, ready to price with any constants of its backend's kind."""

    topology: Any
    workload: Any
    model: Any
    config: Any
    per_rank: np.ndarray  # [G] messages per rank as DeepEP counts them for its bandwidth figure
    bw_kind: str
    info: dict[str, Any]


def prepare_comm(topology: Any, backend: Any = "hierarchical", tokens: int = 4096, hidden: int = 7168,
                 top_k: int = 8, experts: int = 256, topk_groups: int | None = None, dispatch_dtype: str = "fp8",
                 combine_dtype: str = "bf16", seed: int = 0) -> CommCase:
    """Draw the routing and build the one-step, one-layer workload (see the module docstring)."""
    from moesim.mapping import ExpertMapping
    from moesim.models import ModelSpec
    from moesim.replica import ReplicaPolicy
    from moesim.sim.comm import check_dtype, deepep_counts, draw_routing, get_backend
    from moesim.sim.config import SimConfig
    from moesim.sim.workload import workload_from_ids

    spec = get_backend(backend)
    check_dtype(dispatch_dtype, "dispatch")
    check_dtype(combine_dtype, "combine")
    G, P = int(topology.num_gpus), int(topology.gpus_per_node)
    N = G // P
    for name, v in (("tokens", tokens), ("hidden", hidden), ("top-k", top_k), ("experts", experts)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise MoesimError(f"--{name} must be a positive integer, got {v!r}")
    if experts % G:
        raise MoesimError(f"--experts {experts} must be a multiple of the {G} GPUs (DeepEP's requirement)")
    if top_k > experts:
        raise MoesimError(f"--top-k {top_k} exceeds --experts {experts}")
    groups = 1 if spec.per_choice else N
    if topk_groups is None:
        topk_groups = min(groups, 4)  # DeepEP test_internode.py: min(num_nodes, 4)
    if not isinstance(topk_groups, (int, np.integer)) or topk_groups < 1:
        raise MoesimError(f"--topk-groups must be a positive integer, got {topk_groups!r}")
    topk_groups = min(int(topk_groups), groups)  # more groups than nodes: every node may be used
    if topk_groups * (experts // groups) < top_k:
        raise MoesimError(f"--topk-groups {topk_groups} of {experts // groups} experts each hold fewer than "
                          f"--top-k {top_k} experts")
    if G * tokens * top_k > 2**27:
        raise MoesimError(f"{G} GPUs × {tokens} tokens × top-{top_k} is too large for one exchange (max 2^27 "
                          "choices)")
    rng = np.random.default_rng(seed)
    ids = np.concatenate([draw_routing(rng, tokens, experts, top_k, groups, topk_groups) for _ in range(G)])
    model = ModelSpec("comm", num_layers=1, num_experts=experts, top_k=top_k, hidden_size=hidden, ffn_size=1)
    config = SimConfig(policy=ReplicaPolicy("round_robin", P), include_dense=False, dense_layers=False,
                       comm=spec, dispatch_dtype=dispatch_dtype, combine_dtype=combine_dtype)
    mapping = ExpertMapping.linear(1, experts, G)
    wl = workload_from_ids(ids[None], np.array([G * tokens]), mapping, config)
    wl = replace(wl, slot_tokens=np.zeros_like(wl.slot_tokens))  # the exchange alone: no expert compute
    counts = deepep_counts(ids, np.arange(experts) // (experts // G), P, G)
    if spec.per_choice:
        per_rank, kind = counts["selections"], "RDMA" if N > 1 else "NVLink"
    elif N > 1:
        per_rank, kind = counts["rdma_send"], "RDMA"
    else:
        per_rank, kind = counts["rank_recv"], "NVLink"
    info = {"ep": G, "nodes": N, "tokens_per_rank": tokens, "hidden": hidden, "top_k": top_k, "experts": experts,
            "topk_groups": topk_groups, "dispatch_dtype": dispatch_dtype, "combine_dtype": combine_dtype,
            "seed": seed}
    return CommCase(topology, wl, model, config, per_rank, kind, info)


def price_comm(case: CommCase, spec: Any = None, engine: str = "analytic") -> dict[str, Any]:
    """Dispatch and combine time and bandwidth of ``case`` under ``spec`` (default: the case's backend)."""
    from moesim.cost import CostModel
    from moesim.sim import simulate
    from moesim.sim.comm import get_backend, message_bytes

    config = case.config if spec is None else replace(case.config, comm=get_backend(spec))
    b = get_backend(config.comm)
    cost = CostModel.roofline(case.model, case.topology.device)
    res = simulate(case.workload, case.topology, None, cost, case.model, config, engine=engine)
    t_d, t_c = float(res.phase_time[0, 0, 2]), float(res.phase_time[0, 0, 4])
    d_b, c_b = message_bytes(case.model, config)
    msgs = float(case.per_rank.mean())
    return {"backend": b.name, "engine": engine, **case.info, "dispatch_us": t_d * 1e6, "combine_us": t_c * 1e6,
            "dispatch_bw_gbs": msgs * d_b / t_d / 1e9 if t_d > 0 else float("inf"),
            "combine_bw_gbs": msgs * c_b / t_c / 1e9 if t_c > 0 else float("inf"),
            "bw_kind": case.bw_kind, "messages_per_rank": msgs, "dispatch_message_bytes": d_b,
            "combine_message_bytes": c_b, "bytes_intra": float(res.bytes_intra.sum()),
            "bytes_inter": float(res.bytes_inter.sum()), "backend_constants": b.to_dict()}


def run_comm(topology: Any, backend: Any = "hierarchical", engine: str = "analytic", **kw: Any) -> dict[str, Any]:
    """Dispatch and combine time and DeepEP's bottleneck bandwidth for one exchange (see the module docstring)."""
    return price_comm(prepare_comm(topology, backend, **kw), engine=engine)
