"""Bytes and FLOPs from the model's fields: FP8 block scales, KV-cache dtype, MLA, shared experts, efficiency curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.cost import CostModel, attention_shape, efficiency_curve
from moesim.errors import MoesimError
from moesim.models import DTYPE_BYTES, ModelSpec, dtype_bytes, get_model
from moesim.topo.devices import DEVICES

FIX = Path(__file__).parent / "fixtures"
H200 = DEVICES["h200"]


def one(a: np.ndarray) -> float:
    return float(np.asarray(a).item())


def test_fp8_block_scale_bytes_are_the_scale_grid() -> None:
    """3 weights of 7168x2048 in FP8 + one float32 per 128x128 block = 3·(H·F + 4·56·16) bytes."""
    ds = get_model(str(FIX / "deepseek-v3.json"))
    exact = 3 * (7168 * 2048 + 4 * (7168 // 128) * (2048 // 128))
    assert ds.expert_bytes == exact == 44_050_944
    assert get_model("deepseek-v3").expert_bytes == 3 * 7168 * 2048 * 2
    c = CostModel.roofline(ds, H200, mfu=1.0, mbu=1.0)
    assert c.expert["bytes_per_expert"] == exact
    # one token on one expert is memory-bound: weights + its activation in and out (bf16), at HBM speed
    t = one(c.expert_time(np.array([1.0])))
    assert t == pytest.approx((exact + 2 * 7168 * 2) / H200.hbm_bw + H200.kernel_launch, rel=1e-12)


def test_fp8_weights_run_their_gemms_at_the_fp8_peak() -> None:
    """Compute-bound experts (prefill, 64k tokens on one expert): FP8 weights on an H200 take exactly the FLOPs at
    1,979 TFLOP/s; bf16 weights at 989. On an A100 (no FP8 tensor cores) both run at the bf16 peak."""
    from moesim.models import with_dtypes
    from moesim.topo.devices import DEVICES

    bf16 = get_model("deepseek-v3")
    fp8 = with_dtypes(bf16, "fp8-block")
    assert fp8.fp8_weights and not bf16.fp8_weights
    n = 65536.0
    flops = n * 2 * 3 * 7168 * 2048
    for dev, fp8_rate in (("h200", 1979e12), ("a100", 312e12)):
        d = DEVICES[dev]
        t16 = one(CostModel.roofline(bf16, d, mfu=1.0, mbu=1.0).expert_time(np.array([n])))
        t8 = one(CostModel.roofline(fp8, d, mfu=1.0, mbu=1.0).expert_time(np.array([n])))
        assert t16 == pytest.approx(flops / d.peak_flops + d.kernel_launch, rel=1e-12)
        assert t8 == pytest.approx(flops / fp8_rate + d.kernel_launch, rel=1e-12)
    # attention: the projections' FLOPs at the FP8 rate, core attention (per KV position) at the bf16 rate
    a = attention_shape(bf16)
    c8 = CostModel.roofline(fp8, H200, mfu=1.0, mbu=1.0, context_len=1000)
    proj = 2.0 * (a["params"] + 3 * 7168 * bf16.shared_expert_ffn)
    assert c8.attention["flops_per_token"] == pytest.approx(proj * 989 / 1979 + 1000 * a["attn_flops_per_pos"])
    assert c8.attention["flops_rate"] == c8.gate["flops_rate"] == H200.peak_flops


def test_dtype_table() -> None:
    assert dtype_bytes("bf16") == 2 and dtype_bytes("FP8") == 1 and dtype_bytes("fp8-block") == 1 + 4 / 16384
    assert DTYPE_BYTES["fp32"] == 4
    with pytest.raises(MoesimError, match="unknown --kv-dtype 'int3'; known: fp32"):
        dtype_bytes("int3", "--kv-dtype")


@pytest.mark.parametrize("model, elems", [("mixtral-8x7b", 2 * 8 * 128), ("deepseek-v3", 512 + 64),
                                          ("qwen3-30b-a3b", 2 * 4 * 128)])
@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8", "fp32"])
def test_kv_bytes_times_element_size(model: str, elems: int, kv_dtype: str) -> None:
    m = get_model(model).with_(kv_bytes=dtype_bytes(kv_dtype))
    c = CostModel.roofline(m, H200, mfu=1.0, mbu=1.0, context_len=0)
    assert c.attention["kv_bytes_per_pos"] == elems * DTYPE_BYTES[kv_dtype]
    # decode attention reading a longer cache: the extra time is exactly the extra KV bytes at HBM speed
    n = np.array([4.0])
    dec = np.array([0])
    t1, t2 = (one(c.attention_time(n, dec, np.array([kv]))) for kv in (500.0, 3500.0))  # inside Mixtral's window
    assert t2 - t1 == pytest.approx(4 * 3000 * elems * DTYPE_BYTES[kv_dtype] / H200.hbm_bw, rel=1e-9)


def test_mla_shape_hand_derived() -> None:
    """DeepSeek-V3 MLA per layer: q_a 7168·1536, q_b 1536·128·192, kv_a 7168·576, kv_b 512·128·256, o 128·128·7168."""
    a = attention_shape(get_model("deepseek-v3"))
    assert a["params"] == 11_010_048 + 37_748_736 + 4_128_768 + 16_777_216 + 117_440_512 == 187_105_280
    assert a["kv_elems_per_pos"] == 576
    assert a["attn_flops_per_pos"] == 2 * 128 * (576 + 512)  # absorbed decode
    assert a["attn_flops_per_pos_prefill"] == 2 * 128 * (192 + 128)  # multi-head prefill
    # no q LoRA: one H x heads*(nope+rope) query projection (DeepSeek-V2-Lite style)
    lite = get_model("deepseek-v3").with_(q_lora_rank=0)
    assert attention_shape(lite)["params"] == a["params"] - 11_010_048 - 37_748_736 + 7168 * 128 * 192


def test_mla_costs_follow_fields_not_name() -> None:
    ds = get_model("deepseek-v3")
    a = CostModel.roofline(ds, H200).to_dict()
    b = CostModel.roofline(ds.with_(name="my-own-mla"), H200).to_dict()
    for comp in ("expert", "attention", "gate"):
        assert a[comp] == b[comp]
    # halving the latent rank changes the KV bytes and the attention FLOPs
    small = CostModel.roofline(ds.with_(kv_lora_rank=256), H200)
    assert small.attention["kv_bytes_per_pos"] == (256 + 64) * 2
    assert small.attention["attn_flops_per_pos"] == 2 * 128 * (320 + 256)
    # prefill FLOPs per token (compute-bound, long context) use the non-absorbed form
    c = CostModel.roofline(ds, H200, mfu=1.0, mbu=1.0, context_len=0)
    n, kv = np.array([8192.0]), np.array([4096.0])
    pre = one(c.attention_time(n, np.array([1]), kv)) - H200.kernel_launch * 6
    flops = 8192 * (2 * (187_105_280 + 3 * 7168 * 2048) + 4096 * 2 * 128 * 320)
    assert pre == pytest.approx(flops / H200.peak_flops, rel=1e-9)


def test_shared_expert_width() -> None:
    q2 = get_model(str(FIX / "qwen1.5-moe-a2.7b.json"))
    a = attention_shape(q2)["params"]
    c = CostModel.roofline(q2, H200)
    assert c.attention["bytes_fixed"] == (a + 3 * 2048 * 5632) * 2
    no_shared = CostModel.roofline(q2.with_(num_shared_experts=0), H200)
    assert no_shared.attention["bytes_fixed"] == a * 2


def _calibration(tmp_path: Path, eff: float) -> tuple[Path, list[dict]]:
    """Fused-MoE entries whose measured time is exactly the H200 roofline / ``eff``."""
    entries = []
    for H, F, E, k in ((4096, 14336, 8, 2), (7168, 2048, 256, 8)):
        for T in (1, 16, 256, 4096, 16384):
            ch = T * k
            act = min(E, ch)
            flops, nbytes = 6.0 * H * F * ch, act * 3.0 * H * F * 2 + ch * 2.0 * H * 2
            ideal = max(flops / H200.peak_flops, nbytes / H200.hbm_bw)
            entries.append({"hidden_size": H, "ffn_size": F, "num_experts": E, "top_k": k, "tokens": T,
                            "seconds": ideal / eff, "active_experts": act})
    f = tmp_path / "cal.json"
    f.write_text(json.dumps({"format": "moesim.kernel-calibration", "version": 1, "device": "NVIDIA H200",
                             "dtype": "bfloat16", "entries": entries}))
    return f, entries


@settings(max_examples=10, deadline=None)
@given(eff=st.floats(0.2, 1.0), tokens=st.integers(1, 5000), kv=st.integers(0, 8000),
       model=st.sampled_from(["olmoe-1b-7b", "deepseek-v3", "qwen3-30b-a3b"]))
def test_flat_efficiency_curve_equals_constant_mfu_mbu(tmp_path_factory: pytest.TempPathFactory, eff: float,
                                                        tokens: int, kv: int, model: str) -> None:
    """A calibration measured at a constant fraction of the roofline gives the roofline at mfu = mbu = eff."""
    path, _ = _calibration(tmp_path_factory.mktemp("c"), eff)
    m = get_model(model)
    cal = CostModel.from_calibration(path, m, H200, context_len=0)
    ref = CostModel.roofline(m, H200, mfu=eff, mbu=eff, context_len=0)
    assert np.allclose(cal.attention["eff_y"], eff)
    n = np.array([float(tokens)])
    for ph in (0, 1):
        assert one(cal.attention_time(n, np.array([ph]), np.array([float(kv)]))) == pytest.approx(
            one(ref.attention_time(n, np.array([ph]), np.array([float(kv)]))), rel=1e-9)
    assert one(cal.gate_time(n)) == pytest.approx(one(ref.gate_time(n)), rel=1e-9)
    if m.hidden_size == 2048:  # no table for these shapes: the expert is the curve's roofline too
        slots = np.full((1, 8), float(tokens))
        assert one(cal.expert_time(slots)) == pytest.approx(one(ref.expert_time(slots)), rel=1e-9)


def test_efficiency_curve_of_the_h200_file(tmp_path: Path) -> None:
    """The measured H200 file: memory-bound kernels near 80-94 % of HBM, compute-bound ones near half of peak;
    a kernel at low intensity runs at the memory end of the curve."""
    from moesim.io import read_json

    doc = read_json(Path("/work/shared/gpu/h200-2026-12-04/kernel_calibration_NVIDIA_H200.json"), "x") \
        if Path("/work/shared/gpu/h200-2026-12-04/kernel_calibration_NVIDIA_H200.json").exists() else None
    if doc is None:
        pytest.skip("shared H200 calibration not present")
    curve = efficiency_curve(doc, H200)
    assert curve["peaks_matched"] and curve["points"] == len(doc["entries"])
    y = np.asarray(curve["y"])
    assert 0.75 < y[0] < 0.95 and 0.4 < y[-1] < 0.6


def test_bad_efficiency_curve() -> None:
    c = CostModel.roofline(get_model("tiny"), H200).to_dict()
    c["expert"]["eff_x"], c["expert"]["eff_y"] = [1.0, 0.0], [0.5, 0.5]
    with pytest.raises(MoesimError, match="eff_x"):
        CostModel.from_dict(c)


def test_modelspec_checks() -> None:
    with pytest.raises(MoesimError, match="bytes_per_param must be a positive number"):
        ModelSpec("x", 1, 8, 2, 64, 64, bytes_per_param=0)
    with pytest.raises(MoesimError, match="MLA"):
        ModelSpec("x", 1, 8, 2, 64, 64, kv_lora_rank=16)
    assert ModelSpec("x", 1, 8, 2, 64, 64, act_bytes=4).token_bytes == 256


def test_device_fp8_peak_field() -> None:
    from moesim.topo.devices import DeviceSpec

    d = DeviceSpec.from_dict({"name": "x", "peak_flops": 1e15, "hbm_bw": 3e12, "hbm_bytes": 8e10,
                              "peak_flops_fp8": 2e15})
    assert d.gemm_peak(True) == 2e15 and d.gemm_peak(False) == 1e15
    assert DeviceSpec.from_dict(d.to_dict()) == d
    with pytest.raises(MoesimError, match="peak_flops_fp8"):
        DeviceSpec.from_dict({"name": "x", "peak_flops": 1e15, "hbm_bw": 3e12, "hbm_bytes": 8e10,
                              "peak_flops_fp8": -1})
