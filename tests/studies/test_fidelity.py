"""studies/fidelity --quick: every row predicted and written, calibration and held-out rows marked (~20 s)."""

from __future__ import annotations

import csv

import pytest


@pytest.mark.slow
def test_fidelity_quick(study, tmp_path):
    mod = study("fidelity")
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "fidelity.csv").open()))
    assert {r["row"] for r in rows} == {"calibration", "held out"}
    assert len(rows) == 2 * sum(1 for r in mod.ROWS if r[1] <= 32)
    # every row is a real prediction of its published figure, well within a factor of 2 even on the quick draws
    for r in rows:
        assert 0.5 < float(r["predicted"]) / float(r["published"]) < 2.0, r
    assert (tmp_path / "fidelity.png").stat().st_size > 1000
