"""Smoke test: studies/placement_scaling runs on a reduced size; scores are in range and balancing helps."""

from __future__ import annotations

import csv


def test_placement_scaling_quick(study, tmp_path):
    mod = study("placement_scaling")
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    for name in ("placement_scaling.csv", "table.md", "placement_scaling.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = {r["algo"]: r for r in csv.DictReader((tmp_path / "placement_scaling.csv").open())}
    assert set(rows) == set(mod.ALGOS)
    for r in rows.values():
        assert float(r["busiest/bound"]) >= 1 - 1e-9 and float(r["fit busiest/bound"]) >= 1 - 1e-9
        assert 0 < float(r["balancedness"]) <= 1
        assert float(r["inter-node MB/token"]) > 0  # two nodes: some tokens cross
        assert float(r["step / best"]) >= 1 - 1e-9
    # on the steps it was fitted to, a balancing algorithm beats the load-blind linear placement
    assert float(rows["greedy"]["fit busiest/bound"]) <= float(rows["linear"]["fit busiest/bound"])
    assert mod.slots_per_gpu(256, 32) == 9 and mod.slots_per_gpu(8, 64) == 2
