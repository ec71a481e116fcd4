"""What an engine returns: per-step times, per-layer phase split, per-GPU busy time, bytes and loads.

Both engines fill the same fields, so reports, placement studies and tests never ask which engine ran.
Definitions used by :meth:`SimResult.summary` (one place, so every report means the same thing):

- *step latency*: ``step_time`` (seconds of one model step, all MoE layers, dense layers and stalls).
- *tokens/s*: tokens of all steps / sum of step times (one model replica; steps run back to back).
- *MoE share*: (dispatch + expert + combine critical-path time) / total time.
- *busiest-GPU / mean load*: token-choices, summed over steps; per layer the busiest GPU's load over the mean
  GPU load, aggregated as sum_l max_g / sum_l mean_g (layers with more traffic weigh more; 1.0 = balanced).
- *GPU busy share*: compute seconds of a GPU / total time (mean and max over GPUs); the rest is waiting
  (for the network or for the slowest GPU).
- *bytes intra / inter node*: bytes that leave a GPU for another GPU of the same / another node (all exchanges:
  dispatch, combine and collectives).
- *busiest link*: the link busiest in time (largest bytes / bandwidth); utilisation = its bytes / (bandwidth ×
  total time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesim.errors import MoesimError

PHASES = ("dense", "gate", "dispatch", "expert", "combine")


@dataclass
class SimResult:
    step_time: np.ndarray  # [S] seconds
    phase_time: np.ndarray  # [S, L, 5] critical-path seconds per MoE layer and phase (PHASES)
    gpu_busy: np.ndarray  # [S, G] compute seconds per GPU
    moe_time: np.ndarray  # [S, G] expert compute seconds per GPU
    bytes_intra: np.ndarray  # [S]
    bytes_inter: np.ndarray  # [S]
    link_bytes: np.ndarray  # [E_links] over all steps
    gpu_load: np.ndarray  # [L, G] token-choices per GPU over all steps
    step_tokens: np.ndarray  # [S]
    phase: np.ndarray  # [S] uint8 trace phase codes
    first_step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    stall_time: np.ndarray | None = None  # [S] seconds of rebalancing stalls included in step_time

    def __post_init__(self) -> None:
        S = len(self.step_time)
        if self.stall_time is None:
            self.stall_time = np.zeros(S)

    @property
    def num_steps(self) -> int:
        return len(self.step_time)

    @property
    def num_gpus(self) -> int:
        return int(self.gpu_load.shape[1])

    # -- figures --------------------------------------------------------------------------------------
    def summary(self, topology: Any = None) -> dict[str, Any]:
        """The headline figures (see the module docstring for their definitions); JSON-ready."""
        st = np.asarray(self.step_time, dtype=float)
        S = len(st)
        total = float(st.sum())
        tokens = float(np.sum(self.step_tokens))
        pt = np.asarray(self.phase_time, dtype=float)
        moe = float(pt[..., 2:5].sum()) if pt.size else 0.0
        load = np.asarray(self.gpu_load, dtype=float)
        mean_l = load.mean(axis=1) if load.size else np.zeros(0)
        imbalance = float(load.max(axis=1).sum() / mean_l.sum()) if mean_l.sum() > 0 else 1.0
        b_in, b_out = float(np.sum(self.bytes_intra)), float(np.sum(self.bytes_inter))
        out: dict[str, Any] = {
            "engine": self.extra.get("engine", "?"),
            "steps": S,
            "first_step": int(self.first_step),
            "tokens": int(tokens),
            "total_time_s": total,
            "step_latency_mean_s": float(st.mean()) if S else 0.0,
            "step_latency_p50_s": float(np.percentile(st, 50)) if S else 0.0,
            "step_latency_p99_s": float(np.percentile(st, 99)) if S else 0.0,
            "tokens_per_s": tokens / total if total > 0 else 0.0,
            "moe_share": moe / total if total > 0 else 0.0,
            "phase_share": {name: (float(pt[..., i].sum()) / total if total > 0 else 0.0)
                            for i, name in enumerate(PHASES)},
            "busiest_gpu_over_mean_load": imbalance,
            "gpu_load_total": load.sum(axis=0).tolist(),
            "gpu_busy_s": np.sum(self.gpu_busy, axis=0).tolist(),
            "gpu_moe_s": np.sum(self.moe_time, axis=0).tolist(),
            "gpu_busy_share_mean": float(np.mean(np.sum(self.gpu_busy, axis=0)) / total) if total > 0 else 0.0,
            "gpu_busy_share_max": float(np.max(np.sum(self.gpu_busy, axis=0)) / total) if total > 0 else 0.0,
            "bytes_intra_node": b_in,
            "bytes_inter_node": b_out,
            "bytes_intra_node_per_step": b_in / S if S else 0.0,
            "bytes_inter_node_per_step": b_out / S if S else 0.0,
            "bytes_intra_node_per_token": b_in / tokens if tokens else 0.0,
            "bytes_inter_node_per_token": b_out / tokens if tokens else 0.0,
            "stall_time_s": float(np.sum(self.stall_time)),
        }
        lb = np.asarray(self.link_bytes, dtype=float)
        if topology is not None and lb.size and lb.max() > 0:
            e = int((lb / np.asarray(topology.edge_bw, dtype=float)).argmax())
            u, v = topology.edges()[e]
            bw = float(topology.edge_bw[e])
            out["busiest_link"] = f"{u}->{v}"
            out["busiest_link_bytes"] = float(lb[e])
            out["busiest_link_bandwidth"] = bw
            out["busiest_link_utilisation"] = float(lb[e] / (bw * total)) if total > 0 else 0.0
        else:
            out.update(busiest_link=None, busiest_link_bytes=0.0, busiest_link_bandwidth=0.0,
                       busiest_link_utilisation=0.0)
        stalls = self.extra.get("stalls")
        if stalls:
            out["stalls"] = len(stalls)
            out["stall_bytes"] = float(sum(s["bytes"] for s in stalls))
        return out

    # -- combining ------------------------------------------------------------------------------------
    @staticmethod
    def concat(results: list[SimResult]) -> SimResult:
        """Results of consecutive step ranges (windows, mapping segments) as one result.

        Timeline events are shifted by the time of the results before them; other extra entries are taken from
        the first result, lists (stalls, migrations) concatenated.
        """
        if not results:
            raise MoesimError("nothing to concatenate: no simulation results")
        if len(results) == 1:
            return results[0]
        G = {r.gpu_load.shape for r in results}
        if len(G) != 1:
            raise MoesimError("cannot concatenate simulation results of different layer/GPU counts")
        first = results[0]
        extra: dict[str, Any] = {k: v for k, v in first.extra.items()
                                 if not isinstance(v, (list, np.ndarray)) and k != "events_dropped"}
        offset = 0.0
        for r in results:
            for k, v in r.extra.items():
                if k == "events":
                    extra.setdefault("events", []).extend((g, n, a + offset, b + offset) for g, n, a, b in v)
                elif k in ("stalls", "migrations") and isinstance(v, list):
                    extra.setdefault(k, []).extend(v)
                elif k == "gpu_phase_times" and k not in extra:
                    extra[k] = v  # timeline detail of the first steps only
                elif k == "events_dropped":
                    extra[k] = extra.get(k, 0) + int(v)
                elif k in ("dense_layer_time", "fixed_time"):  # per-step arrays
                    extra[k] = np.concatenate([extra.get(k, np.zeros(0)), np.asarray(v, dtype=float)])
            offset += float(np.sum(r.step_time))
        cat = np.concatenate
        return SimResult(
            step_time=cat([r.step_time for r in results]), phase_time=cat([r.phase_time for r in results]),
            gpu_busy=cat([r.gpu_busy for r in results]), moe_time=cat([r.moe_time for r in results]),
            bytes_intra=cat([r.bytes_intra for r in results]), bytes_inter=cat([r.bytes_inter for r in results]),
            link_bytes=np.sum([r.link_bytes for r in results], axis=0),
            gpu_load=np.sum([r.gpu_load for r in results], axis=0),
            step_tokens=cat([r.step_tokens for r in results]), phase=cat([r.phase for r in results]),
            first_step=first.first_step, extra=extra,
            stall_time=cat([np.asarray(r.stall_time) for r in results]))

    def add_stall(self, step: int, seconds: float, bytes_moved: float, label: str) -> None:
        """Charge a stall (e.g. moving expert weights for a rebalance) to trace step ``step``.

        The stall's seconds are added to that step's latency; the record goes to ``extra["stalls"]``.
        """
        i = int(step) - int(self.first_step)
        if not 0 <= i < self.num_steps:
            raise MoesimError(f"stall at step {step} is outside the result's steps "
                              f"{self.first_step}..{self.first_step + self.num_steps - 1}")
        if not (np.isfinite(seconds) and seconds >= 0 and np.isfinite(bytes_moved) and bytes_moved >= 0):
            raise MoesimError(f"stall {label!r}: seconds and bytes must be finite and >= 0")
        self.step_time = np.asarray(self.step_time, dtype=float).copy()
        self.stall_time = np.asarray(self.stall_time, dtype=float).copy()
        self.step_time[i] += seconds
        self.stall_time[i] += seconds
        self.extra.setdefault("stalls", []).append(
            {"step": int(step), "seconds": float(seconds), "bytes": float(bytes_moved), "label": str(label)})
