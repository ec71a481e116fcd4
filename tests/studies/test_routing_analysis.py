"""Smoke test: studies/routing_analysis runs on a reduced size and its figures are sane."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

ROUTING_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "routing"


@pytest.mark.skipif(not ROUTING_DATA.is_dir(), reason="../shared/data/routing absent")
def test_routing_analysis_quick(study, tmp_path, capsys):
    mod = study("routing_analysis")
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    for name in ("summary.csv", "per_layer.csv", "sources.json", "table.md", "per_layer_imbalance.png",
                 "sorted_load.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = {r["source"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}
    real = rows["Mixtral-8x7B-Instruct counts"]
    assert real["layers"] == "32" and real["tokens/layer"] == "59505"
    assert 1.3 < float(real["busiest/mean min"]) <= float(real["median"]) <= float(real["max"]) < 2.0
    assert float(rows["Switch-base-128"]["max"]) > 20  # the heavy regime
    assert float(rows["Switch-base-128"]["idle max"]) > 0
    for r in rows.values():  # entropy in [0, 1], busiest/mean in [1, E/k]
        assert 0 < float(r["entropy med"]) <= 1
        assert 1 <= float(r["busiest/mean min"]) <= float(r["max"]) <= int(r["E"]) / int(r["k"]) + 1e-9
    assert "synth mixtral-8x7b" in rows and "synth deepseek-v3" in rows
    assert "busiest/mean" in capsys.readouterr().out


def test_layer_metrics_definitions(study):
    mod = study("routing_analysis")
    m = mod.layer_metrics(np.array([[4, 4, 4, 4], [8, 8, 0, 0]]))
    np.testing.assert_allclose(m["busiest_mean"], [1.0, 2.0])
    np.testing.assert_allclose(m["cv"], [0.0, 1.0])
    np.testing.assert_allclose(m["entropy"], [1.0, 0.5])
    np.testing.assert_allclose(m["idle"], [0.0, 0.5])
