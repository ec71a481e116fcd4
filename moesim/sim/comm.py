"""All-to-all backends: what a dispatch (and its combine) puts on which link, per backend, for both engines.

A backend turns the workload's token counts into the bytes every (source GPU, destination GPU) pair sends in one
exchange; both engines price those bytes on the same topology (the analytic engine's busiest link, the DES's
max-min fair flows), so they keep agreeing where nothing contends. A GPU's copy to itself is never sent.

- ``flat`` (the simulator's original model): a token goes once to every destination *GPU* that holds one of its
  experts (``Workload.send_tokens``), along the topology's route (``rail-pxn`` on presets: NVLink to the
  same-rail GPU, then that GPU's NIC).
- ``hierarchical`` (DeepEP's normal kernels, ``csrc/kernels/internode.cu``; README "Normal kernels with NVLink
  and RDMA forwarding"): a token goes once per destination *node* over RDMA, from its GPU to the GPU of the same
  rail (local rank) in that node, which forwards it over NVLink to each GPU of the node that needs it; inside
  the token's own node it goes over NVLink directly. Both stages stream chunk by chunk, so they run at once:
  the exchange is priced as the two stages' bytes in flight together (the busiest link of either decides).
- ``low-latency`` (DeepEP's low-latency kernels, ``csrc/kernels/internode_ll.cu``; README "Low-latency kernels
  with pure RDMA"): one message per (token, expert) — no de-duplication — straight to the expert's GPU, over
  NVLink inside a node (DeepEP's default ``allow_nvlink_for_low_latency_mode``) and RDMA between nodes, plus a
  fixed per-kernel latency (one kernel per dispatch and per combine; CUDA-graph friendly, no host sync).

Each backend also has achievable-bandwidth efficiencies for its NVLink and InfiniBand links (DeepEP reaches
~153–158 GB/s of H800's 160 GB/s NVLink; small per-expert RDMA messages reach less of a NIC than large chunks).
They scale the bandwidth of the topology's ``nvlink`` / ``ib`` edges (:func:`effective_topology`), so reported
bytes stay the bytes really sent. The constants are fitted by ``studies/fidelity/run.py --calibrate`` on the
DeepEP rows named there (intranode EP8, internode EP16, low-latency EP8/EP16) and nowhere else.

Precisions (:func:`wire_bytes`): ``bf16`` 2 bytes per value; ``fp8`` 1 byte per value plus one fp32 scale per
128 values (DeepEP ``per_token_cast_to_fp8``; its tests count ``(1 + 4/128) / 2`` of the BF16 bytes);
``fp32`` 4 bytes. Low-latency dispatch messages carry a 16-byte header on top (DeepEP ``test_low_latency.py``:
``hidden + hidden / 128 * 4 + 16``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.errors import MoesimError

BACKENDS = ("flat", "hierarchical", "low-latency")
DTYPES = ("bf16", "fp8", "fp32")
FP8_SCALE_BLOCK = 128  # values per fp32 scale (DeepEP per_token_cast_to_fp8, DeepSeek-V3 report §3.3.2)
FP8_SCALE_BYTES = 4
LL_HEADER_BYTES = 16  # per low-latency dispatch message (DeepEP tests/test_low_latency.py num_fp8_bytes)


@dataclass(frozen=True)
class BackendSpec:
    """One all-to-all backend's semantics and constants (see the module docstring)."""

    name: str
    per_node: bool  # once per destination node over RDMA, then NVLink forwarding (DeepEP normal)
    per_choice: bool  # one message per (token, expert), no de-duplication (DeepEP low-latency)
    nvlink_eff: float = 1.0  # achievable fraction of the NVLink edges' bandwidth
    rdma_eff: float = 1.0  # achievable fraction of the InfiniBand edges' bandwidth
    dispatch_latency: float = 0.0  # s, fixed per dispatch kernel
    combine_latency: float = 0.0  # s, fixed per combine kernel
    header_bytes: float = 0.0  # per dispatched message, on top of the hidden state
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "per_node": self.per_node, "per_choice": self.per_choice,
                "nvlink_eff": self.nvlink_eff, "rdma_eff": self.rdma_eff,
                "dispatch_latency_s": self.dispatch_latency, "combine_latency_s": self.combine_latency,
                "header_bytes": self.header_bytes, "source": self.source}


