"""`moesim replay` with the model/precision/topology knobs: --weight-dtype, --kv-dtype, --gpus, --nics, --cost CALIB."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.cli import main
from moesim.models import get_model
from moesim.trace import TraceWriter
from tests.sim.test_workload import random_ids


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    model = get_model("tiny")
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("trace") / "t.mtrace"
    with TraceWriter(path, model, origin=True, num_ranks=8) as w:
        for s, T in enumerate([64, 16, 16]):
            ids = random_ids(rng, model.num_layers, T, model.num_experts, model.top_k)
            w.add_step(ids, origin=np.arange(T) * 8 // T, phase="prefill" if s == 0 else "decode")
    return path


def _replay(trace_path, tmp_path, name: str, *extra: str) -> dict:
    out = tmp_path / name
    assert main(["replay", "--trace", str(trace_path), "--out", str(out), "--no-plots", "--quiet", *extra]) == 0
    return json.loads((out / "report.json").read_text())


def test_precisions_reach_the_cost_model(trace_path, tmp_path) -> None:
    base = _replay(trace_path, tmp_path, "bf16", "--topology", "dgx-h100")["inputs"]["cost_model"]
    fp8 = _replay(trace_path, tmp_path, "fp8", "--topology", "dgx-h100", "--weight-dtype", "fp8-block",
                  "--kv-dtype", "fp8")["inputs"]["cost_model"]
    h, f = 64, 128  # tiny
    assert base["expert"]["bytes_per_expert"] == 3 * h * f * 2
    assert fp8["expert"]["bytes_per_expert"] == pytest.approx(3 * h * f * (1 + 4 / 128**2))
    assert fp8["attention"]["kv_bytes_per_pos"] * 2 == base["attention"]["kv_bytes_per_pos"]
    assert fp8["expert"]["bytes_per_choice"] == base["expert"]["bytes_per_choice"]  # activations stay bf16


def test_gpus_and_nics_reach_the_replay(trace_path, tmp_path) -> None:
    doc = _replay(trace_path, tmp_path, "g", "--topology", "dgx-h100:2", "--gpus", "8")
    assert doc["inputs"]["num_gpus"] == 8 and doc["inputs"]["topology_name"] == "dgx-h100:2[gpus=8]"
    full = _replay(trace_path, tmp_path, "full", "--topology", "dgx-h100:2")
    narrow = _replay(trace_path, tmp_path, "narrow", "--topology", "dgx-h100:2", "--nics", "2", "--nic-bw", "5")
    assert full["inputs"]["num_gpus"] == narrow["inputs"]["num_gpus"] == 16
    # a quarter of the NICs at a tenth of the rate: the inter-node dispatch takes longer
    assert narrow["summary"]["step_latency_mean_s"] > full["summary"]["step_latency_mean_s"]


def test_cost_calibration_curve(trace_path, tmp_path) -> None:
    from tests.models.test_precision_mla import _calibration

    cal, _ = _calibration(tmp_path, 0.5)
    doc = _replay(trace_path, tmp_path, "cal", "--topology", "dgx-h200", "--cost", str(cal))
    eff = doc["inputs"]["cost_model"]["attention"]["eff_y"]
    assert eff and np.allclose(eff, 0.5)


@pytest.mark.parametrize("argv, match", [
    (["--weight-dtype", "fp4"], "unknown --weight-dtype 'fp4'"),
    (["--kv-dtype", "int2"], "unknown --kv-dtype 'int2'"),
    (["--gpus", "9"], "has only 8 GPUs"),
])
def test_bad_knobs_one_line(trace_path, tmp_path, capsys, argv, match) -> None:
    rc = main(["replay", "--trace", str(trace_path), "--topology", "dgx-h100", "--out", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and match in err
    assert not (tmp_path / "x").exists()
