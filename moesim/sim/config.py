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

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise MoesimError(f"unknown layout {self.layout!r}; known: {', '.join(LAYOUTS)}")
        if not isinstance(self.policy, ReplicaPolicy):
            raise MoesimError("SimConfig.policy must be a moesim.replica.ReplicaPolicy")

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "policy": self.policy.name, "gpus_per_node": self.policy.gpus_per_node,
                "dedup": self.dedup, "include_dense": self.include_dense, "overlap_comm": self.overlap_comm,
                "dense_layers": self.dense_layers}
