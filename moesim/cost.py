"""Compute cost of one GPU in one MoE layer: the grouped expert kernel, the attention block and the router.

Three ways to get a :class:`CostModel`:

- :meth:`CostModel.roofline` (default): time = max(FLOPs / (peak·mfu), HBM bytes / (bandwidth·mbu)) plus kernel
  launches. Expert FFN (SwiGLU: gate, up, down projections): 2·3·H·F FLOPs per token-choice; bytes = the
  weights of every *used* expert (3·H·F·bytes_per_param, read once per kernel however many tokens it gets) plus
  each choice's activations in and out. Local experts run as one grouped kernel (vLLM ``fused_moe``: one launch
  for all experts of the rank), so the GPU's experts share one roofline; ``grouped=False`` charges one kernel
  per expert instead.
- :meth:`CostModel.fit`: from a runtime trace's recorded timings, least squares (relative error) of
  expert = a + b·token_choices + c·experts_used, attention = a + b·tokens, gate = a + b·tokens.
- :meth:`CostModel.from_calibration`: the expert kernel from ``kernels/calibrate.py`` measurements (time per
  expert interpolated against tokens per expert), the rest from the roofline.

Efficiency defaults (mfu 0.6, mbu 0.8): well-tuned Hopper GEMMs reach 60–75 % of bf16 peak at large sizes and
memory-bound decode kernels 80–90 % of HBM bandwidth (FlashAttention-3 and vLLM fused_moe benchmarks; the
project's kernel goals in kernels/README.md are 60 % and 80–90 %).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moesim.errors import MoesimError
from moesim.kernel_calibration import efficiency_curve, read_calibration, read_calibration_table
from moesim.models import ModelSpec
from moesim.topo.devices import DeviceSpec

COST_FORMAT = "moesim.cost-model"
# Kernel launches per layer outside the MoE kernel: 2 RMSNorms, QKV GEMM, rotary, attention, O GEMM (attention
# block); router GEMM and top-k (gate). Counted from the vLLM/SGLang layer code paths, order of magnitude.
ATTENTION_LAUNCHES = 6
GATE_LAUNCHES = 2
# FlashAttention re-reads K/V once per query tile; 128-row tiles on Hopper (FlashAttention-3 paper).
PREFILL_QUERY_TILE = 128
DECODE, PREFILL = 0, 1  # trace phase codes (moesim.trace.format.PHASES)


def attention_shape(model: ModelSpec) -> dict[str, float]:
    """Per-layer attention numbers from the model's fields: weight params, FLOPs per token per context position
    (decode, and prefill where it differs), KV-cache elements per position, activation elements per token.

    Grouped-query attention from the heads. Multi-head latent attention (``model.kv_lora_rank`` > 0; DeepSeek-V2/V3
    modelling code): weights q_a (H×q_lora) and q_b (q_lora×heads·(nope+rope)), or one H×heads·(nope+rope) query
    projection without a q LoRA; kv_a (H×(kv_lora+rope)), kv_b (kv_lora×heads·(nope+v)), o (heads·v×H). The cache
    holds the latent and the rope key (kv_lora+rope per position, FlashMLA's 576 for DeepSeek-V3). Decode runs the
    absorbed form (scores over kv_lora+rope dims, values over the kv_lora latent, per head); prefill the
    non-absorbed multi-head form (scores over nope+rope, values over v), as SGLang and vLLM do. Every weight is used
    once per token in either form, so projection FLOPs are 2·params per token.
    """
    H, nh = model.hidden_size, model.num_attention_heads
    if model.is_mla:
        qk, rope, lat, v = model.qk_nope_head_dim + model.qk_rope_head_dim, model.qk_rope_head_dim, \
            model.kv_lora_rank, model.v_head_dim
        ql = model.q_lora_rank
        q_params = H * ql + ql * nh * qk if ql else H * nh * qk
        params = q_params + H * (lat + rope) + lat * nh * (model.qk_nope_head_dim + v) + nh * v * H
        kv = lat + rope
        return {"params": float(params), "attn_flops_per_pos": 2.0 * nh * (kv + lat),
                "attn_flops_per_pos_prefill": 2.0 * nh * (qk + v), "kv_elems_per_pos": float(kv),
                "act_elems": float(2 * H + ql + nh * qk + kv + nh * v)}
    q, kv = nh * model.head_dim, model.num_kv_heads * model.head_dim
    return {"params": float(2 * H * q + 2 * H * kv), "attn_flops_per_pos": 4.0 * q, "kv_elems_per_pos": float(2 * kv),
            "act_elems": float(2 * H + 2 * q + 2 * kv)}


# --------------------------------------------------------------------------------------------------------
# component evaluators: each takes its parameter dict and token arrays, returns seconds
# --------------------------------------------------------------------------------------------------------
def _efficiency(p: dict[str, Any], flops: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """Achieved fraction of the roofline at each kernel's arithmetic intensity (FLOPs per HBM byte), interpolated
    in log10(intensity) on the component's measured curve (``eff_x``, ``eff_y``), flat beyond its ends."""
    inten = np.divide(flops, nbytes, out=np.ones_like(flops, dtype=float), where=nbytes > 0)
    x = np.log10(np.maximum(inten, 1e-6))
    return np.interp(x, np.asarray(p["eff_x"], dtype=float), np.asarray(p["eff_y"], dtype=float))


def _curve_time(p: dict[str, Any], flops: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """max(FLOPs / peak, bytes / peak) / efficiency(intensity): the roofline at the achievable rate."""
    return np.maximum(flops / p["flops_rate"], nbytes / p["byte_rate"]) / _efficiency(p, flops, nbytes)


def _expert_roofline(p: dict[str, Any], t: np.ndarray) -> np.ndarray:
    bm = int(p.get("block_m", 1))
    if "eff_x" in p:  # achievable-efficiency curve: FLOPs and bytes separately (no in-place fast path)
        if p.get("grouped", True):
            n, u = _sum_and_used(t) if t.ndim >= 1 else (t, (t > 0).astype(float))
            padded = (np.ceil(t / bm) * bm).sum(axis=-1) if bm > 1 else n
            busy = _curve_time(p, padded * p["flops_per_choice"],
                               u * p["bytes_per_expert"] + n * p["bytes_per_choice"]) + p["launch"]
            return np.where(n > 0, busy, 0.0)
        used = t > 0
        padded = np.ceil(t / bm) * bm if bm > 1 else t
        busy = _curve_time(p, padded * p["flops_per_choice"], used * p["bytes_per_expert"] + t * p["bytes_per_choice"])
        return np.where(used, busy + p["launch"], 0.0).sum(axis=-1)
    if p.get("grouped", True):  # one kernel: totals over the GPU's slots decide (reduce first: fast on big arrays)
        if t.ndim < 2:  # one GPU's slots: as a batch of one (in-place arithmetic needs arrays)
            return _expert_roofline(p, t.reshape(1, -1)).reshape(t.shape[:-1])
        n, u = _sum_and_used(t)
        padded = (np.ceil(t / bm) * bm).sum(axis=-1) if bm > 1 else n
        # max(padded·flops/rate, used·weights/rate + n·activations/rate) + launch, built in place (big arrays)
        busy = np.multiply(u, p["bytes_per_expert"] / p["byte_rate"], dtype=float)
        tmp = np.multiply(n, p["bytes_per_choice"] / p["byte_rate"], dtype=float)
        busy += tmp
        np.multiply(padded, p["flops_per_choice"] / p["flops_rate"], out=tmp)
        np.maximum(busy, tmp, out=busy)
        busy += p["launch"]
        busy[n <= 0] = 0.0
        return busy
    used = t > 0
    padded = np.ceil(t / bm) * bm if bm > 1 else t
    flops_t = padded * (p["flops_per_choice"] / p["flops_rate"])
    bytes_t = (used * p["bytes_per_expert"] + t * p["bytes_per_choice"]) / p["byte_rate"]
    return np.where(used, np.maximum(flops_t, bytes_t) + p["launch"], 0.0).sum(axis=-1)


def _sum_and_used(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """t [..., W] (>= 0) -> (sum over the last axis, count of its nonzero entries), both float [...].

    Few slots per GPU (the common case): one pass per slot over contiguous-stride views beats numpy's
    reductions over a short inner axis (per-row overhead).
    """
    W = t.shape[-1]
    if W > 16 or W == 0:
        return t.sum(axis=-1), np.count_nonzero(t, axis=-1).astype(float)
    n = t[..., 0].astype(float, copy=True)
    u = (t[..., 0] != 0).astype(float)
    for w in range(1, W):
        n += t[..., w]
        u += t[..., w] != 0
    return n, u


def _expert_affine(p: dict[str, Any], t: np.ndarray) -> np.ndarray:
    n = t.sum(axis=-1)
    u = np.count_nonzero(t, axis=-1)
    hinge = p.get("e", 0.0) * np.maximum(n - p.get("knot", 0.0), 0.0) if p.get("e") else 0.0
    return np.where(n > 0, p["a"] + p["b"] * n + p["c"] * u + hinge, 0.0)


def _expert_table(p: dict[str, Any], t: np.ndarray) -> np.ndarray:
    x, y = np.asarray(p["x"], dtype=float), np.asarray(p["y"], dtype=float)
    per = np.interp(t, x, y)  # flat below the first point: the weight read dominates there
    if len(x) > 1:  # linear beyond the last point, with the last segment's slope
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        per = np.where(t > x[-1], y[-1] + slope * (t - x[-1]), per)
    return np.where(t > 0, per, 0.0).sum(axis=-1) + np.where((t > 0).any(axis=-1), p.get("launch", 0.0), 0.0)


def _kv_or(kv: np.ndarray | None, default: float, window: float = 0.0) -> np.ndarray | None:
    """Per-step KV positions with NaN (unknown) replaced by ``default``, capped by a sliding window."""
    if kv is None:
        return None
    k = np.where(np.isnan(kv), default, kv)
    return np.minimum(k, window) if window else k


def _dense_roofline(p: dict[str, Any], n: np.ndarray, phase: np.ndarray | None,
                    kv: np.ndarray | None = None) -> np.ndarray:
    per_tok: Any = p["bytes_per_token"]
    flops_tok: Any = p["flops_per_token"]
    prefill: Any = p.get("bytes_per_token_prefill")
    flops_pre: Any = p.get("flops_per_token_prefill")  # MLA: prefill runs the non-absorbed form
    kv_eff = _kv_or(kv, p.get("context_len", 0.0), p.get("window", 0.0)) if "kv_bytes_per_pos" in p else None
    if kv_eff is not None:  # the KV positions actually attended, instead of the fixed context_len
        delta = kv_eff - p["context_len"]
        per_tok = per_tok + delta * p["kv_bytes_per_pos"]
        flops_tok = flops_tok + delta * p["attn_flops_per_pos"]
        if prefill is not None:
            prefill = prefill + delta * p["kv_bytes_per_pos"] / PREFILL_QUERY_TILE
        if flops_pre is not None:
            flops_pre = flops_pre + delta * p.get("attn_flops_per_pos_prefill", p["attn_flops_per_pos"])
    if phase is not None and prefill is not None:
        per_tok = np.where(np.asarray(phase) == PREFILL, prefill, per_tok)
    if phase is not None and flops_pre is not None:
        flops_tok = np.where(np.asarray(phase) == PREFILL, flops_pre, flops_tok)
    if "eff_x" in p:
        flops, nbytes = np.broadcast_arrays(np.asarray(n * flops_tok, dtype=float),
                                            np.asarray(p["bytes_fixed"] + n * per_tok, dtype=float))
        busy = _curve_time(p, flops, nbytes)
    else:
        busy = np.maximum(n * (flops_tok / p["flops_rate"]), (p["bytes_fixed"] + n * per_tok) / p["byte_rate"])
    busy = np.asarray(busy, dtype=float)
    busy += p["launch"]
    busy[np.broadcast_to(n <= 0, busy.shape)] = 0.0
    return busy


def _dense_affine(p: dict[str, Any], n: np.ndarray, phase: np.ndarray | None,
                  kv: np.ndarray | None = None) -> np.ndarray:
    hinge = p.get("e", 0.0) * np.maximum(n - p.get("knot", 0.0), 0.0) if p.get("e") else 0.0
    per_pos = 0.0
    if p.get("d"):  # d·tokens·kv_len: attention reading the KV cache (fitted where the run's kv_len varied)
        k = _kv_or(kv, p.get("kv_ref", 0.0))
        per_pos = p["d"] * n * (p.get("kv_ref", 0.0) if k is None else k)
    return np.where(n > 0, p["a"] + p["b"] * n + hinge + per_pos, 0.0)


_EXPERT = {"roofline": _expert_roofline, "affine": _expert_affine, "table": _expert_table}
_DENSE = {"roofline": _dense_roofline, "affine": _dense_affine}
_EXPERT_KEYS = {"roofline": ("flops_per_choice", "bytes_per_expert", "bytes_per_choice", "flops_rate", "byte_rate",
                             "launch"),
                "affine": ("a", "b", "c"), "table": ("x", "y")}
_DENSE_KEYS = {"roofline": ("flops_per_token", "bytes_fixed", "bytes_per_token", "flops_rate", "byte_rate", "launch"),
               "affine": ("a", "b")}


class CostModel:
    """Seconds for MoE expert compute and the non-MoE part of a layer on one GPU.

    ``expert``, ``attention`` and ``gate`` are parameter dicts with a ``kind`` (see the module docstring);
    build one with :meth:`roofline`, :meth:`fit` or :meth:`from_calibration`, or :meth:`from_dict`.
    """

    def __init__(self, expert: dict[str, Any], attention: dict[str, Any], gate: dict[str, Any],
                 info: dict[str, Any] | None = None) -> None:
        _check_component("expert", expert, _EXPERT_KEYS)
        _check_component("attention", attention, _DENSE_KEYS)
        _check_component("gate", gate, _DENSE_KEYS)
        self.expert, self.attention, self.gate = dict(expert), dict(attention), dict(gate)
        self.info = dict(info or {})

    @property
    def kind(self) -> str:
        return str(self.info.get("source", self.expert["kind"]))

    # -- evaluation ----------------------------------------------------------------------------------
    def expert_time(self, tokens: np.ndarray) -> np.ndarray:
        """tokens [..., W] token-choices per local slot of one GPU in one layer -> [...] seconds of its MoE kernel.

        A slot with 0 tokens costs nothing; a GPU with no tokens at all launches nothing (0 s).
        """
        t = np.asarray(tokens, dtype=float)
        if t.ndim == 0:
            t = t[None]
        if t.size and not t.min() >= 0:  # a read-only pass: no copy in the usual case of no negatives
            t = np.maximum(t, 0.0)
        return _EXPERT[self.expert["kind"]](self.expert, t)

    def attention_time(self, tokens: np.ndarray, phase: np.ndarray | None = None,
                       kv_len: np.ndarray | None = None) -> np.ndarray:
        """tokens [...] -> seconds of the attention block (norms, projections, attention) without the router.

        ``phase`` (broadcastable trace phase codes, 0 decode / 1 prefill) decides how often the KV cache is read:
        once per token in decode, once per query tile in prefill. None counts every token as decode.
        ``kv_len`` (broadcastable; NaN unknown): KV positions each token attends to, where the trace records it;
        otherwise the model's fixed context length (roofline) or the fit's typical one.
        """
        n = np.maximum(np.asarray(tokens, dtype=float), 0.0)
        kv = None if kv_len is None else np.asarray(kv_len, dtype=float)
        return _DENSE[self.attention["kind"]](self.attention, n, phase, kv)

    def gate_time(self, tokens: np.ndarray) -> np.ndarray:
        """tokens [...] -> seconds of the router (gate GEMM and top-k)."""
        n = np.maximum(np.asarray(tokens, dtype=float), 0.0)
        return _DENSE[self.gate["kind"]](self.gate, n, None)

    def dense_time(self, tokens: np.ndarray, phase: np.ndarray | None = None,
                   kv_len: np.ndarray | None = None) -> np.ndarray:
        """tokens [...] whose attention/norm/gate this GPU computes in one layer -> seconds (attention + gate)."""
        return self.attention_time(tokens, phase, kv_len) + self.gate_time(tokens)

    # -- constructors --------------------------------------------------------------------------------
    @classmethod
    def roofline(cls, model: ModelSpec, device: DeviceSpec, *, mfu: float = 0.6, mbu: float = 0.8,
                 context_len: int = 1024, grouped: bool = True, block_m: int = 1,
                 efficiency: dict[str, Any] | None = None) -> CostModel:
        """Roofline costs of ``model`` on ``device`` with efficiency factors; see the module docstring.

        ``context_len``: tokens each query attends to (capped by the model's sliding window). ``block_m`` > 1
        pads each expert's rows to a multiple of the GEMM tile (fused_moe's BLOCK_M) for the FLOP count.
        ``efficiency``: an achievable-efficiency curve (:func:`efficiency_curve`, ``{"x": log10 FLOPs/byte,
        "y": fraction of the roofline}``) replacing the constant ``mfu``/``mbu``: every kernel runs at
        peak × efficiency(its arithmetic intensity).
        Bytes from the model's precisions: weights ``bytes_per_param`` (fractional with FP8 block scales),
        activations ``act_bytes``, KV cache ``kv_bytes``; attention (GQA or MLA) and shared experts from its fields.
        With FP8 weights (:attr:`ModelSpec.fp8_weights`) the expert and projection GEMMs run at the device's FP8
        peak (:meth:`DeviceSpec.gemm_peak`); core attention and the router stay at the bf16 peak. The attention
        component keeps one FLOP rate: its projection FLOPs are counted in bf16-equivalent FLOPs (scaled by
        bf16 peak / FP8 peak).
        """
        for name, v in (("mfu", mfu), ("mbu", mbu)):
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise MoesimError(f"{name} must be in (0, 1], got {v!r}")
        if not isinstance(context_len, int) or context_len < 0:
            raise MoesimError(f"context_len must be an integer >= 0, got {context_len!r}")
        if efficiency is not None:
            mfu = mbu = 1.0
        H, F = model.hidden_size, model.ffn_size
        wb, ab, kb = float(model.bytes_per_param), float(model.act_bytes), float(model.kv_bytes)
        fr, br = device.peak_flops * mfu, device.hbm_bw * mbu
        fr_gemm = device.gemm_peak(model.fp8_weights) * mfu
        expert = {"kind": "roofline", "flops_per_choice": 2.0 * 3 * H * F, "bytes_per_expert": 3.0 * H * F * wb,
                  "bytes_per_choice": 2.0 * H * ab, "flops_rate": fr_gemm, "byte_rate": br,
                  "launch": device.kernel_launch, "grouped": bool(grouped), "block_m": int(block_m)}
        a = attention_shape(model)
        ctx = min(context_len, model.sliding_window) if model.sliding_window else context_len
        shared_params = 3.0 * H * model.shared_expert_ffn  # shared experts run on every token (DeepSeek-V3, Qwen2)
        kv_bytes = ctx * a["kv_elems_per_pos"] * kb
        act = (a["act_elems"] + 6 * H) * ab  # projections' in/out + norms and residual reads/writes
        proj_flops = 2.0 * (a["params"] + shared_params) * (fr / fr_gemm)  # bf16-equivalent FLOPs
        attention = {"kind": "roofline", "flops_per_token": proj_flops + ctx * a["attn_flops_per_pos"],
                     "bytes_fixed": (a["params"] + shared_params) * wb, "bytes_per_token": act + kv_bytes,
                     "bytes_per_token_prefill": act + kv_bytes / PREFILL_QUERY_TILE,
                     "flops_rate": fr, "byte_rate": br, "launch": ATTENTION_LAUNCHES * device.kernel_launch,
                     "context_len": float(ctx), "window": float(model.sliding_window or 0),
                     "kv_bytes_per_pos": a["kv_elems_per_pos"] * kb, "attn_flops_per_pos": a["attn_flops_per_pos"]}
        if "attn_flops_per_pos_prefill" in a:
            attention["attn_flops_per_pos_prefill"] = a["attn_flops_per_pos_prefill"]
            attention["flops_per_token_prefill"] = proj_flops + ctx * a["attn_flops_per_pos_prefill"]
        E = model.num_experts
        gate = {"kind": "roofline", "flops_per_token": 2.0 * H * E, "bytes_fixed": float(H * E * ab),
                "bytes_per_token": float(H * ab + 8 * E), "flops_rate": fr, "byte_rate": br,
                "launch": GATE_LAUNCHES * device.kernel_launch}
        info = {"source": "roofline", "model": model.name, "device": device.to_dict(), "mfu": mfu, "mbu": mbu,
                "context_len": ctx}
        if efficiency is not None:
            for comp in (expert, attention, gate):
                comp["eff_x"], comp["eff_y"] = list(efficiency["x"]), list(efficiency["y"])
            info["efficiency"] = {k: v for k, v in efficiency.items() if k not in ("x", "y")}
        return cls(expert, attention, gate, info)

    @classmethod
    def fit(cls, timings: Any, model: ModelSpec, device: DeviceSpec | None = None, *,
            dense_tokens: np.ndarray | None = None, piecewise: bool = True,
            kv_len: np.ndarray | None = None) -> tuple[CostModel, dict[str, Any]]:
        """Least-squares fit of expert, attention and gate costs to a runtime trace's recorded timings.

        ``timings``: :class:`moesim.trace.reader.Timings` with phases ``attention``, ``gate``, ``expert``.
        Expert records use the tokens per local slot; attention/gate records the tokens the rank computed, which
        the timings do not hold: ``dense_tokens`` [N] gives them, else each (step, layer)'s token-choices over
        all ranks / top_k / ranks (the runtime spreads each step's batch evenly over ranks). Each phase is fitted
        by non-negative least squares on the *relative* residual (every record counts alike, small or large);
        records with no tokens are left out (the model charges them 0). ``device`` is only recorded.
        ``piecewise``: where a hinge ``e·max(0, tokens − knot)`` (slope rising past a knot: memory- to
        compute-bound) cuts the relative squared error by 20 %, keep it (the report's ``form`` says which).
        ``kv_len`` [N]: KV positions per token of each record's step (NaN unknown); where it varies, attention
        gets a term ``d·tokens·kv_len`` (decode attention reads the whole KV cache, which grows every step).
        Returns (model, report) with per-phase coefficients, relative errors (median, p90) and record counts.
        """
        return _fit_timings(cls, timings, model, device, dense_tokens, piecewise, kv_len)

    @classmethod
    def fit_trace(cls, trace: Any, device: DeviceSpec | None = None, *, model: ModelSpec | None = None,
                  piecewise: bool = True) -> tuple[CostModel, dict[str, Any]]:
        """:meth:`fit` on an open :class:`~moesim.trace.Trace`: the tokens each rank computed attention for come
        from the trace's origin ranks when it has them (exact), else the even split."""
        timings = trace.timings()
        dense = dense_tokens_from_trace(trace, timings)
        return cls.fit(timings, model or trace.model, device, dense_tokens=dense, piecewise=piecewise,
                       kv_len=kv_len_of_records(trace, timings))

    @classmethod
    def from_calibration(cls, path: Any, model: ModelSpec, device: DeviceSpec, **roofline_kw: Any) -> CostModel:
        """Costs from a ``moesim.kernel-calibration`` JSON (kernels/calibrate.py).

        The expert kernel: the measured table where the file holds the model's (hidden, FFN) shape, else the
        roofline. Everything else (attention, shared experts, gate, and the expert without a table): the roofline
        at the achievable efficiency the file measured at each arithmetic intensity (:func:`efficiency_curve`),
        instead of peak × constant mfu/mbu.
        """
        doc = read_calibration(path)
        curve = efficiency_curve(doc, device, source=str(path))
        base = cls.roofline(model, device, efficiency=curve, **roofline_kw)
        try:
            table, info = read_calibration_table(path, model, doc)
        except MoesimError as exc:
            if "has no entries for" not in str(exc):
                raise
            return cls(base.expert, base.attention, base.gate,
                       {**base.info, "source": "calibration", "calibration": str(path),
                        "calibration_device": doc.get("device"), "expert": "roofline (no entries for the shape)"})
        return cls(table, base.attention, base.gate, {**base.info, "source": "calibration", **info})

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": COST_FORMAT, "version": 1, "expert": _plain(self.expert), "attention": _plain(self.attention),
                "gate": _plain(self.gate), "info": _plain(self.info)}

    @classmethod
    def from_dict(cls, d: Any) -> CostModel:
        if not isinstance(d, dict) or d.get("format") != COST_FORMAT:
            raise MoesimError(f"cost model must be a JSON object with format {COST_FORMAT!r}")
        if d.get("version") != 1:
            raise MoesimError(f"unsupported cost model version {d.get('version')!r}")
        for key in ("expert", "attention", "gate"):
            if not isinstance(d.get(key), dict):
                raise MoesimError(f"cost model lacks the object {key!r}")
        return cls(d["expert"], d["attention"], d["gate"], d.get("info") or {})

    def __repr__(self) -> str:
        return f"CostModel({self.kind}: expert {self.expert['kind']}, attention {self.attention['kind']})"


def _check_component(name: str, p: Any, keys: dict[str, tuple[str, ...]]) -> None:
    if not isinstance(p, dict) or p.get("kind") not in keys:
        kind = p.get("kind") if isinstance(p, dict) else None
        raise MoesimError(f"cost model {name}: kind must be one of {', '.join(keys)}, got {kind!r}")
    for k in keys[p["kind"]]:
        if k not in p:
            raise MoesimError(f"cost model {name} ({p['kind']}) lacks {k!r}")
        vals = np.asarray(p[k], dtype=float).ravel() if not isinstance(p[k], bool) else np.array([0.0])
        if not np.isfinite(vals).all():
            raise MoesimError(f"cost model {name}: {k} must be finite")
    for k in ("flops_rate", "byte_rate"):
        if k in p and not float(p[k]) > 0:
            raise MoesimError(f"cost model {name}: {k} must be positive")
    if "eff_x" in p or "eff_y" in p:
        ex = np.asarray(p.get("eff_x", []), dtype=float).ravel()
        ey = np.asarray(p.get("eff_y", []), dtype=float).ravel()
        if (ex.size < 1 or ex.shape != ey.shape or not np.isfinite(ex).all() or (np.diff(ex) <= 0).any()
                or not ((ey > 0) & (ey <= 1)).all()):
            raise MoesimError(f"cost model {name}: eff_x (increasing) and eff_y (in (0, 1]) must be equally long")
    if p["kind"] == "table":
        x, y = np.asarray(p["x"], dtype=float).ravel(), np.asarray(p["y"], dtype=float).ravel()
        if x.size < 1 or x.shape != y.shape or (np.diff(x) <= 0).any() or (x <= 0).any() or (y < 0).any():
            raise MoesimError(f"cost model {name}: table needs equally long x (positive, increasing) and y (>= 0)")


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# --------------------------------------------------------------------------------------------------------
# fitting to recorded timings
# --------------------------------------------------------------------------------------------------------
def _lsq_relative(cols: dict[str, np.ndarray], t: np.ndarray) -> dict[str, float]:
    """Non-negative coefficients minimising sum(((A·x − t) / t)²); columns constant over the records are
    dropped (coefficient 0) except the intercept, so the problem is never rank-deficient by construction."""
    from scipy.optimize import lsq_linear

    names = [k for k, c in cols.items() if k == "a" or np.ptp(c) > 0]
    A = np.column_stack([cols[k] for k in names]) / t[:, None]
    scale = np.abs(A).max(axis=0)
    scale[scale == 0] = 1.0
    res = lsq_linear(A / scale, np.ones_like(t), bounds=(0.0, np.inf), method="bvls", tol=1e-14)
    coef = dict.fromkeys(cols, 0.0)
    coef.update({k: float(v) for k, v in zip(names, res.x / scale)})
    return coef


def _fit_piecewise(cols: dict[str, np.ndarray], x: np.ndarray, t: np.ndarray) -> tuple[dict[str, float], str]:
    """Affine fit of ``t`` on ``cols``; then, with enough distinct ``x``, the same plus a hinge
    ``e·max(0, x − knot)`` (slope rising past a knot, as a kernel turning from memory- to compute-bound), the knot
    chosen among quantiles of ``x``. The hinge is kept only when it cuts the relative squared error by 20 %."""
    def sse(coef: dict[str, float], c: dict[str, np.ndarray]) -> float:
        pred = sum(coef[k] * c[k] for k in c)
        return float((((pred - t) / t) ** 2).sum())

    base = _lsq_relative(cols, t)
    best, best_sse, base_sse = base, sse(base, cols), sse(base, cols)
    if t.size >= 8 and np.unique(x).size >= 4:
        for knot in np.unique(np.quantile(x, np.linspace(0.1, 0.9, 17))):
            if (x > knot).sum() < 3:
                continue
            c = {**cols, "e": np.maximum(x - knot, 0.0)}
            coef = _lsq_relative(c, t)
            err = sse(coef, c)
            if coef["e"] > 0 and err < best_sse:
                best, best_sse = {**coef, "knot": float(knot)}, err
    if best is not base and best_sse < 0.8 * base_sse and base_sse > 1e-12 * t.size:
        return best, "piecewise"
    return base, "affine"


def _errors(pred: np.ndarray, t: np.ndarray) -> dict[str, Any]:
    rel = np.abs(pred - t) / t
    return {"n": int(t.size), "median_rel_error": float(np.median(rel)) if rel.size else None,
            "p90_rel_error": float(np.percentile(rel, 90)) if rel.size else None,
            "mean_seconds": float(t.mean()) if t.size else None}


def _dense_tokens_from_timings(timings: Any, model: ModelSpec) -> np.ndarray:
    """[N] tokens per rank per record: each (step, layer)'s token-choices over all ranks / top_k / ranks."""
    idx = np.asarray(timings.index, dtype=np.int64)
    choices = np.asarray(timings.tokens, dtype=float).sum(axis=1)
    key = idx[:, 0] * (int(idx[:, 1].max(initial=0)) + 1) + idx[:, 1]
    _, inv = np.unique(key, return_inverse=True)
    total = np.bincount(inv, weights=choices)
    ranks = np.bincount(inv)
    return total[inv] / model.top_k / ranks[inv]


def dense_tokens_from_trace(trace: Any, timings: Any) -> np.ndarray | None:
    """[N] tokens whose dense part rank ``r`` computed in step ``s`` for each timing record (s, layer, r), from the
    trace's origin ranks; None when the trace has no origins (or no token ids)."""
    if len(timings) == 0 or not getattr(trace, "has_origin", False) or trace.kind != "tokens":
        return None
    idx = np.asarray(timings.index, dtype=np.int64)
    ranks = int(idx[:, 2].max()) + 1
    per_step = np.zeros((trace.num_steps, ranks))
    for step in trace.steps():
        if step.origin is not None and step.origin.size:
            o = np.asarray(step.origin, dtype=np.int64)
            o = o[(o >= 0) & (o < ranks)]
            per_step[step.index] = np.bincount(o, minlength=ranks)[:ranks]
    ok = idx[:, 0] < trace.num_steps
    out = np.zeros(len(idx))
    out[ok] = per_step[idx[ok, 0], idx[ok, 2]]
    return out


def kv_len_of_records(trace: Any, timings: Any) -> np.ndarray | None:
    """[N] the trace's kv_len of each timing record's step (NaN unknown); None when the trace records none."""
    kv = trace.kv_len() if hasattr(trace, "kv_len") else None
    if kv is None or len(timings) == 0:
        return None
    step = np.asarray(timings.index[:, 0], dtype=np.int64)
    return np.where(step < len(kv), kv[np.minimum(step, len(kv) - 1)], np.nan)


def _fit_timings(cls: Any, timings: Any, model: ModelSpec, device: DeviceSpec | None,
                 dense_tokens: np.ndarray | None, piecewise: bool = True,
                 kv_len: np.ndarray | None = None) -> tuple[CostModel, dict[str, Any]]:
    n_rec = len(timings) if hasattr(timings, "__len__") else 0
    if n_rec == 0:
        raise MoesimError("the trace holds no timing records to fit a cost model (record it with moesim run --record)")
    names = tuple(timings.phase_names)
    for ph in ("attention", "gate", "expert"):
        if ph not in names:
            raise MoesimError(f"trace timings have no phase {ph!r} (they have {', '.join(names)})")
    tok = np.maximum(np.asarray(timings.tokens, dtype=float), 0.0)
    if dense_tokens is None:
        dense = _dense_tokens_from_timings(timings, model)
    else:
        dense = np.asarray(dense_tokens, dtype=float).ravel()
        if dense.shape != (n_rec,):
            raise MoesimError(f"dense_tokens must hold one value per timing record ({n_rec}), got {dense.shape}")
    if kv_len is not None and np.asarray(kv_len).shape != (n_rec,):
        raise MoesimError(f"kv_len must hold one value per timing record ({n_rec}), got {np.asarray(kv_len).shape}")
    report: dict[str, Any] = {"records": n_rec, "phases": {}}
    comps: dict[str, dict[str, Any]] = {}
    # expert: a + b·choices + c·experts used
    t = np.asarray(timings.phase("expert"), dtype=float)
    n = tok.sum(axis=1)
    u = (tok > 0).sum(axis=1).astype(float)
    ok = (n > 0) & np.isfinite(t) & (t > 0)
    if ok.sum() < 1:
        raise MoesimError("no timing record has expert tokens and a positive expert time; cannot fit")
    cols = {"a": np.ones(ok.sum()), "b": n[ok], "c": u[ok]}
    coef, form = _fit_piecewise(cols, n[ok], t[ok]) if piecewise else (_lsq_relative(cols, t[ok]), "affine")
    comps["expert"] = {"kind": "affine", **coef}
    pred = _expert_affine(comps["expert"], tok[ok])
    desc = "a + b*token_choices + c*experts_used" + (" + e*max(0, token_choices - knot)" if form != "affine" else "")
    report["phases"]["expert"] = {"coef": coef, "form": form, "model": desc, **_errors(pred, t[ok])}
    for ph in ("attention", "gate"):
        t = np.asarray(timings.phase(ph), dtype=float)
        ok = (dense > 0) & np.isfinite(t) & (t > 0)
        if ok.sum() < 1:
            raise MoesimError(f"no timing record has tokens and a positive {ph} time; cannot fit")
        cols = {"a": np.ones(ok.sum()), "b": dense[ok]}
        kv = None if kv_len is None or ph != "attention" else np.asarray(kv_len, dtype=float).ravel()[ok]
        if kv is not None and (np.isnan(kv).any() or np.ptp(kv) == 0):
            kv = None  # unknown somewhere, or never varied: not identifiable
        if kv is not None:
            cols["d"] = dense[ok] * kv
        coef, form = _fit_piecewise(cols, dense[ok], t[ok]) if piecewise else (_lsq_relative(cols, t[ok]), "affine")
        comps[ph] = {"kind": "affine", **coef}
        if kv is not None:
            comps[ph]["kv_ref"] = float(np.median(kv))
        pred = _dense_affine(comps[ph], dense[ok], None, kv)
        desc = ("a + b*tokens" + (" + d*tokens*kv_len" if kv is not None else "")
                + (" + e*max(0, tokens - knot)" if form != "affine" else ""))
        report["phases"][ph] = {"coef": coef, "form": form, "model": desc, **_errors(pred, t[ok])}
    info = {"source": "fit", "model": model.name, "records": n_rec,
            "device": device.to_dict() if device is not None else None,
            "dense_tokens": "given" if dense_tokens is not None else "even split of each step over ranks"}
    return cls(comps["expert"], comps["attention"], comps["gate"], info), report
