"""--routing uniform is uniform; chunked routing does not depend on threads; trace synth --model list needs no --out."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from moesim.cli import main
from moesim.models import get_model
from moesim.trace import synth
from moesim.trace.synth import SynthConfig, generate_steps


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b", "tiny-deepseek"])
def test_uniform_routing_is_uniform(name: str) -> None:
    """Chi-square of every layer's expert counts against tokens·k/E; the model routing fails the same test."""
    m = get_model(name)
    m = m.with_(num_layers=min(m.num_layers, 4))
    T = 4096

    def pvalues(routing: str) -> np.ndarray:
        ids, _, _, _ = next(generate_steps(m, SynthConfig(steps=1, tokens=T, routing=routing, seed=3), threads=1))
        counts = np.stack([np.bincount(ids[layer].ravel(), minlength=m.num_experts) for layer in range(m.num_layers)])
        assert (counts.sum(axis=1) == T * m.top_k).all()
        return np.array([stats.chisquare(c).pvalue for c in counts])

    uni = pvalues("uniform")
    # 4 layers x 3 models: all p-values above 1e-4 unless the sampler is biased (false alarm odds ~1e-3)
    assert uni.min() > 1e-4, uni
    assert pvalues("model").max() < 1e-6  # skewed routing is detected by the same test


def test_uniform_pairs_are_uniform_too() -> None:
    """Each token's k experts are a uniform k-subset: with top-2 of 8, all 28 pairs are equally frequent."""
    m = get_model("mixtral-8x7b").with_(num_layers=1)
    ids, _, _, _ = next(generate_steps(m, SynthConfig(steps=1, tokens=28 * 400, routing="uniform", seed=1)))
    a, b = np.sort(ids[0], axis=1).T
    pair = np.bincount(a * 8 + b, minlength=64).reshape(8, 8)[np.triu_indices(8, 1)]
    assert stats.chisquare(pair).pvalue > 1e-4


def test_chunks_and_threads_do_not_change_the_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "CHUNK_TOKENS", 16)
    m = get_model("tiny-deepseek")
    cfg = SynthConfig(steps=3, tokens=100, decode_tokens=40, seed=9)
    a = list(generate_steps(m, cfg, threads=1))
    b = list(generate_steps(m, cfg, threads=3))
    for (i1, w1, o1, p1), (i2, w2, o2, p2) in zip(a, b, strict=True):
        assert i1.shape == (m.num_layers, len(o1), m.top_k)
        assert np.array_equal(i1, i2) and np.array_equal(w1, w2) and np.array_equal(o1, o2) and p1 == p2


def test_cli_list_without_out_and_uniform(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "synth", "--model", "list"]) == 0
    assert "deepseek-v3" in capsys.readouterr().out
    assert main(["trace", "synth", "--model", "tiny"]) == 2
    assert "needs --out" in capsys.readouterr().err
    out = tmp_path / "u.mtrace"
    assert main(["trace", "synth", "--model", "tiny", "--routing", "uniform", "--steps", "2", "--tokens", "64",
                 "--out", str(out)]) == 0
    from moesim.trace import Trace

    with Trace.open(out) as t:
        assert t.meta["synth"]["routing"] == "uniform" and t.meta["synth"]["skew"] == 0.0
    assert main(["trace", "synth", "--model", "tiny", "--routing", "uniform", "--skew", "1", "--out", str(out)]) == 2
    with pytest.raises(SystemExit) as exc:  # argparse's own usage error: exit 2
        main(["trace", "synth", "--model", "tiny", "--routing", "even", "--out", str(out)])
    assert exc.value.code == 2
