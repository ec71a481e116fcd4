"""The torch references against naive per-token loops (the references are the oracle for the Triton tests)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from moesim.kernels import reference

from moesim import kernels


def test_topk_softmax_renormalised() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(17, 8, generator=g)
    w, ids = kernels.topk_softmax(logits, 2)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64 and w.shape == (17, 2)
    for t in range(17):
        p = torch.softmax(logits[t], 0)
        order = sorted(range(8), key=lambda e: -float(p[e]))[:2]
        assert ids[t].tolist() == order
        torch.testing.assert_close(w[t], p[order] / p[order].sum())
    w_raw, _ = kernels.topk_softmax(logits, 2, renormalize=False)
    assert torch.all(w_raw.sum(1) < 1)


def _naive_grouped(logits, bias, k, groups, keep, scaling):
    t, e = logits.shape
    size = e // groups
    ws, ids = [], []
    for row in range(t):
        s = torch.sigmoid(logits[row].double())
        b = s + bias.double()
        gscore = [sorted(b[g * size:(g + 1) * size].tolist(), reverse=True)[:2] for g in range(groups)]
        gscore = [sum(x) for x in gscore]
        kept = sorted(range(groups), key=lambda g: -gscore[g])[:keep]
        cand = [x for x in range(e) if x // size in kept]
        chosen = sorted(cand, key=lambda x: -float(b[x]))[:k]
        w = s[chosen] / s[chosen].sum() * scaling
        ws.append(w)
        ids.append(chosen)
    return torch.stack(ws).float(), torch.tensor(ids)


def test_grouped_topk_matches_naive_deepseek_rule() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 32, generator=g)
    bias = torch.randn(32, generator=g) * 0.5  # large enough to change choices vs. unbiased
    w, ids = kernels.grouped_topk(logits, bias, 4, num_groups=8, topk_groups=3, scaling=2.5)
    w_ref, ids_ref = _naive_grouped(logits, bias, 4, 8, 3, 2.5)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(w.sum(1), torch.full((9,), 2.5))
    # every chosen expert lies in at most 3 groups
    assert all(len({int(x) // 4 for x in row}) <= 3 for row in ids)


def test_moe_align_segments() -> None:
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    expert_map = torch.tensor([0, -1, 1])  # expert 1 is not resident; global 2 is local 1
    sorted_ids, blocks, n = kernels.moe_align(ids, 2, 4, expert_map)
    assert n.tolist() == [8]
    assert sorted_ids[:8].tolist() == [1, 4, 6, 6, 0, 2, 5, 6]
    assert blocks.tolist()[:2] == [0, 1] and all(b == -1 for b in blocks.tolist()[2:])
    assert sorted_ids.numel() == reference.max_padded_slots(6, 2, 4)
    assert torch.all(sorted_ids[8:] == 6)


def _naive_moe(x, w13, w2, tw, ids, emap):
    f = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(emap[ids[t, j]]) if emap is not None else int(ids[t, j])
            if e < 0:
                continue
            gu = w13[e].double() @ x[t].double()
            out[t] += float(tw[t, j]) * (w2[e].double() @ (F.silu(gu[:f]) * gu[f:]))
    return out


@pytest.mark.parametrize("use_map", [False, True])
def test_fused_moe_ref_matches_naive(use_map: bool) -> None:
    g = torch.Generator().manual_seed(2)
    t, h, f, e_glob, k = 11, 24, 40, 6, 3
    emap = torch.tensor([0, -1, 1, -1, 2, 3]) if use_map else None
    e_loc = 4 if use_map else e_glob
    x = torch.randn(t, h, generator=g)
    w13 = torch.randn(e_loc, 2 * f, h, generator=g) * 0.2
    w2 = torch.randn(e_loc, h, f, generator=g) * 0.2
    logits = torch.randn(t, e_glob, generator=g)
    tw, ids = kernels.topk_softmax(logits, k)
    out = kernels.fused_moe(x, w13, w2, tw, ids, emap)
    torch.testing.assert_close(out.double(), _naive_moe(x, w13, w2, tw, ids, emap), rtol=1e-4, atol=1e-4)
    if use_map:
        all_remote = torch.ones_like(ids)  # global expert 1 is not resident → zero output
        assert torch.all(kernels.fused_moe(x, w13, w2, tw, all_remote, emap) == 0)


def test_entry_point_rejects_bad_input() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(kernels.KernelError, match="impl"):
        kernels.topk_softmax(x, 2, impl="cuda")
    with pytest.raises(kernels.KernelError, match="top-k"):
        kernels.topk_softmax(x, 9)
    with pytest.raises(kernels.KernelError, match="w2"):
        kernels.fused_moe(x, torch.randn(2, 6, 8), torch.randn(2, 8, 4), torch.ones(4, 1), torch.zeros(4, 1,
                          dtype=torch.int64))
    w13, w2 = torch.randn(2, 6, 8), torch.randn(2, 8, 3)
    with pytest.raises(kernels.KernelError, match=r"topk_ids must lie in \[0, 2\)"):
        kernels.fused_moe(x, w13, w2, torch.ones(4, 1), torch.full((4, 1), 2))
    with pytest.raises(kernels.KernelError, match="only 2 exist"):
        kernels.fused_moe(x, w13, w2, torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.int64), torch.tensor([5, 0]))
    with pytest.raises(kernels.KernelError, match="groups"):
        kernels.grouped_topk(torch.randn(3, 10), None, 2, num_groups=4, topk_groups=2)
