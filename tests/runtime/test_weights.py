"""Seeded weights drawn on the device they are asked for: deterministic per (seed, name, device type)."""

from __future__ import annotations

import math
import zlib

import pytest

torch = pytest.importorskip("torch")

from moesim.runtime.weights import SafetensorsWeights, SeededWeights, save_checkpoint, weight_source  # noqa: E402

from moesim.models import get_model  # noqa: E402

W1 = "model.layers.1.block_sparse_moe.experts.3.w1.weight"


def test_cpu_draws_are_unchanged_and_explicit_cpu_is_the_default() -> None:
    spec = get_model("tiny")
    default, explicit = SeededWeights(spec, 5), SeededWeights(spec, 5, device="cpu")
    # the numbers every earlier CPU run used: one CPU generator per tensor seeded by crc32("seed:name")
    gen = torch.Generator().manual_seed(zlib.crc32(f"5:{W1}".encode()))
    shape = default.shapes[W1]
    ref = torch.randn(shape, generator=gen, dtype=torch.float32) / math.sqrt(shape[-1])
    assert torch.equal(default.get(W1), ref) and torch.equal(explicit.get(W1), ref)
    assert default.get(W1).device.type == "cpu" and default.get(W1).dtype == torch.float32


def test_weight_source_passes_the_device_to_both_kinds(tmp_path) -> None:
    spec = get_model("tiny")
    assert weight_source(spec, None, 3, device="cpu").device == torch.device("cpu")
    save_checkpoint(SeededWeights(spec, 3), tmp_path / "ck")
    src = weight_source(spec, tmp_path / "ck", 0, device="cpu")
    assert isinstance(src, SafetensorsWeights) and torch.equal(src.get(W1), SeededWeights(spec, 3).get(W1))


def _check_scale(src: SeededWeights) -> None:
    w = src.get(W1)  # [F, H]: std 1/sqrt(H)
    assert w.std().item() == pytest.approx(1 / math.sqrt(w.shape[-1]), rel=0.05)
    ln = src.get("model.layers.0.input_layernorm.weight")
    assert ln.mean().item() == pytest.approx(1.0, abs=0.05)


def test_scales_keep_activations_of_order_one() -> None:
    _check_scale(SeededWeights(get_model("small"), 0))


@pytest.mark.gpu
def test_seeded_weights_on_the_gpu_are_drawn_there_and_reproducible() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    spec = get_model("small")
    a, b, c = (SeededWeights(spec, s, device="cuda") for s in (0, 0, 1))
    wa = a.get(W1)
    assert wa.device.type == "cuda" and wa.dtype == torch.float32
    assert torch.equal(wa, b.get(W1)) and not torch.equal(wa, c.get(W1))
    w13, _w2 = a.expert(1, 3)
    assert w13.device.type == "cuda" and torch.equal(w13[: w13.shape[0] // 2], wa)
    _check_scale(a)
