"""``moesim validate`` fits only on its calibration window: never on held-out or warm-up steps (spied on), and it
reports the uncalibrated roofline beside the calibrated prediction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import moesim.sim.workload as workload_mod
import moesim.validate as val
from moesim.cost import CostModel
from moesim.mapping import ExpertMapping
from moesim.models import get_model
from moesim.replica import ReplicaPolicy
from moesim.sim.config import SimConfig
from moesim.trace import Trace

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
STEPS = 12


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A 12-step CPU run of the tiny preset on one rank, recorded (trace + run.json)."""
    out = tmp_path_factory.mktemp("rec") / "run"
    cmd = [sys.executable, "-m", "moesim", "run", "--nproc", "1", "--preset", "tiny", "--steps", str(STEPS),
           "--batch", "4", "--prompt-len", "8", "--device", "cpu", "--record", str(out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _flag_warmup(run_dir: Path, n: int) -> None:
    doc = json.loads((run_dir / "run.json").read_text())
    for i, s in enumerate(doc["steps"]):
        s.pop("warmup", None)
        if i < n:
            s["warmup"] = True
    (run_dir / "run.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("warmup", [0, 2])
def test_the_fit_sees_only_the_calibration_window_after_warmup(recorded, monkeypatch, warmup) -> None:
    seen: dict[str, list] = {"fit_steps": [], "workload": [], "overhead": [], "network": []}
    real_fit, real_wl = CostModel.fit.__func__, workload_mod.build_workload
    real_over, real_net = val.fit_overhead, val.fit_network

    def spy_fit(cls, timings, *a, **k):
        seen["fit_steps"].append(np.unique(timings.index[:, 0]).tolist())
        return real_fit(cls, timings, *a, **k)

    def spy_wl(trace, mapping, config, start=0, stop=None, *a, **k):
        seen["workload"].append((start, stop))
        return real_wl(trace, mapping, config, start, stop, *a, **k)

    def spy_over(phases, tokens, residual):
        seen["overhead"].append(len(phases))
        return real_over(phases, tokens, residual)

    def spy_net(seconds, link_bytes):
        seen["network"].append(np.size(seconds))
        return real_net(seconds, link_bytes)

    monkeypatch.setattr(CostModel, "fit", classmethod(spy_fit))
    monkeypatch.setattr(workload_mod, "build_workload", spy_wl)
    monkeypatch.setattr(val, "fit_overhead", spy_over)
    monkeypatch.setattr(val, "fit_network", spy_net)
    _flag_warmup(recorded, warmup)
    spec = get_model("tiny")
    cfg = val.ValidateConfig(nproc=1, preset="tiny", steps=STEPS, remap_at=8, calibrate_steps=6)
    mapping = ExpertMapping.linear(spec.num_layers, spec.num_experts, 1)
    config = SimConfig(layout="ep", policy=ReplicaPolicy("round_robin"), dedup=True)
    with Trace.open(recorded / "trace.mtrace") as trace:
        assert trace.num_steps == STEPS  # the held-out steps 6..11 are there to be (wrongly) taken
        _fit, n_warm = val.fit_calibration(recorded, trace, cfg, mapping, spec, config)
    assert n_warm == warmup
    window = list(range(warmup, 6))
    assert seen["fit_steps"] == [window]
    assert seen["workload"] == [(warmup, 6)]
    assert seen["overhead"] == [len(window)]
    assert seen["network"] == [2 * len(window) * spec.num_layers]  # dispatch + combine per (step, layer)


def test_warmup_steps_counts_only_leading_flags() -> None:
    steps = [{"warmup": True}, {"phase": "warmup"}, {"phase": "prefill"}, {"warmup": True}]
    assert val.warmup_steps({"steps": steps}) == 2
    assert val.warmup_steps({"steps": []}) == 0
    # a CUDA run that reports no warm-up compiled its kernels inside step 0
    plain = [{"phase": "prefill"}, {"phase": "decode"}]
    assert val.warmup_steps({"steps": plain, "config": {"device": "cuda"}}) == 1
    assert val.warmup_steps({"steps": plain, "config": {"device": "cuda"}, "warmup": {"seconds": 3.0}}) == 0
    assert val.warmup_steps({"steps": plain, "config": {"device": "cuda"}, "summary": {"warmup_s": 3.0}}) == 0
    assert val.warmup_steps({"steps": plain, "config": {"device": "cpu"}}) == 0


def test_too_much_warmup_is_refused_in_one_line(recorded) -> None:
    _flag_warmup(recorded, 5)
    spec = get_model("tiny")
    cfg = val.ValidateConfig(nproc=1, preset="tiny", steps=STEPS, remap_at=8, calibrate_steps=6)
    with Trace.open(recorded / "trace.mtrace") as trace, pytest.raises(val.MoesimError, match="warm-up"):
        val.fit_calibration(recorded, trace, cfg, ExpertMapping.linear(spec.num_layers, spec.num_experts, 1), spec,
                            SimConfig(layout="ep"))
    _flag_warmup(recorded, 0)


def test_uncalibrated_roofline_is_the_datasheet(monkeypatch) -> None:
    spec = get_model("tiny")
    cost, topo = val.roofline_cost(val.ValidateConfig(device="cuda", roofline_device="h200", prompt_len=64), spec, 2)
    assert topo.device.name == "h200" and topo.num_gpus == 2
    ref = CostModel.roofline(spec, topo.device, context_len=64)
    assert cost.to_dict() == ref.to_dict()  # nothing fitted
    assert val.roofline_device(val.ValidateConfig(device="cpu")) == "cpu"
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    assert val.roofline_device(val.ValidateConfig(device="cuda")) == "h100"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Some GPU")
    with pytest.raises(val.MoesimError, match="roofline-device"):
        val.roofline_device(val.ValidateConfig(device="cuda"))


def test_compare_reports_the_roofline_error_beside_the_calibrated_one() -> None:
    m = val.Measured(step_time=np.array([1.0, 2.0, 2.0, 4.0]), phase=["prefill", "decode", "decode", "decode"],
                     tokens=np.ones(4), moe_time=np.ones((4, 1)), rank_load=np.ones((4, 1)),
                     phase_time=np.zeros((4, 1, 1, 5)))
    pred = {"step_time": np.array([1.0, 2.0, 2.0, 4.0]), "moe_time": np.ones((4, 1)), "rank_load": np.ones((4, 1))}
    roof = {"step_time": np.array([0.5, 1.0, 1.0, 1.0])}
    out = val.compare(m, pred, 2, 3, roof)
    held = out["held_out"]  # steps 2..3: measured median 3.0, roofline median 1.0
    assert held["median_step_time_rel_error"] == 0.0
    assert held["roofline_step_time_predicted_median_s"] == pytest.approx(1.0)
    assert held["roofline_median_step_time_rel_error"] == pytest.approx(2.0 / 3.0)
    assert held["roofline_step_time_median_rel_error"] == pytest.approx(np.median([0.5, 0.75]))
    assert out["per_step"][3]["roofline_s"] == 1.0
    assert "roofline_moe_time_per_rank_predicted_s" not in held  # none given: none reported


def test_compare_reports_the_roofline_moe_time_per_rank() -> None:
    m = val.Measured(step_time=np.ones(4), phase=["prefill", "decode", "decode", "decode"], tokens=np.ones(4),
                     moe_time=np.array([[1.0, 2.0], [1.0, 2.0], [2.0, 4.0], [4.0, 8.0]]),
                     rank_load=np.ones((4, 2)), phase_time=np.zeros((4, 1, 2, 5)))
    pred = {"step_time": np.ones(4), "moe_time": np.ones((4, 2)), "rank_load": np.ones((4, 2))}
    roof = {"step_time": np.ones(4), "moe_time": np.array([[9.0, 9.0], [9.0, 9.0], [1.0, 1.0], [2.0, 3.0]])}
    held = val.compare(m, pred, 2, 3, roof)["held_out"]  # steps 2..3: measured [3, 6] per rank, roofline [1.5, 2]
    assert held["roofline_moe_time_per_rank_predicted_s"] == pytest.approx([1.5, 2.0])
    assert held["roofline_moe_time_rel_error"] == pytest.approx([0.5, 2.0 / 3.0])
    assert held["moe_time_per_rank_measured_s"] == pytest.approx([3.0, 6.0])


def test_an_unknown_roofline_device_is_one_line_before_any_process(tmp_path, capsys) -> None:
    from moesim.cli import main

    rc = main(["validate", "--roofline-device", "tpu9", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "unknown device 'tpu9'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "run").exists()


def test_graph_replayed_steps_do_not_count_as_zero_expert_time_or_load():
    """A CUDA-graph replay records routing but no phases: per-rank MoE time and load come from the profiled steps
    alone, on both sides (were averaged in as 0 s and 0 tokens)."""
    S, G = 8, 2
    timed = np.arange(S) % 4 == 1  # every 4th step profiled eagerly
    real_moe = np.tile([3e-3, 5e-3], (S, 1))
    real_load = np.tile([100.0, 140.0], (S, 1))
    measured = val.Measured(step_time=np.full(S, 0.01), phase=["decode"] * S, tokens=np.full(S, 64.0),
                            moe_time=np.where(timed[:, None], real_moe, 0.0),
                            rank_load=np.where(timed[:, None], real_load, 0.0),
                            phase_time=np.zeros((S, 1, G, 5)), timed=timed)
    predicted = {"step_time": np.full(S, 0.01), "moe_time": real_moe, "rank_load": real_load}
    held = val.compare(measured, predicted, calibration=2, remap_step=4)["held_out"]
    assert held["moe_time_rel_error"] == pytest.approx([0.0, 0.0])
    assert held["rank_load_measured"] == held["rank_load_predicted"] == [100.0, 140.0]  # step 5 alone
    untimed = val.compare(measured, predicted, calibration=2, remap_step=4)["after"]  # steps 4..7: one profiled
    assert untimed["busiest_over_mean_load_measured"] == pytest.approx(140 / 120)
