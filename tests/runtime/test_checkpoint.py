"""Hugging Face checkpoints: transformers-5 fused expert tensors load like the classic names; config.json gives
the shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from moesim.runtime.config import RunConfig, check_checkpoint, validate  # noqa: E402
from moesim.runtime.model import build_decoder, make_tokens  # noqa: E402
from moesim.runtime.weights import SafetensorsWeights, SeededWeights, save_checkpoint  # noqa: E402

from moesim.errors import MoesimError  # noqa: E402
from moesim.models import get_model  # noqa: E402


def save_fused(source: SeededWeights, folder: Path, shard: bool = True) -> None:
    """A transformers-5 Mixtral checkpoint, converted as its conversion_mapping.py does for "mixtral": per layer
    the experts' w1 and w3 merged (MergeModulelist dim 0) and concatenated (Concatenate dim 1) into
    mlp.experts.gate_up_proj [E, 2F, H], the w2 merged into mlp.experts.down_proj [E, H, F], and
    block_sparse_moe.gate renamed mlp.gate."""
    from safetensors.torch import save_file

    m = source.model
    tensors = {}
    for name in source.shapes:
        if ".experts." in name:
            continue
        tensors[name.replace(".block_sparse_moe.gate", ".mlp.gate")] = source.get(name)
    for i in range(m.num_layers):
        e = f"model.layers.{i}.block_sparse_moe.experts"
        w1 = torch.stack([source.get(f"{e}.{j}.w1.weight") for j in range(m.num_experts)])
        w3 = torch.stack([source.get(f"{e}.{j}.w3.weight") for j in range(m.num_experts)])
        tensors[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)
        tensors[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [source.get(f"{e}.{j}.w2.weight") for j in range(m.num_experts)])
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    parts = [names[: len(names) // 2], names[len(names) // 2:]] if shard else [names]
    for k, part in enumerate(parts):
        save_file({n: tensors[n].contiguous() for n in part}, str(folder / f"model-{k + 1:05d}-of-{len(parts):05d}"
                                                                             ".safetensors"))


def mixtral_config(spec) -> dict:
    """config.json as transformers' MixtralConfig writes it (the fields the shape needs)."""
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": spec.hidden_size,
            "intermediate_size": spec.ffn_size, "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim, "num_local_experts": spec.num_experts, "num_experts_per_tok": spec.top_k,
            "vocab_size": spec.vocab_size, "rope_theta": spec.rope_theta, "sliding_window": spec.sliding_window,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32"}


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_fused_checkpoint_gives_the_classic_models_logits(tmp_path, preset) -> None:
    spec = get_model(preset)
    seeded = SeededWeights(spec, 5)
    save_fused(seeded, tmp_path / "fused")
    save_checkpoint(seeded, tmp_path / "classic")
    check_checkpoint(tmp_path / "fused", spec)
    fused = SafetensorsWeights(spec, tmp_path / "fused")
    w13, w2 = fused.expert(1, 3)
    r13, r2 = seeded.expert(1, 3)
    assert torch.equal(w13, r13) and torch.equal(w2, r2)  # gate rows then up rows, as the classic w1 / w3
    tokens = make_tokens(0, 0, 0, (2, 5), spec.vocab_size)
    outs = []
    for src in (fused, SafetensorsWeights(spec, tmp_path / "classic"), seeded):
        model = build_decoder(spec, src, "cpu", torch.float32)
        outs.append(model.forward(tokens, model.new_cache(2, 5)))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_fused_checkpoint_errors_are_one_line(tmp_path) -> None:
    spec = get_model("tiny")
    save_fused(SeededWeights(get_model("small"), 0), tmp_path / "small")
    with pytest.raises(MoesimError, match="has shape") as err:
        check_checkpoint(tmp_path / "small", spec)
    assert "\n" not in str(err.value)


def test_config_json_gives_the_shape(tmp_path) -> None:
    spec = get_model("tiny")
    save_fused(SeededWeights(spec, 0), tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps(mixtral_config(spec)))
    got = RunConfig(preset=None, nproc=2, checkpoint=str(tmp_path / "ck")).model
    for f in ("num_layers", "num_experts", "top_k", "hidden_size", "ffn_size", "num_attention_heads", "num_kv_heads",
              "head_dim", "vocab_size"):
        assert getattr(got, f) == getattr(spec, f), f
    model, _, _ = validate(RunConfig(preset=None, nproc=2, checkpoint=str(tmp_path / "ck")))
    assert model.num_experts == 8
    (tmp_path / "nocfg").mkdir()
    with pytest.raises(MoesimError, match=r"no config\.json"):
        _ = RunConfig(preset=None, checkpoint=str(tmp_path / "nocfg")).model
    (tmp_path / "ck" / "config.json").write_text("{broken")
    with pytest.raises(MoesimError, match="not readable JSON"):
        _ = RunConfig(preset=None, checkpoint=str(tmp_path / "ck")).model


@pytest.mark.dist
def test_moesim_run_from_a_fused_checkpoint_folder(tmp_path, capsys) -> None:
    """`moesim run --checkpoint DIR` without --preset: the shape from DIR/config.json, fused experts loaded."""
    from moesim.cli import main
    from moesim.trace import Trace

    spec = get_model("small")
    save_fused(SeededWeights(spec, 3), tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps(mixtral_config(spec)))
    rc = main(["run", "--nproc", "2", "--steps", "2", "--checkpoint", str(tmp_path / "ck"), "--record",
               str(tmp_path / "rec"), "--batch", "1", "--prompt-len", "4"])
    assert rc == 0
    with Trace.open(tmp_path / "rec" / "trace.mtrace") as t:
        assert t.num_steps == 2 and t.model.num_layers == spec.num_layers and t.model.hidden_size == spec.hidden_size
