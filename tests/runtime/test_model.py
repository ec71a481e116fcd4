"""Single-process tests of the runtime's model, weights and checkpoint loading."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")  # the runtime needs torch; moesim itself does not

import numpy as np
import torch
from moesim.runtime.config import RunConfig, check_checkpoint, expected_tensors, validate
from moesim.runtime.model import build_decoder, make_tokens
from moesim.runtime.moe_layer import load_store
from moesim.runtime.weights import SafetensorsWeights, SeededWeights, save_checkpoint

from moesim.errors import MoesimError
from moesim.mapping import ExpertMapping
from moesim.models import get_model

torch.set_num_threads(1)


def _model(preset: str = "tiny", seed: int = 0, **changes):
    spec = get_model(preset).with_(**changes) if changes else get_model(preset)
    return spec, build_decoder(spec, SeededWeights(spec, seed), "cpu", torch.float32)


@pytest.mark.parametrize("preset", ["tiny", "tiny-deepseek"])
def test_kv_cache_decode_matches_full_forward(preset: str) -> None:
    """Prefill + one-token decode steps give the logits a single pass over the whole sequence gives."""
    spec, model = _model(preset)
    tokens = make_tokens(1, 0, 0, (2, 9), spec.vocab_size)
    full = model.forward(tokens, model.new_cache(2, 9))
    cache = model.new_cache(2, 9)
    parts = [model.forward(tokens[:, :6], cache)] + [model.forward(tokens[:, i:i + 1], cache) for i in range(6, 9)]
    inc = torch.cat(parts, dim=1)
    assert cache.length == 9
    torch.testing.assert_close(inc, full, rtol=1e-5, atol=1e-5)


def test_sliding_window_changes_attention_and_keeps_cache_consistent() -> None:
    spec, windowed = _model("tiny", sliding_window=3)
    _, plain = _model("tiny")
    tokens = make_tokens(2, 0, 0, (1, 8), spec.vocab_size)
    a = windowed.forward(tokens, windowed.new_cache(1, 8))
    b = plain.forward(tokens, plain.new_cache(1, 8))
    torch.testing.assert_close(a[:, :3], b[:, :3], rtol=1e-5, atol=1e-5)  # inside the window: identical
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3  # beyond it: older keys are masked out
    cache = windowed.new_cache(1, 8)
    inc = torch.cat([windowed.forward(tokens[:, :5], cache)] + [windowed.forward(tokens[:, i:i + 1], cache)
                                                                for i in range(5, 8)], dim=1)
    torch.testing.assert_close(inc, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 3, 6])
@pytest.mark.parametrize("chunks", [[9], [6, 1, 1, 1], [4, 3, 2], [1] * 9])
def test_attention_equals_explicit_masked_attention(window, chunks) -> None:
    """Every mask shortcut (decode without a mask, first prefill as is_causal, GQA without copies) gives what a
    plain softmax over the explicitly masked scores gives, chunked prefill and sliding windows included."""
    spec, model = _model("tiny", sliding_window=window) if window else _model("tiny")
    assert spec.num_attention_heads != spec.num_kv_heads  # the GQA path is exercised
    torch.manual_seed(0)
    B, H = 2, spec.hidden_size
    x = torch.randn(B, sum(chunks), H)
    cache = model.new_cache(B, sum(chunks))
    got, start = [], 0
    for n in chunks:
        got.append(model.attention(0, x[:, start:start + n], cache))
        cache.length += n
        start += n
    lay, nh, kvh, hd = model.layers[0], spec.num_attention_heads, spec.num_kv_heads, spec.head_dim
    from moesim.runtime.model import rotary

    T = x.shape[1]
    pos = torch.arange(T)
    q = rotary((x @ lay.q.t()).view(B, T, nh, hd).transpose(1, 2), pos, spec.rope_theta)
    k = rotary((x @ lay.k.t()).view(B, T, kvh, hd).transpose(1, 2), pos, spec.rope_theta)
    v = (x @ lay.v.t()).view(B, T, kvh, hd).transpose(1, 2)
    k, v = k.repeat_interleave(nh // kvh, dim=1), v.repeat_interleave(nh // kvh, dim=1)
    allowed = pos[None, :] <= pos[:, None]
    if window:
        allowed &= pos[:, None] - pos[None, :] < window
    scores = (q @ k.transpose(-1, -2)) / hd ** 0.5
    ref = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    ref = ref.transpose(1, 2).reshape(B, T, -1) @ lay.o.t()
    torch.testing.assert_close(torch.cat(got, dim=1), ref, rtol=1e-5, atol=1e-5)


def test_routers_follow_their_conventions() -> None:
    from moesim.runtime.model import StepContext

    for preset in ("tiny", "tiny-deepseek"):
        spec, model = _model(preset)
        ctx = StepContext()
        model.forward(make_tokens(0, 0, 0, (2, 5), spec.vocab_size), model.new_cache(2, 5), ctx)
        assert len(ctx.routing) == spec.num_layers
        ids, w = ctx.routing[0], ctx.router_weights[0]
        assert ids.shape == (10, spec.top_k) and int(ids.max()) < spec.num_experts
        assert all(len(set(row)) == spec.top_k for row in ids.tolist())  # distinct experts per token
        torch.testing.assert_close(w.sum(-1), torch.full((10,), spec.routed_scaling_factor))
        if spec.router == "sigmoid_grouped":  # group-limited: at most topk_groups groups per token
            groups = ids // (spec.num_experts // spec.num_groups)
            assert max(len(set(g)) for g in groups.tolist()) <= spec.topk_groups


def test_seeded_weights_are_per_tensor_and_reproducible() -> None:
    spec = get_model("tiny")
    a, b, c = SeededWeights(spec, 0), SeededWeights(spec, 0), SeededWeights(spec, 1)
    name = "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    assert torch.equal(a.get(name), b.get(name))
    assert not torch.equal(a.get(name), c.get(name))
    assert not torch.equal(a.get(name), a.get(name.replace("experts.3", "experts.4")))
    with pytest.raises(MoesimError, match="no tensor"):
        a.get("model.layers.9.mlp.weight")


def test_safetensors_checkpoint_round_trip(tmp_path) -> None:
    spec = get_model("tiny-deepseek")
    save_checkpoint(SeededWeights(spec, 7), tmp_path / "ckpt", shard_every=40)
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1
    loaded = build_decoder(spec, SafetensorsWeights(spec, tmp_path / "ckpt"), "cpu", torch.float32)
    seeded = build_decoder(spec, SeededWeights(spec, 7), "cpu", torch.float32)
    tokens = make_tokens(0, 0, 0, (2, 4), spec.vocab_size)
    assert torch.equal(loaded.forward(tokens, loaded.new_cache(2, 4)), seeded.forward(tokens, seeded.new_cache(2, 4)))


class _Counting(SeededWeights):
    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.read: set[str] = set()

    def get(self, name: str) -> torch.Tensor:
        self.read.add(name)
        return super().get(name)


def test_each_rank_reads_only_its_experts(tmp_path) -> None:
    spec = get_model("tiny")
    mapping = ExpertMapping(np.array([[3, 5, 3, 0, 1, 2, 4, 6, 7, 0], [7, 6, 5, 4, 3, 2, 1, 0, 1, 1]]), 2, 8)
    src = _Counting(spec, 0)
    store = load_store(src, spec, mapping, 0, 0, "cpu", torch.float32)
    read = {(int(n.split(".")[2]), int(n.split(".")[5])) for n in src.read if ".experts." in n}
    assert read == {(0, 3), (0, 5), (0, 0), (0, 1)}
    assert store.row_expert == [3, 5, 0, 1, -1]  # duplicate slot shares a row; the spare row is free
    w13, w2 = SeededWeights(spec, 0).expert(0, 5)
    assert torch.equal(store.w13[1], w13) and torch.equal(store.w2[1], w2)
    # and from a checkpoint: the same rows
    save_checkpoint(SeededWeights(spec, 0), tmp_path / "c")
    store2 = load_store(SafetensorsWeights(spec, tmp_path / "c"), spec, mapping, 0, 0, "cpu", torch.float32)
    assert torch.equal(store.w13, store2.w13)


def test_bad_checkpoints_give_one_line_errors(tmp_path) -> None:
    spec = get_model("tiny")
    with pytest.raises(MoesimError, match="does not exist"):
        check_checkpoint(tmp_path / "nope", spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoesimError, match=r"no \*\.safetensors"):
        check_checkpoint(tmp_path / "empty", spec)
    save_checkpoint(SeededWeights(get_model("small"), 0), tmp_path / "small")
    with pytest.raises(MoesimError, match="has shape") as exc:
        check_checkpoint(tmp_path / "small", spec)
    assert "\n" not in str(exc.value)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(MoesimError, match="safetensors"):
        check_checkpoint(tmp_path / "junk", spec)
    from safetensors.torch import save_file

    partial = {n: torch.zeros(s) for n, s in list(expected_tensors(spec).items())[:5]}
    (tmp_path / "part").mkdir()
    save_file(partial, str(tmp_path / "part" / "m.safetensors"))
    with pytest.raises(MoesimError, match="lacks"):
        check_checkpoint(tmp_path / "part", spec)


def test_validate_rejects_bad_runs(tmp_path) -> None:
    ExpertMapping.linear(4, 8, 2).save(tmp_path / "small.json")
    with pytest.raises(MoesimError, match="layers"):
        validate(RunConfig(preset="tiny", nproc=2, mapping=str(tmp_path / "small.json")))
    with pytest.raises(MoesimError, match="does not divide"):
        validate(RunConfig(preset="tiny", nproc=3))
    with pytest.raises(MoesimError, match="dense FFN"):
        validate(RunConfig(preset="deepseek-v3", nproc=8))
    with pytest.raises(MoesimError, match="remap-at step"):
        validate(RunConfig(preset="tiny", nproc=2, steps=3, remap_at=[(5, str(tmp_path / "small.json"))]))
    ExpertMapping.linear(2, 8, 2, slots_per_gpu=5).save(tmp_path / "r.json")
    ExpertMapping.linear(2, 8, 2).save(tmp_path / "l.json")
    with pytest.raises(MoesimError, match="slots per GPU"):
        validate(RunConfig(preset="tiny", nproc=2, mapping=str(tmp_path / "r.json"),
                           remap_at=[(2, str(tmp_path / "l.json"))]))
    with pytest.raises(MoesimError, match="replica policy"):
        validate(RunConfig(preset="tiny", nproc=2, policy="nearest"))
    _spec, mapping, remaps = validate(RunConfig(preset="tiny", nproc=2, mapping=str(tmp_path / "r.json")))
    assert mapping.slots_per_gpu == 5 and remaps == []
