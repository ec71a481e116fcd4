"""Smoke test: studies/validate_loop runs one short closed loop and the machine's spread on a reduced size."""

from __future__ import annotations

import csv

import pytest

pytest.importorskip("torch")


@pytest.mark.dist
def test_validate_loop_quick(study, tmp_path):
    mod = study("validate_loop")
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    for name in ("validate_loop.csv", "table.md", "step_time_seed0.png", "report_seed0.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = list(csv.DictReader((tmp_path / "validate_loop.csv").open()))
    assert len(rows) == 1
    r = rows[0]
    assert float(r["load max/mean measured"]) == pytest.approx(float(r["load max/mean predicted"]))
    assert 0 <= float(r["error of median"]) < 0.75 and float(r["predicted after ms"]) > 0
    assert "identical live runs" in (tmp_path / "table.md").read_text()
