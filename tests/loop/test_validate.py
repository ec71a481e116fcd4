"""``moesim validate`` end to end on CPU (gloo, 2 ranks): one live run paused for the new mapping, a report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moesim.cli import main
from moesim.mapping import ExpertMapping
from moesim.models import get_model

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.dist
def test_validate_runs_the_loop_and_reports_the_prediction_error(tmp_path) -> None:
    out = tmp_path / "val"
    cmd = [sys.executable, "-m", "moesim", "validate", "--nproc", "2", "--preset", "tiny", "--steps", "32",
           "--batch", "8", "--slots-per-gpu", "5", "--algo", "eplb", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(w in proc.stdout for w in ("calibration", "before", "after", "held_out"))
    for name in ("report.json", "report.md", "step_time.png", "mapping_initial.json", "mapping_new.json",
                 "run/trace.mtrace", "run/run.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    spec = get_model("tiny")
    new = ExpertMapping.load(out / "mapping_new.json", model=spec, num_gpus=2)
    assert new.slots_per_gpu == 5 and new.num_redundant == 2
    remap = report["remap"]
    from moesim.runtime.remap import plan_moves

    initial = ExpertMapping.load(out / "mapping_initial.json", model=spec, num_gpus=2)
    assert remap["ok"] is True and remap["moved_experts"] == len(plan_moves(initial, new))
    run = json.loads((out / "run" / "run.json").read_text())
    assert [m["from_step"] for m in run["mappings"]] == [0, 16] and run["awaiting"] is None
    assert run["mappings"][1]["phy2log"] == new.phy2log.tolist()  # the run applied the controller's mapping
    assert len(run["steps"]) == 32 and run["status"] == "done"
    v = report["windows"]
    assert report["fit"]["steps"] == [0, 8] and report["placement"]["load_steps"] == [0, 16]
    assert [v[w]["steps"] for w in ("calibration", "before", "after", "held_out")] == [[0, 8], [8, 16], [16, 32],
                                                                                       [8, 32]]
    for window in ("before", "after"):
        w = v[window]
        # the simulator's replica policy and the runtime's send every token-choice to the same rank
        np.testing.assert_allclose(w["rank_load_predicted"], w["rank_load_measured"])
        assert w["busiest_over_mean_load_predicted"] == pytest.approx(w["busiest_over_mean_load_measured"])
        assert all(t > 0 for t in w["moe_time_per_rank_predicted_s"])
        # timing noise on a shared CPU is large; a unit or wiring mistake is larger still
        assert w["median_step_time_rel_error"] < 0.75
        assert w["step_time_median_rel_error"] < 0.75
    assert len(v["per_step"]) == 32 and all(s["predicted_s"] > 0 for s in v["per_step"])
    assert report["fit"]["network"]["samples"] > 0 and report["fit"]["cost_fit"]["records"] > 0
    # the runtime records the KV length of every step; the fit uses it for attention
    assert "kv_len" in report["fit"]["cost_fit"]["phases"]["attention"]["model"]
    assert "error of the median" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--algo", "nope"], "unknown placement algorithm"),
    (["--steps", "7"], "--steps must be at least 8"),
    (["--steps", "8", "--remap-at", "7"], "--remap-at 7"),
    (["--steps", "12", "--remap-at", "6", "--calibrate-steps", "3"], "--calibrate-steps 3"),
    (["--nproc", "0"], "--nproc must be positive"),
])
def test_bad_requests_fail_in_one_line_before_any_process(tmp_path, capsys, argv, message) -> None:
    rc = main(["validate", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "run").exists()


@pytest.mark.gpu
def test_validate_on_a_gpu_with_nccl(tmp_path) -> None:
    """The same loop on one GPU (NCCL world of one): bfloat16 weights, CUDA-event timings, Triton kernels."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = tmp_path / "val"
    cmd = [sys.executable, "-m", "moesim", "validate", "--device", "cuda", "--nproc", "1", "--preset", "small",
           "--steps", "32", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["remap"]["ok"] is True and report["model"]["bytes_per_param"] == 2
    held = report["windows"]["held_out"]
    assert held["step_time_measured_median_s"] > 0 and held["step_time_predicted_median_s"] > 0


def test_validate_never_deletes_a_folder_it_did_not_write(tmp_path, capsys) -> None:
    keep = tmp_path / "o" / "run" / "notes.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("mine")
    rc = main(["validate", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not a moesim run record" in err and len(err.splitlines()) == 1
    assert keep.read_text() == "mine"
