"""benchmarks/bench_runtime.py: the GPU-busy arithmetic, run summaries, the transformers twin, the CPU smoke run."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
bench = importlib.import_module("bench_runtime")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 10)), max_size=12))
def test_union_length_counts_each_covered_instant_once(spans) -> None:
    intervals = [(float(a), float(a + d)) for a, d in spans]
    covered = {t for a, d in spans for t in range(a, a + d)}  # unit cells on an integer grid
    assert bench.union_length(intervals) == pytest.approx(len(covered))


def _trace(layers: int, prefill_chunks: int, decode: int) -> tuple[dict, list[float]]:
    """A synthetic Chrome trace: attention ranges per layer and step, one launch + kernel pair per range, and a
    second kernel overlapping the first in every decode step; expected busy seconds of the decode steps."""
    ev, t, corr, expected = [], 0.0, 0, []
    for step in range(prefill_chunks + decode):
        busy = 0.0
        for _layer in range(layers):
            ev.append({"name": "moesim.attention", "cat": "user_annotation", "ph": "X", "ts": t, "dur": 5.0})
            for dt, dur in ((1.0, 10.0), (2.0, 4.0)):  # the second kernel lies inside the first
                corr += 1
                ev.append({"name": "cudaLaunchKernel", "cat": "cuda_runtime", "ph": "X", "ts": t + dt, "dur": 1.0,
                           "args": {"correlation": corr}})
                ev.append({"name": "k", "cat": "kernel", "ph": "X", "ts": 1000.0 + t + dt, "dur": dur,
                           "args": {"correlation": corr}})
            busy += 10.0
            t += 20.0
        if step >= prefill_chunks:
            expected.append(busy * 1e-6)
    ev.append({"name": "k", "cat": "kernel", "ph": "X", "ts": 0.0, "dur": 99.0, "args": {"correlation": -1}})
    return {"traceEvents": ev}, expected[:-1]


@pytest.mark.parametrize("chunks", [1, 3])
def test_busy_per_step_takes_the_decode_steps_after_any_number_of_prefill_chunks(chunks) -> None:
    doc, expected = _trace(layers=2, prefill_chunks=chunks, decode=4)
    got = bench.busy_per_step(doc, num_layers=2, decode_steps=4)
    assert got == pytest.approx(expected) and len(got) == 3
    with pytest.raises(bench.MoesimError, match="attention ranges"):
        bench.busy_per_step(doc, num_layers=2, decode_steps=9)


def test_summarize_run_sums_prefill_chunks_and_leaves_warmup_out() -> None:
    steps = [{"phase": "prefill", "wall_s": 9.0, "warmup": True}, {"phase": "prefill", "wall_s": 0.5},
             {"phase": "prefill", "wall_s": 0.25}, {"phase": "decode", "wall_s": 0.1}, {"phase": "decode",
                                                                                         "wall_s": 0.3},
             {"phase": "decode", "wall_s": 0.2}]
    s = bench.summarize_run({"steps": steps, "warmup_s": 1.5}, process_wall=20.0)
    assert s["prefill_s"] == 0.75 and s["decode_s"] == pytest.approx(0.2) and s["prefill_chunks"] == 2
    assert s["start_s"] == pytest.approx(20.0 - 10.35) and s["warmup"] == 1.5
    # under graphs the served step is a replay: the eager (timed) decode steps stay out of the median
    graphed = [*steps[:3], {"phase": "decode", "wall_s": 0.9, "graph": False},
               *({"phase": "decode", "wall_s": w, "graph": True} for w in (0.01, 0.02, 0.03))]
    g = bench.summarize_run({"steps": graphed})
    assert g["decode_s"] == pytest.approx(0.02) and g["replayed_steps"] == 3
    with pytest.raises(bench.MoesimError):
        bench.summarize_run({"steps": steps[:3]})


def test_ratios_and_markdown() -> None:
    row = {"preset": "tiny", "batch": 2, "context": 16, "graphs_mode": True, "busy_s": 0.004,
           "ours": {"decode_s": 0.01, "prefill_s": 0.3, "start_s": 2.0, "warmup": None},
           "eager": {"decode_s": 0.05}, "roofline": {"decode_s": 0.005, "prefill_s": 0.1},
           "hf": {"decode_s": 0.06, "prefill_s": 0.9, "kept_init": []}}
    q = bench.ratios(row)
    assert q == pytest.approx({"step_over_busy": 2.5, "step_over_roofline": 2.0, "eager_over_graphs": 5.0,
                               "hf_over_ours": 6.0, "prefill_over_roofline": 3.0})
    meta = {"graphs_flag": True, "device_name": "X", "command": "c", "date": "d", "torch": "t",
            "transformers": "v", "datasheet": "h200", "steps": 8}
    md = bench.markdown([row, {"preset": "big", "batch": 256, "context": 2048, "skipped": "needs ~200 GiB"}], meta)
    assert "| tiny | 2 | 16 | 10.00 | 50.00 | 4.00 | 5.00 | 60.00 | 2.50× | 2.00× | 6.00× | 300.00 |" in md
    assert "needs ~200 GiB" in md and "with CUDA graphs" in md


TWIN = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from hf_moe import build_hf_model, source_tensor
from moesim.models import get_model
from moesim.runtime.model import build_decoder, make_tokens
from moesim.runtime.weights import SeededWeights

spec = get_model("tiny")
src = SeededWeights(spec, 3)
hf, kept = build_hf_model(spec, src, "cpu", torch.float32, 32)
assert kept == [] and type(hf).__name__ == "MixtralForCausalLM"
ours = build_decoder(spec, src, "cpu", torch.float32)
tok = make_tokens(0, 0, 0, (2, 6), spec.vocab_size)
torch.testing.assert_close(hf(input_ids=tok).logits, ours.forward(tok, ours.new_cache(2, 6)), rtol=1e-5, atol=1e-5)
# both expert layouts of transformers map onto the runtime's tensors
w3 = src.get("model.layers.1.block_sparse_moe.experts.5.w3.weight")
for name in ("model.layers.1.mlp.experts.5.up_proj.weight", "model.layers.1.block_sparse_moe.experts.5.w3.weight"):
    assert torch.equal(source_tensor(name, w3, src), w3)
fused = source_tensor("model.layers.1.mlp.experts.gate_up_proj", torch.empty(8, 2, 2), src)
assert torch.equal(fused[5, spec.ffn_size:], w3)
assert source_tensor("model.layers.1.self_attn.q_norm.weight", w3, src) is None
print("twin ok")
"""


def test_the_transformers_twin_holds_the_runtimes_weights_and_computes_its_function(tmp_path) -> None:
    """HF MixtralForCausalLM with the seeded weights gives the runtime's logits. Run outside the repository root:
    there the repo's ``kernels/`` folder would shadow the ``kernels`` package transformers probes for."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", TWIN, str(REPO / "benchmarks")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "twin ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.dist
def test_cpu_smoke_run_writes_markdown_and_json(tmp_path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "b.md"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_runtime.py"), "--device", "cpu",
                           "--smoke", "--no-hf", "--out", str(out)], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    (row,) = doc["rows"]
    assert "error" not in row, row.get("error")
    assert row["ours"]["decode_s"] > 0 and row["roofline"]["decode_s"] > 0 and row["ours"]["start_s"] > 0
    assert bench.ratios(row)["step_over_roofline"] == pytest.approx(row["ours"]["decode_s"]
                                                                    / row["roofline"]["decode_s"])
    assert "| tiny | 2 | 16 |" in out.read_text()


def test_cuda_without_a_gpu_is_one_line(capsys) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench.main(["--device", "cuda", "--short"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err
