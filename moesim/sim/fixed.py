"""Fixed costs of a serving step that no byte or FLOP count explains: collective latency, host launch overhead,
LM head + sampling, and whatever a live run measured beyond the simulated layers.

Charged by both engines the same way (``SimConfig.fixed``; None charges nothing, the original behaviour):

- **per collective** (:func:`allreduce_latency`, :func:`alltoall_latency`): NCCL's own latency model
  (``src/graph/tuning.cc``, NCCL 2.19–2.21: ``baseLat`` and ``hwLat`` for the LL protocol, µs):
  ring all-reduce ``6.6 + 2(n-1) × 0.6`` inside an NVLink node; tree all-reduce across nodes
  ``6.8 + 2 × ((ranks per node - 1) × 0.6 + log2(nodes) × 5.0)`` (NCCL picks the faster). On 2 × 8 H100 this gives
  25.2 µs, what NCCL itself prints for a 128-byte all-reduce there (NCCL_DEBUG=INFO "128 Bytes -> Algo 0 proto 0
  time 25.21", NVIDIA/nccl issue #1453). An all-to-all (send/recv in a group) pays the base latency plus one hop:
  ``6.6 + 0.6`` µs on NVLink, ``6.6 + 2.7`` (ring LL network hop) across nodes. Backends with a fitted kernel
  latency of their own (DeepEP low-latency) are not charged it twice.
- **per step, host**: eager execution pays ``launches per layer × (MoE + dense layers) × host seconds per launch``
  (DESIGN.md: eager frameworks spend ~5–20 µs of host time per launch; 10 µs is charged by default);
  a CUDA graph replays the whole step in one launch (``graph_launch``). Charged as not hidden behind GPU work.
- **per step, LM head and sampling**: the LM head GEMM ``tokens × hidden × vocab`` on every GPU's own tokens, at
  the device roofline (``2·T·H·V`` FLOPs at ``mfu``·peak vs ``H·V·bytes`` of weights at ``mbu``·HBM), plus a fixed
  ``sampling`` time.
- **per step, fitted**: ``step_overhead`` ``{phase: (a, b)}`` = ``a + b·tokens`` seconds: what ``moesim validate``
  fits as the residual of a live run (:func:`moesim.calibration.fit_overhead`); :func:`from_overhead` turns that
  fit into a FixedCosts, so a run's calibration travels to ``moesim replay --fixed FILE.json``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from moesim.errors import MoesimError

# NCCL src/graph/tuning.cc (2.19+), LL protocol, µs
NCCL_BASE_LAT_RING_LL = 6.6
NCCL_BASE_LAT_TREE_LL = 6.8
NCCL_HW_LAT_NVLINK_LL = 0.6
NCCL_HW_LAT_NET_TREE_LL = 5.0
NCCL_HW_LAT_NET_RING_LL = 2.7
EAGER_HOST_PER_LAUNCH = 10e-6  # s; DESIGN.md "~5–20 µs of host time per kernel launch"
GRAPH_LAUNCH = 10e-6  # s to replay a captured CUDA graph (one launch per step)
# kernels per MoE layer in an eager step: 2 RMSNorms, QKV GEMM, rotary, attention, O GEMM, gate GEMM, top-k,
# align/sort, 2 grouped GEMMs, SiLU-and-mul, un-permute/sum, dispatch and combine (vLLM's fused_moe path)
LAUNCHES_PER_LAYER = 15
PHASE_NAMES = {0: "decode", 1: "prefill"}


@dataclass(frozen=True)
class FixedCosts:
    """What a step pays besides its layers' work (see the module docstring); all seconds."""

    collectives: bool = True  # charge NCCL's per-collective latency
    cuda_graph: bool = True  # True: one graph launch per step; False: eager host launches
    host_per_launch: float = EAGER_HOST_PER_LAUNCH
    launches_per_layer: int = LAUNCHES_PER_LAYER
    graph_launch: float = GRAPH_LAUNCH
    lm_head: bool = True
    mfu: float = 0.6
    mbu: float = 0.8
    sampling: float = 0.0
    step_overhead: dict[str, tuple[float, float]] = field(default_factory=dict)  # phase -> (a s, b s/token)

    def __post_init__(self) -> None:
        for name in ("host_per_launch", "graph_launch", "sampling"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise MoesimError(f"fixed costs: {name} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.launches_per_layer, int) or self.launches_per_layer < 0:
            raise MoesimError(f"fixed costs: launches_per_layer must be an integer >= 0, got "
                              f"{self.launches_per_layer!r}")
        for name in ("mfu", "mbu"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise MoesimError(f"fixed costs: {name} must be in (0, 1], got {v!r}")
        for k, v in self.step_overhead.items():
            if (not isinstance(k, str) or not isinstance(v, (list, tuple)) or len(v) != 2
                    or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)):
                raise MoesimError(f"fixed costs: step_overhead[{k!r}] must be a pair of finite numbers (a, b)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["step_overhead"] = {k: list(v) for k, v in self.step_overhead.items()}
        return {"format": "moesim.fixed_costs", "version": 1, **d}

    @classmethod
    def from_dict(cls, data: Any) -> FixedCosts:
        if not isinstance(data, dict) or data.get("format") != "moesim.fixed_costs":
            raise MoesimError("fixed costs JSON must be an object with format 'moesim.fixed_costs'")
        known = {f.name for f in fields(cls)}
        body = {k: v for k, v in data.items() if k not in ("format", "version")}
        unknown = sorted(set(body) - known)
        if unknown:
            raise MoesimError(f"fixed costs JSON has unknown fields: {', '.join(unknown)}")
        so = body.get("step_overhead", {})
        if not isinstance(so, dict):
            raise MoesimError("fixed costs: step_overhead must be an object {phase: [a, b]}")
        body["step_overhead"] = {k: tuple(v) if isinstance(v, list) else v for k, v in so.items()}
        return cls(**body)


PRESETS: dict[str, FixedCosts | None] = {
    "none": None,
    "graph": FixedCosts(cuda_graph=True),
    "eager": FixedCosts(cuda_graph=False),
}


def from_overhead(overhead: Any, *, collectives: bool = False, lm_head: bool = False,
                  cuda_graph: bool = True, graph_launch: float = 0.0) -> FixedCosts:
    """A :class:`moesim.calibration.OverheadFit` (validate's fitted per-step residual) as FixedCosts: the fit
    already holds launches, LM head and sampling of that run, so nothing else is charged on top by default."""
    return FixedCosts(collectives=collectives, cuda_graph=cuda_graph, graph_launch=graph_launch, lm_head=lm_head,
                      step_overhead={k: (float(v[0]), float(v[1])) for k, v in overhead.coef.items()})


def load_fixed(spec: str | None) -> FixedCosts | None:
    """``none`` | ``graph`` | ``eager`` | a fixed-costs JSON file (``moesim validate`` writes one)."""
    if spec is None or spec in PRESETS:
        return PRESETS.get(spec or "none")
    from pathlib import Path

    from moesim.io import read_json

    if not Path(spec).is_file():
        raise MoesimError(f"--fixed {spec!r}: not none, graph, eager or an existing fixed-costs JSON file")
    return FixedCosts.from_dict(read_json(Path(spec), "fixed costs"))


# -- per collective ---------------------------------------------------------------------------------------------
def allreduce_latency(num_gpus: int, gpus_per_node: int) -> float:
    """Seconds of NCCL's latency term for one all-reduce over ``num_gpus`` (LL protocol, faster of ring/tree)."""
    G, P = int(num_gpus), int(gpus_per_node)
    if G <= 1:
        return 0.0
    nodes = max(1, G // P)
    if nodes == 1:
        return (NCCL_BASE_LAT_RING_LL + 2 * (G - 1) * NCCL_HW_LAT_NVLINK_LL) * 1e-6
    ring = NCCL_BASE_LAT_RING_LL + 2 * nodes * (P - 1) * NCCL_HW_LAT_NVLINK_LL \
        + 2 * (nodes - 1) * NCCL_HW_LAT_NET_RING_LL
    tree = NCCL_BASE_LAT_TREE_LL + 2 * ((P - 1) * NCCL_HW_LAT_NVLINK_LL
                                        + math.floor(math.log2(nodes)) * NCCL_HW_LAT_NET_TREE_LL)
    return min(ring, tree) * 1e-6


def alltoall_latency(num_gpus: int, gpus_per_node: int) -> float:
    """Seconds of latency of one grouped send/recv all-to-all: NCCL's base latency plus one hop."""
    if num_gpus <= 1:
        return 0.0
    hop = NCCL_HW_LAT_NVLINK_LL if num_gpus <= gpus_per_node else NCCL_HW_LAT_NET_RING_LL
    return (NCCL_BASE_LAT_RING_LL + hop) * 1e-6


def exchange_latency(config: Any, num_gpus: int, gpus_per_node: int) -> tuple[float, float]:
    """(dispatch, combine) fixed seconds of the ep exchanges: the backend's kernel latency, or, for backends
    without one, NCCL's all-to-all latency when ``config.fixed`` charges collectives."""
    from moesim.sim.comm import kernel_latency

    d, c = kernel_latency(config)
    fixed = getattr(config, "fixed", None)
    if fixed is not None and fixed.collectives and d == 0 and c == 0:
        lat = alltoall_latency(num_gpus, gpus_per_node)
        return lat, lat
    return d, c


def collective_latency(config: Any, num_gpus: int, gpus_per_node: int) -> float:
    """Fixed seconds per all-reduce of the TP layouts (0 unless ``config.fixed`` charges collectives)."""
    fixed = getattr(config, "fixed", None)
    if fixed is None or not fixed.collectives:
        return 0.0
    return allreduce_latency(num_gpus, gpus_per_node)


# -- per step ---------------------------------------------------------------------------------------------------
def step_time(fixed: FixedCosts | None, workload: Any, model: Any, device: Any) -> np.ndarray:
    """[S] seconds each step pays besides its layers (host launches, LM head, sampling, fitted overhead)."""
    S = workload.num_steps
    out = np.zeros(S)
    if fixed is None or S == 0:
        return out
    layers = int(model.num_layers) + int(getattr(model, "num_dense_layers", 0) or 0)
    if fixed.cuda_graph:
        out += fixed.graph_launch
    else:
        out += layers * fixed.launches_per_layer * fixed.host_per_launch
    if fixed.lm_head:
        tok = np.asarray(workload.gpu_tokens[:, 0, :], dtype=float)  # [S, G] tokens whose logits each GPU computes
        H, V = float(model.hidden_size), float(model.vocab_size)
        flops = 2.0 * tok * H * V / (fixed.mfu * device.peak_flops)
        weights = H * V * float(model.bytes_per_param) / (fixed.mbu * device.hbm_bw)
        out += np.where(tok > 0, np.maximum(flops, weights) + device.kernel_launch, 0.0).max(axis=1)
    out += fixed.sampling
    if fixed.step_overhead:
        tokens = np.asarray(workload.step_tokens, dtype=float)
        ph = np.asarray(workload.phase)
        for s in range(S):
            a, b = fixed.step_overhead.get(PHASE_NAMES.get(int(ph[s]), "all"),
                                           fixed.step_overhead.get("all", (0.0, 0.0)))
            out[s] += a + b * tokens[s]
    return out
