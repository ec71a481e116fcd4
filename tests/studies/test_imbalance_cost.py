"""Smoke test: studies/imbalance_cost runs on a reduced size; balanced placements beat linear, nothing beats ideal."""

from __future__ import annotations

import csv


def test_imbalance_cost_quick(study, tmp_path):
    mod = study("imbalance_cost")
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    for name in ("imbalance_cost.csv", "des_check.csv", "table.md", "vs_skew.png", "vs_busiest.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = list(csv.DictReader((tmp_path / "imbalance_cost.csv").open()))
    assert {r["placement"] for r in rows} == {"ideal", "linear", "lpt", "eplb+1"}
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["regime"], r["skew"]), {})[r["placement"]] = r
        assert 0 < float(r["moe_share"]) < 1
    assert len(groups) == 4  # one setup x 2 regimes x 2 skews
    for g in groups.values():
        assert float(g["ideal"]["busiest/mean GPU"]) == 1.0 and float(g["ideal"]["vs ideal"]) == 1.0
        assert float(g["lpt"]["busiest/mean GPU"]) <= float(g["linear"]["busiest/mean GPU"])
        for name in ("linear", "lpt", "eplb+1"):
            assert float(g[name]["busiest/mean GPU"]) >= 1.0
            assert float(g[name]["vs ideal"]) > 0.99  # the balanced counterfactual is a floor (up to rounding)
    hi = groups[("qwen3-30b-a3b", "prefill", "1")]
    lo = groups[("qwen3-30b-a3b", "prefill", "0")]
    assert float(hi["linear"]["vs ideal"]) > float(lo["linear"]["vs ideal"])  # more skew costs linear more
    checks = list(csv.DictReader((tmp_path / "des_check.csv").open()))
    assert {c["placement"] for c in checks} == {"ideal", "linear", "lpt", "eplb+1"}
    for c in checks:  # one node, little contention: the engines agree closely
        assert 0.95 < float(c["DES / analytic"]) < 1.05