# Calibrated constants: `python studies/fidelity/run.py` refits and prints these (least squares on relative error
# over the calibration rows only: DeepEP docs/legacy.md (README before V2), H800 + CX7 400 Gb/s, "Normal kernels"
# intranode EP8 153/158 GB/s and internode EP16 43/43 GB/s; "Low-latency kernels" EP8 77/114 µs and EP16
# 118/195 µs). Four free constants: the normal kernels' NVLink efficiency (0.813), one achievable RDMA fraction of
# the 50 GB/s NIC shared by both kernel kinds (0.968) and the low-latency dispatch / combine kernel latencies
# (31.3 / 29.2 µs). Every other row of those tables is held out (studies/fidelity/README.md).
BACKEND_PRESETS: dict[str, BackendSpec] = {
    "flat": BackendSpec("flat", per_node=False, per_choice=False,
                        source="the simulator's original all-to-all: once per destination GPU, full link bandwidth"),
    "hierarchical": BackendSpec("hierarchical", per_node=True, per_choice=False,
                                nvlink_eff=0.813, rdma_eff=0.968, dispatch_latency=0.0, combine_latency=0.0,
                                source="DeepEP normal kernels; efficiencies fitted on DeepEP README intranode "
                                       "EP8 and internode EP16 (studies/fidelity)"),
    "low-latency": BackendSpec("low-latency", per_node=False, per_choice=True,
                               nvlink_eff=1.0, rdma_eff=0.968, dispatch_latency=31.3e-6, combine_latency=29.2e-6,
                               header_bytes=LL_HEADER_BYTES,
                               source="DeepEP low-latency kernels; latencies and RDMA efficiency fitted on "
                                      "DeepEP README low-latency EP8 and EP16 (studies/fidelity)"),
}


def get_backend(name: str | BackendSpec) -> BackendSpec:
    if isinstance(name, BackendSpec):
        return name
    if name not in BACKEND_PRESETS:
        raise MoesimError(f"unknown all-to-all backend {name!r}; known: {', '.join(BACKENDS)}")
    return BACKEND_PRESETS[name]


def wire_bytes(hidden: int, dtype: str) -> float:
    """Bytes of one token's hidden state of ``hidden`` values in ``dtype`` (fp8: with its fp32 block scales)."""
    if dtype == "bf16":
        return 2.0 * hidden
    if dtype == "fp8":
        return float(hidden + math.ceil(hidden / FP8_SCALE_BLOCK) * FP8_SCALE_BYTES)
    if dtype == "fp32":
        return 4.0 * hidden
    raise MoesimError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")


def check_dtype(dtype: str | None, what: str) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise MoesimError(f"unknown {what} dtype {dtype!r}; known: {', '.join(DTYPES)}")


def message_bytes(model: Any, config: Any) -> tuple[float, float]:
    """(dispatch, combine) bytes per message: the config's dtypes (None: ``model.token_bytes``) + headers."""
    backend = get_backend(getattr(config, "comm", "flat"))
    d_dt, c_dt = getattr(config, "dispatch_dtype", None), getattr(config, "combine_dtype", None)
    d = float(model.token_bytes) if d_dt is None else wire_bytes(model.hidden_size, d_dt)
    c = float(model.token_bytes) if c_dt is None else wire_bytes(model.hidden_size, c_dt)
    return d + backend.header_bytes, c


# -- per-token counts (the workload builder calls these) -----------------------------------------------------------
def node_tokens_from_dst(dst: np.ndarray, gpus_per_node: int) -> np.ndarray:
    """dst [k, T] destination GPU of each choice -> [k, T] bool: True where the choice is the first of its token
    to land on its node (the choices a per-node de-duplicated dispatch sends over RDMA)."""
    node = dst // gpus_per_node
    first = np.ones(node.shape, dtype=bool)
    for j in range(1, node.shape[0]):
        for i in range(j):
            first[j] &= node[i] != node[j]
    return first


