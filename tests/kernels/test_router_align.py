"""Triton router and alignment kernels vs. the torch references (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moesim.kernels import reference

from moesim import kernels

FAST = settings(max_examples=12, deadline=None)
# CPU: the interpreter; on a GPU machine the same tests run the compiled kernels on the GPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _distinct_logits(t: int, e: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Random logits in [-4, 4] with no ties within a row after the cast or a sigmoid (ties make the top-k order
    implementation-defined): a permutation on a grid of step 8/e plus noise smaller than the step."""
    g = torch.Generator().manual_seed(seed)
    base = torch.stack([torch.randperm(e, generator=g) for _ in range(t)]).float()
    step = 8.0 / max(e, 1)
    return (base * step - 4.0 + 0.05 * step * torch.rand(t, e, generator=g)).to(device=DEVICE, dtype=dtype)


@FAST
@given(t=st.integers(1, 300), e=st.integers(1, 64), data=st.data(), renorm=st.booleans(),
       dtype=st.sampled_from([torch.float16, torch.float32]))
def test_topk_softmax_matches_reference(t: int, e: int, data: st.DataObject, renorm: bool,
                                        dtype: torch.dtype) -> None:
    k = data.draw(st.integers(1, min(8, e)))
    logits = _distinct_logits(t, e, data.draw(st.integers(0, 2**16)), dtype)
    w, ids = kernels.topk_softmax(logits, k, renorm, impl="triton")
    w_ref, ids_ref = reference.topk_softmax_ref(logits, k, renorm)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)


@FAST
@given(t=st.integers(1, 300), groups=st.sampled_from([1, 2, 4, 8]), size=st.integers(1, 8), data=st.data(),
       with_bias=st.booleans(), dtype=st.sampled_from([torch.float16, torch.float32]))
def test_grouped_topk_matches_reference(t: int, groups: int, size: int, data: st.DataObject, with_bias: bool,
                                        dtype: torch.dtype) -> None:
    e = groups * size
    keep = data.draw(st.integers(1, groups))
    k = data.draw(st.integers(1, min(8, keep * size)))
    seed = data.draw(st.integers(0, 2**16))
    logits = _distinct_logits(t, e, seed, dtype)
    bias = _distinct_logits(1, e, seed + 1, torch.float32)[0] * 0.3 if with_bias else None
    w, ids = kernels.grouped_topk(logits, bias, k, groups, keep, scaling=2.5, impl="triton")
    w_ref, ids_ref = reference.grouped_topk_ref(logits, bias, k, groups, keep, scaling=2.5)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)


def test_grouped_topk_deepseek_v3_shape() -> None:
    """256 experts, 8 groups, top-4 groups, top-8, scaling 2.5: the real DeepSeek-V3 router configuration."""
    logits = _distinct_logits(40, 256, 7, torch.float32)
    bias = torch.linspace(-0.2, 0.2, 256, device=DEVICE)
    w, ids = kernels.grouped_topk(logits, bias, 8, 8, 4, scaling=2.5, impl="triton")
    w_ref, ids_ref = reference.grouped_topk_ref(logits, bias, 8, 8, 4, scaling=2.5)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(w.sum(1), torch.full((40,), 2.5, device=DEVICE))
    assert max(len({int(x) // 32 for x in row}) for row in ids) <= 4


def _routing(draw: st.DrawFn, t: int, e_glob: int, k: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "one_expert":
        return torch.full((t, k), draw(st.integers(0, e_glob - 1)), dtype=torch.int64)
    if kind == "few_experts":  # most experts get no token
        pool = torch.randperm(e_glob, generator=g)[: max(1, e_glob // 8)]
        return pool[torch.randint(0, pool.numel(), (t, k), generator=g)]
    return torch.randint(0, e_glob, (t, k), generator=g)


@FAST
@given(t=st.integers(1, 300), e=st.integers(1, 64), k=st.integers(1, 8), block_m=st.sampled_from([1, 4, 16, 64]),
       kind=st.sampled_from(["uniform", "one_expert", "few_experts"]), use_map=st.booleans(),
       ids_dtype=st.sampled_from([torch.int32, torch.int64]), data=st.data())
def test_moe_align_matches_reference(t: int, e: int, k: int, block_m: int, kind: str, use_map: bool,
                                     ids_dtype: torch.dtype, data: st.DataObject) -> None:
    seed = data.draw(st.integers(0, 2**16))
    ids = _routing(data.draw, t, e, k, kind, seed).to(device=DEVICE, dtype=ids_dtype)
    emap, e_loc = None, e
    if use_map:
        local = torch.randperm(e, generator=torch.Generator().manual_seed(seed))[: data.draw(st.integers(1, e))]
        emap = torch.full((e,), -1, dtype=torch.int32)
        emap[local] = torch.arange(local.numel(), dtype=torch.int32)
        emap = emap.to(DEVICE)
        e_loc = local.numel()
    got = kernels.moe_align(ids, e_loc, block_m, emap, impl="triton")
    ref = reference.moe_align_ref(ids, e_loc, block_m, emap)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype == torch.int32
        assert torch.equal(a, b)
    sorted_ids, blocks, n = got
    n = int(n)
    assert n % block_m == 0 and n <= sorted_ids.numel()
    real = sorted_ids[:n][sorted_ids[:n] < t * k].long()
    local = ids.long().reshape(-1) if emap is None else emap.long()[ids.long().reshape(-1)]
    assert sorted(real.tolist()) == torch.nonzero(local >= 0).flatten().tolist()  # every resident slot, once
    assert torch.equal(local[real], blocks.long().repeat_interleave(block_m)[:n][sorted_ids[:n] < t * k])


def test_moe_align_all_remote_is_empty() -> None:
    ids = torch.ones(5, 2, dtype=torch.int64, device=DEVICE)
    emap = torch.tensor([0, -1, 1], device=DEVICE)
    sorted_ids, blocks, n = kernels.moe_align(ids, 2, 16, emap, impl="triton")
    assert int(n) == 0 and torch.all(blocks == -1) and torch.all(sorted_ids == 10)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 4096])
def test_router_and_align_on_gpu(t: int) -> None:
    logits = _distinct_logits(t, 256, 3, torch.bfloat16)
    bias = torch.linspace(-0.1, 0.1, 256, device="cuda")
    w, ids = kernels.grouped_topk(logits, bias, 8, 8, 4, 2.5)
    w_ref, ids_ref = reference.grouped_topk_ref(logits, bias, 8, 8, 4, 2.5)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref)
    w, ids = kernels.topk_softmax(logits[:, :8], 2)
    assert torch.equal(ids, reference.topk_softmax_ref(logits[:, :8], 2)[1])
    for a, b in zip(kernels.moe_align(ids_ref, 256, 64), reference.moe_align_ref(ids_ref, 256, 64)):
        assert torch.equal(a, b)
