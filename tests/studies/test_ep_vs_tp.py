"""Smoke test: studies/ep_vs_tp runs on a reduced size; bytes and engine agreement are as the layouts imply."""

from __future__ import annotations

import csv

from moesim.models import get_model


def test_ep_vs_tp_quick(study, tmp_path):
    mod = study("ep_vs_tp")
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    for name in ("layouts.csv", "des_check.csv", "fastest.csv", "setup.json", "table.md", "ep_vs_tp.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = list(csv.DictReader((tmp_path / "layouts.csv").open()))
    m = get_model("mixtral-8x7b")
    per_layer = m.num_layers * m.token_bytes
    for r in rows:
        b = float(r["bytes/token"])
        if r["layout"] == "ep":
            # dispatch + combine of a token whose 2 experts are not both local: 2 x (1 - 6/28) on average
            assert 0.5 * 2 * per_layer < b < 2 * per_layer
        else:  # two all-reduces (attention, MoE) per layer = 4 halves of token_bytes on 2 GPUs
            assert abs(b - 4 * per_layer) / (4 * per_layer) < 1e-5  # CSV keeps 6 digits
        assert float(r["step_ms"]) > 0 and 0 < float(r["moe_share"]) < 1
    tp1 = next(r for r in rows if r["layout"] == "tp" and r["batch"] == "1")
    ep1 = next(r for r in rows if r["layout"] == "ep" and r["batch"] == "1")
    assert float(tp1["step_ms"]) < float(ep1["step_ms"])  # one token: TP reads half of each expert per GPU
    for c in csv.DictReader((tmp_path / "des_check.csv").open()):
        assert abs(float(c["rel diff"])) < 0.01  # no contention here: the two engines agree