def node_tokens_estimate(choices: np.ndarray, tokens: np.ndarray, top_k: int, gpus_per_node: int) -> np.ndarray:
    """Load-only workloads: choices [S, L, G] each GPU computes, tokens [S] -> [S, L, N] tokens per destination
    node, as if a token's ``top_k`` choices fell independently (``T·(1-(1-p)^k)``, p = the node's share)."""
    S, L, G = choices.shape
    per_node = choices.reshape(S, L, G // gpus_per_node, gpus_per_node).sum(axis=3)
    T = np.asarray(tokens, dtype=float)[:, None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.clip(np.where(T > 0, per_node / np.maximum(T * top_k, 1e-300), 0.0), 0.0, 1.0)
    return np.minimum(T * (1.0 - (1.0 - p) ** top_k), per_node)


# -- traffic of one exchange ---------------------------------------------------------------------------------------
def hierarchical_tokens(send: np.ndarray, node_tokens: np.ndarray, gpus_per_node: int) -> np.ndarray:
    """Per-pair tokens of DeepEP's two streamed stages, summed: send [..., G, G] tokens per (origin, destination
    GPU) de-duplicated per GPU, node_tokens [..., G, N] tokens per (origin, destination node) -> [..., G, G].

    RDMA stage: origin ``o`` -> GPU ``n·P + rail(o)`` for every other node ``n`` it has tokens for
    (``node_tokens[o, n]``). NVLink stage: GPU ``f`` forwards to ``d`` (same node, ``d != f``) every token of the
    origins on its rail that ``d`` needs: ``Σ_{o: rail(o) = rail(f)} send[o, d]`` (its own tokens included).
    Diagonal: 0 (nothing leaves a GPU for itself).
    """
    send = np.asarray(send, dtype=float)
    node_tokens = np.asarray(node_tokens, dtype=float)
    lead = send.shape[:-2]
    G = send.shape[-1]
    P = int(gpus_per_node)
    if G % P:
        raise MoesimError(f"{G} GPUs do not split into nodes of {P}")
    N = G // P
    out = np.zeros(lead + (G, G))
    r, n, j = (a.ravel() for a in np.meshgrid(np.arange(P), np.arange(N), np.arange(P), indexing="ij"))
    # NVLink stage: forwarder (node n, rail r) -> (node n, rail j), the origins of rail r summed over their nodes
    fwd = send.reshape(lead + (N, P, N, P)).sum(axis=-4)  # [..., r, n, j]
    out[..., n * P + r, n * P + j] = fwd[..., r, n, j]
    # RDMA stage: (origin node m, rail r) -> (node n, rail r) for n != m
    m, r2, n2 = (a.ravel() for a in np.meshgrid(np.arange(N), np.arange(P), np.arange(N), indexing="ij"))
    other = m != n2
    m, r2, n2 = m[other], r2[other], n2[other]
    out[..., m * P + r2, n2 * P + r2] += node_tokens.reshape(lead + (N, P, N))[..., m, r2, n2]
    idx = np.arange(G)
    out[..., idx, idx] = 0.0
    return out


def exchange_tokens(send: np.ndarray, node_tokens: np.ndarray | None, backend: BackendSpec,
                    gpus_per_node: int) -> np.ndarray:
    """[..., G, G] messages per (source, destination) pair of one dispatch under ``backend`` (diagonal 0).

    ``send``: the workload's ``send_tokens`` (de-duplicated per GPU; per choice for ``low-latency``, whose
    workload is built without de-duplication).
    """
    if backend.per_node:
        if node_tokens is None:
            raise MoesimError("the hierarchical backend needs the workload's per-node token counts "
                              "(build it with SimConfig(comm='hierarchical'))")
        return hierarchical_tokens(send, node_tokens, gpus_per_node)
    out = np.array(send, dtype=float)
    idx = np.arange(out.shape[-1])
    out[..., idx, idx] = 0.0
    return out


def exchange_bytes(workload: Any, model: Any, config: Any, gpus_per_node: int) -> tuple[np.ndarray, np.ndarray]:
    """(dispatch, combine) bytes [S, L, G, G] (src, dst) of the workload's exchanges under ``config.comm``;
    the combine sends each dispatched message back (the transpose) in the combine dtype."""
    backend = get_backend(getattr(config, "comm", "flat"))
    tok = exchange_tokens(workload.send_tokens, getattr(workload, "node_tokens", None), backend, gpus_per_node)
    d, c = message_bytes(model, config)
    return tok * d, np.swapaxes(tok, -1, -2) * c


def kernel_latency(config: Any) -> tuple[float, float]:
    """(dispatch, combine) fixed seconds per exchange of the config's backend."""
    b = get_backend(getattr(config, "comm", "flat"))
    return b.dispatch_latency, b.combine_latency


def effective_topology(topology: Any, backend: str | BackendSpec) -> Any:
    """``topology`` with its ``nvlink`` / ``ib`` edges at the backend's achievable fraction (cached per backend;
    the topology itself when both efficiencies are 1)."""
    b = get_backend(backend)
    if b.nvlink_eff == 1.0 and b.rdma_eff == 1.0:
        return topology
    cache = topology.__dict__.setdefault("_comm_eff", {})
    key = (b.nvlink_eff, b.rdma_eff)
    if key in cache:
        return cache[key]
    from moesim.topo.graph import Topology

    g = topology.graph.copy()
    for _u, _v, attrs in g.edges(data=True):
        kind = attrs.get("kind")
        if kind == "nvlink":
            attrs["bandwidth"] = float(attrs["bandwidth"]) * b.nvlink_eff
        elif kind == "ib":
            attrs["bandwidth"] = float(attrs["bandwidth"]) * b.rdma_eff
    eff = Topology(g, topology.name, topology.device, gpus_per_node=topology.gpus_per_node,
                   routing=topology.routing, source=topology.source)
    cache[key] = eff
    return eff


# -- DeepEP's routing draw and bandwidth figures ----------------------------------------------------------------------
def draw_routing(rng: np.random.Generator, num_tokens: int, num_experts: int, top_k: int, num_groups: int = 1,
                 topk_groups: int = 1) -> np.ndarray:
    """[T, k] expert ids drawn as DeepEP's tests draw them (tests/legacy/test_internode.py, test_intranode.py):
    scores ``|N(0,1)| + 1`` per (token, expert); with ``num_groups > 1`` each token keeps the ``topk_groups``
    groups (nodes) of highest max score and takes its top-k experts among them."""
    scores = np.abs(rng.standard_normal((num_tokens, num_experts), dtype=np.float32)) + 1.0
    if num_groups > 1 and topk_groups < num_groups:
        gmax = scores.reshape(num_tokens, num_groups, -1).max(axis=2)
        keep = np.argpartition(-gmax, topk_groups - 1, axis=1)[:, :topk_groups]
        mask = np.zeros((num_tokens, num_groups), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=1)
        scores = (scores.reshape(num_tokens, num_groups, -1) * mask[:, :, None]).reshape(num_tokens, num_experts)
    return np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k].astype(np.int64)


def deepep_counts(ids: np.ndarray, expert_gpu: np.ndarray, gpus_per_node: int, num_gpus: int
                  ) -> dict[str, np.ndarray]:
    """Per-rank message counts as DeepEP's tests count them, own rank and own node included.

    ids [T, k] choices of all ranks' tokens (rank-major, T/G each), expert_gpu [E] -> ``rank_recv`` [G] tokens each
    rank receives de-duplicated per rank (``recv_x.numel()`` in test_intranode/test_internode), ``rdma_send`` [G]
    (token, node) pairs each rank sends (``num_rdma_token_sent``), ``selections`` [G] choices each rank sends
    (test_low_latency ``num_selections``).
    """
    T, k = ids.shape
    G = int(num_gpus)
    origin = np.arange(T) * G // T
    dst = expert_gpu[ids]  # [T, k]
    node = dst // gpus_per_node
    first_gpu = np.ones((T, k), dtype=bool)
    first_node = np.ones((T, k), dtype=bool)
    for j in range(1, k):
        first_gpu[:, j] = ~(dst[:, :j] == dst[:, j:j + 1]).any(axis=1)
        first_node[:, j] = ~(node[:, :j] == node[:, j:j + 1]).any(axis=1)
    recv = np.bincount(dst[first_gpu], minlength=G).astype(float)
    rdma = np.bincount(np.broadcast_to(origin[:, None], (T, k))[first_node], minlength=G).astype(float)
    sel = np.bincount(origin, minlength=G).astype(float) * k
    return {"rank_recv": recv, "rdma_send": rdma, "selections": sel}
