"""The remap plan and the weight fingerprint (single process; the collective part is in test_ep.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")  # the runtime needs torch; moesim itself does not

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moesim.runtime.moe_layer import local_rows
from moesim.runtime.remap import fingerprint, plan_moves
from moesim.runtime.testing import random_mapping


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), gpus=st.sampled_from([1, 2, 4]), extra_old=st.integers(0, 2),
       experts=st.sampled_from([4, 8, 16]))
def test_plan_moves_exactly_what_is_missing(seed: int, gpus: int, extra_old: int, experts: int) -> None:
    rng = np.random.default_rng(seed)
    old = random_mapping(rng, 3, experts, gpus, extra_old)
    new = random_mapping(rng, 3, experts, gpus, extra_old)
    moves = plan_moves(old, new)
    for layer in range(3):
        for g in range(gpus):
            have, want = set(local_rows(old, layer, g)), set(local_rows(new, layer, g))
            incoming = [m for m in moves if m.layer == layer and m.dst == g]
            assert sorted(m.expert for m in incoming) == sorted(want - have)  # only what is missing, once
            for m in incoming:
                assert m.expert in local_rows(old, layer, m.src) and m.src != g  # from a real holder
            # the rows freed by departing experts can take the arrivals (S rows per rank)
            assert len(have & want) + len(incoming) <= old.slots_per_gpu
    assert plan_moves(old, old) == []


def test_fingerprint_sees_any_change() -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(64, 32, generator=gen).to(dtype)
        f = fingerprint(x)
        assert torch.equal(f, fingerprint(x.clone()))
        y = x.clone()
        y[3, 5], y[5, 3] = x[5, 3], x[3, 5]  # a swap keeps the sum: the position-weighted hash still differs
        if not torch.equal(x[3, 5], x[5, 3]):
            assert not torch.equal(f, fingerprint(y))
        z = x.clone().view(-1)
        z[100] = torch.nextafter(z[100].float(), torch.tensor(1e9)).to(dtype) if dtype == torch.float32 else -z[100]
        assert not torch.equal(f, fingerprint(z.view_as(x)))
