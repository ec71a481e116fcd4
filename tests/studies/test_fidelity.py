"""studies/fidelity: every DeepEP row predicted and written; the live runtime's rows (one fresh short validate run,
the recorded CPU and H200 runs) measured vs predicted, calibration and held-out rows marked."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

from moesim.errors import MoesimError

FIDELITY = Path(__file__).resolve().parents[2] / "studies" / "fidelity"


@pytest.fixture
def live():
    sys.path.insert(0, str(FIDELITY))
    try:
        import live as mod

        yield mod
    finally:
        sys.path.remove(str(FIDELITY))


@pytest.mark.slow
@pytest.mark.dist
def test_fidelity_quick(study, tmp_path):
    pytest.importorskip("torch")
    mod = study("fidelity")
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "fidelity.csv").open()))
    assert {r["row"] for r in rows} == {"calibration", "held out"}
    deepep = [r for r in rows if r["system"].startswith("DeepEP")]
    assert len(deepep) == 2 * sum(1 for r in mod.ROWS if r[1] <= 32)
    # every row is a real prediction of its published figure, well within a factor of 2 even on the quick draws
    for r in deepep:
        assert 0.5 < float(r["predicted"]) / float(r["reference"]) < 2.0, r
    fresh = [r for r in rows if r["system"] == "live CPU, gloo (this run)"]
    roof = "roofline (uncalibrated)"
    assert [(r["by"], r["row"]) for r in fresh] == [("validate fit", "calibration"), ("validate fit", "held out"),
                                                    ("validate fit", "held out"), (roof, "held out"),
                                                    (roof, "held out")]
    # the held-out window starts where the fit window ends (24 quick steps: fit on 0..5)
    assert fresh[0]["phase"].endswith("steps 0..5") and fresh[1]["phase"].endswith("steps 6..23")
    for r in fresh:
        assert float(r["reference"]) > 0 and float(r["predicted"]) > 0
    # fitted and roofline predictions of the same measured step / MoE time, from validate's report
    assert fresh[1]["reference"] == fresh[3]["reference"] and fresh[2]["reference"] == fresh[4]["reference"]
    assert fresh[1]["phase"] == fresh[3]["phase"] and fresh[2]["phase"] == fresh[4]["phase"]
    assert fresh[3]["predicted"] != fresh[1]["predicted"] and fresh[4]["predicted"] != fresh[2]["predicted"]
    assert any("H200" in r["system"] for r in rows)
    assert "live runtime, held-out rows" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "fidelity.png").stat().st_size > 1000


def test_recorded_gpu_rows_follow_the_files(live):
    """The H200 rows carry the figures of the recorded files (validate_olmoe_report.md, README.md) exactly."""
    rows = {(r["phase"], r["by"]): r for r in live.recorded_gpu_rows()}
    held = rows["step, median of steps 8..31", "validate fit"]
    assert (held["reference"], held["predicted"], held["row"], held["error"]) == (126.57, 156.73, "held out", "+23.8%")
    cal = rows["step, median of steps 0..7", "validate fit"]
    assert (cal["reference"], cal["predicted"], cal["row"]) == (157.08, 156.73, "calibration")
    moe = rows["MoE rank 0, mean of steps 16..31", "validate fit"]
    assert (moe["reference"], moe["predicted"]) == (12.992, 16.101)
    roof = rows["expert kernels (GPU time in the profile)", "roofline (uncalibrated)"]
    assert (roof["reference"], roof["predicted"], roof["row"]) == (3.46, 3.47, "held out")
    step = rows["step, median of steps 8..31", "roofline (uncalibrated)"]
    assert step["predicted"] == pytest.approx((5.40 + 5.53) / 2)
    assert all(r["row"] == "held out" for r in rows.values() if r["by"].startswith("roofline"))


def test_validate_rows_windows_and_errors(live):
    """Rows of a validate report: calibration window in sample, held-out window and MoE mean over ranks."""
    def win(a, b, meas, pred, moe_m, moe_p):
        return {"steps": [a, b], "step_time_measured_median_s": meas, "step_time_predicted_median_s": pred,
                "moe_time_per_rank_measured_s": moe_m, "moe_time_per_rank_predicted_s": moe_p}

    rep = {"config": {"nproc": 2},
           "windows": {"calibration": win(0, 6, 0.050, 0.040, [0.01, 0.01], [0.01, 0.01]),
                       "held_out": win(6, 24, 0.040, 0.050, [0.010, 0.030], [0.015, 0.045])}}
    rows = live.validate_rows(rep, "s", "src")  # a report from before issue 13: no roofline figures, no rows
    assert [r["row"] for r in rows] == ["calibration", "held out", "held out"]
    assert rows[0]["phase"] == "step, median of steps 0..5" and rows[0]["error"] == "-20.0%"
    assert rows[1]["phase"] == "step, median of steps 6..23" and rows[1]["error"] == "+25.0%"
    assert (rows[2]["reference"], rows[2]["predicted"], rows[2]["error"]) == (20.0, 30.0, "+50.0%")
    rep["windows"]["held_out"].update(roofline_step_time_predicted_median_s=0.010,
                                      roofline_moe_time_per_rank_predicted_s=[0.004, 0.006])
    rows = live.validate_rows(rep, "s", "src")
    assert [(r["by"], r["row"]) for r in rows[3:]] == [("roofline (uncalibrated)", "held out")] * 2
    assert (rows[3]["reference"], rows[3]["predicted"], rows[3]["error"]) == (40.0, 10.0, "-75.0%")
    assert (rows[4]["reference"], rows[4]["predicted"], rows[4]["error"]) == (20.0, 5.0, "-75.0%")


def test_recorded_gpu_rows_refuse_a_wrong_file(live, tmp_path):
    (tmp_path / "validate_olmoe_report.md").write_text("| window | steps |\n")
    (tmp_path / "README.md").write_text("nothing here\n")
    with pytest.raises(MoesimError, match="expected tables"):
        live.recorded_gpu_rows(tmp_path)
    with pytest.raises(MoesimError, match="not found"):
        live.recorded_gpu_rows(tmp_path / "missing")
