"""Models from Hugging Face config.json (fixtures follow the released files field for field)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moesim.cli import main
from moesim.errors import MoesimError
from moesim.models import PRESETS, get_model, spec_from_hf_config

FIX = Path(__file__).parent / "fixtures"


def _cfg(name: str) -> dict:
    return json.loads((FIX / f"{name}.json").read_text())


def test_deepseek_v3_config() -> None:
    m = get_model(str(FIX / "deepseek-v3.json"))
    # 61 layers, first_k_dense_replace 3 -> 58 MoE + 3 dense; MLA dims; FP8 weights with 128x128 float32 scales
    assert (m.num_layers, m.num_dense_layers, m.dense_ffn_size) == (58, 3, 18432)
    assert (m.num_experts, m.top_k, m.ffn_size, m.num_shared_experts, m.shared_expert_ffn) == (256, 8, 2048, 1, 2048)
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (
        1536, 512, 128, 64, 128)
    assert (m.router, m.num_groups, m.topk_groups, m.routed_scaling_factor) == ("sigmoid_grouped", 8, 4, 2.5)
    assert m.bytes_per_param == 1 + 4 / (128 * 128) and m.act_bytes == 2 and m.kv_bytes == 2
    # everything else equals the preset (which is bf16)
    assert m.with_(name="deepseek-v3", bytes_per_param=2) == PRESETS["deepseek-v3"]


def test_moe_layer_rules_and_shared_expert() -> None:
    q2 = spec_from_hf_config(_cfg("qwen1.5-moe-a2.7b"))
    assert (q2.num_layers, q2.num_experts, q2.top_k, q2.ffn_size) == (24, 60, 4, 1408)
    assert (q2.num_shared_experts, q2.shared_expert_ffn, q2.sliding_window) == (1, 5632, None)  # use_sliding_window off
    # decoder_sparse_step 2: layers 1, 3, ... are MoE; mlp_only_layers makes layer 3 dense too
    d = {**_cfg("qwen1.5-moe-a2.7b"), "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    q = spec_from_hf_config(d)
    assert (q.num_layers, q.num_dense_layers, q.dense_ffn_size) == (11, 13, 5632)
    # DeepSeek's moe_layer_freq: every second layer after the dense ones
    ds = spec_from_hf_config({**_cfg("deepseek-v3"), "moe_layer_freq": 2})
    assert (ds.num_layers, ds.num_dense_layers) == (29, 32)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "olmoe-1b-7b"])
def test_configs_equal_presets(name: str) -> None:
    m = get_model(str(FIX / f"{name}.json"))
    assert m.name == name and m == PRESETS[name]


def test_mixtral_config(tmp_path: Path) -> None:
    d = tmp_path / "Mixtral-8x7B-v0.1"
    d.mkdir()
    (d / "config.json").write_text((FIX / "mixtral-8x7b.json").read_text())
    m = get_model(str(d))  # a folder holding config.json
    assert m.name == "mixtral-8x7b-v0.1"
    # the released config has sliding_window null; the rest equals the preset
    assert m.sliding_window is None and m.with_(name="mixtral-8x7b", sliding_window=4096) == PRESETS["mixtral-8x7b"]
    # transformers 5 keeps rope_theta inside rope_parameters; head_dim None means hidden / heads
    c = {**_cfg("mixtral-8x7b"), "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "head_dim": None}
    c.pop("rope_theta")
    m5 = spec_from_hf_config(c)
    assert m5.rope_theta == 5e5 and m5.head_dim == 128


def test_precisions_from_config() -> None:
    assert spec_from_hf_config({**_cfg("olmoe-1b-7b"), "torch_dtype": "float32"}).act_bytes == 4
    per_tensor = {**_cfg("olmoe-1b-7b"), "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}
    assert spec_from_hf_config(per_tensor).bytes_per_param == 1.0
    blocks = {**_cfg("olmoe-1b-7b"), "quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 32]}}
    assert spec_from_hf_config(blocks).bytes_per_param == 1 + 4 / (64 * 32)


@pytest.mark.parametrize("change, match", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"num_experts": 0}, "num_experts must be an integer >= 1"),
    ({"num_experts_per_tok": "8"}, "num_experts_per_tok must be an integer"),
    ({"quantization_config": {"quant_method": "awq"}}, "quant_method 'awq'"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}, "weight_block_size"),
    ({"torch_dtype": "int4"}, "torch_dtype"),
])
def test_bad_configs(change: dict, match: str) -> None:
    with pytest.raises(MoesimError, match=match):
        spec_from_hf_config({**_cfg("olmoe-1b-7b"), **change})


def test_missing_field_and_file(tmp_path: Path) -> None:
    c = _cfg("olmoe-1b-7b")
    del c["hidden_size"]
    with pytest.raises(MoesimError, match="lacks 'hidden_size'"):
        spec_from_hf_config(c)
    with pytest.raises(MoesimError, match="does not exist"):
        get_model(str(tmp_path / "config.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(MoesimError, match="JSON object"):
        get_model(str(bad))


def test_cli_synth_from_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.mtrace"
    assert main(["trace", "synth", "--model", str(FIX / "olmoe-1b-7b.json"), "--steps", "2", "--tokens", "64",
                 "--out", str(out)]) == 0
    assert main(["trace", "show", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert shown["model_spec"]["num_experts"] == 64
    assert main(["trace", "synth", "--model", str(tmp_path / "nope" / "config.json"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
