"""Simulation settings shared by both engines: parallel layout, replica policy and what is charged.

Layouts (``layout``), so EP and TP can be compared on the same trace:

- ``ep``: expert parallelism with data-parallel attention (DeepSeek, SGLang): each token's attention runs on
  its origin rank; its hidden state goes by all-to-all to the GPUs holding its chosen experts (dispatch) and
  the outputs come back the same way (combine).
- ``ep-tp-attn``: expert parallelism beside tensor-parallel attention (vLLM's default way to run Mixtral with
  EP): every rank sees every token, computes its own experts' share of all tokens, and the outputs are
  combined by a reduce-scatter + all-gather; attention is sharded over all GPUs and all-reduced.
- ``tp``: plain tensor-parallel MoE: every expert's FFN is sharded over all GPUs (ffn/G each), attention too;
  both outputs are all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moesim.errors import MoesimError
from moesim.replica import ReplicaPolicy

LAYOUTS = ("ep", "ep-tp-attn", "tp")


@dataclass
class SimConfig:
    """What to simulate; the same object drives the workload builder and both engines."""

    layout: str = "ep"
    policy: ReplicaPolicy = field(default_factory=ReplicaPolicy)
    # dispatch sends a token once per destination GPU (DeepEP) instead of once per chosen expert
    dedup: bool = True
    # charge attention/norms/gate (the non-MoE part of each MoE layer)
    include_dense: bool = True
    # overlap communication with compute (two micro-batches, DeepSeek's decode/prefill overlap): a layer takes
    # max(compute, communication) instead of their sum — an optimistic bound
    overlap_comm: bool = False
    # charge model.num_dense_layers dense layers (attention + dense FFN) per step (DeepSeek-V3's first 3)
    dense_layers: bool = True
    # all-to-all backend of the ep dispatch/combine (moesim.sim.comm): flat | hierarchical | low-latency;
    # low-latency sends one message per (token, expert), so it builds its workload without de-duplication;
    # hierarchical always de-duplicates (once per node over RDMA, once per GPU over NVLink)
    comm: Any = "flat"  # a name of moesim.sim.comm.BACKENDS or a BackendSpec (other constants)
    # wire precision of dispatch and combine (bf16 | fp8 | fp32; None: the model's token_bytes)
    dispatch_dtype: str | None = None
    combine_dtype: str | None = None
    # fixed costs (moesim.sim.fixed.FixedCosts): collective latency, host launches, LM head, sampling, fitted
    # per-step overhead; None charges none of them
    fixed: Any = None

    def __post_init__(self) -> None:
        from moesim.sim.comm import BACKENDS, check_dtype

        if self.layout not in LAYOUTS:
            raise MoesimError(f"unknown layout {self.layout!r}; known: {', '.join(LAYOUTS)}")
        from moesim.sim.comm import BackendSpec

        if not isinstance(self.comm, BackendSpec) and self.comm not in BACKENDS:
            raise MoesimError(f"unknown all-to-all backend {self.comm!r}; known: {', '.join(BACKENDS)}")
        check_dtype(self.dispatch_dtype, "dispatch")
        check_dtype(self.combine_dtype, "combine")
        from moesim.sim.fixed import FixedCosts

        if self.fixed is not None and not isinstance(self.fixed, FixedCosts):
            raise MoesimError("SimConfig.fixed must be a moesim.sim.fixed.FixedCosts or None")
        if getattr(self.comm, "per_choice", self.comm == "low-latency"):
            self.dedup = False
        elif getattr(self.comm, "per_node", self.comm == "hierarchical"):
            self.dedup = True  # forwarded inside a node once per destination GPU
        if not isinstance(self.policy, ReplicaPolicy):
            raise MoesimError("SimConfig.policy must be a moesim.replica.ReplicaPolicy")

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "policy": self.policy.name, "gpus_per_node": self.policy.gpus_per_node,
                "dedup": self.dedup, "include_dense": self.include_dense, "overlap_comm": self.overlap_comm,
                "dense_layers": self.dense_layers, "comm": getattr(self.comm, "name", self.comm),
                "dispatch_dtype": self.dispatch_dtype, "combine_dtype": self.combine_dtype,
                "fixed": None if self.fixed is None else self.fixed.to_dict()}
