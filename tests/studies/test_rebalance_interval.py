"""Smoke test: studies/rebalance_interval runs on a reduced size; stalls and the overlapped variant add up."""

from __future__ import annotations

import csv

import numpy as np

from moesim.cost import CostModel
from moesim.placement import place
from moesim.placement.rebalance import replay_with_rebalance
from moesim.topo import load_topology
from moesim.trace import Trace


def test_rebalance_interval_quick(study, tmp_path):
    mod = study("rebalance_interval")
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    for name in ("rebalance.csv", "crossover.csv", "setup.json", "table.md", "rebalance_interval.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = list(csv.DictReader((tmp_path / "rebalance.csv").open()))
    static = next(r for r in rows if r["mode"] == "static")
    assert float(static["vs static"]) == 1.0 and float(static["stall s"]) == 0.0
    by = {(r["rebalancer"], r["mode"], r["interval"]): r for r in rows}
    for label in ("eplb", "incremental-4"):
        for interval in ("10", "20"):
            blk, ovl = by[(label, "blocking", interval)], by[(label, "overlapped", interval)]
            assert int(blk["rebalances"]) >= 1 and float(blk["moved GB"]) > 0
            # the same schedule; blocking adds exactly its stalls
            assert abs(float(blk["total s"]) - float(ovl["total s"]) - float(blk["stall s"])) < 1e-3
            assert float(blk["stall s"]) > 0 and float(ovl["stall s"]) == 0
    # a move budget of 4 swaps per layer moves far less than re-placing from scratch
    for interval in ("10", "20"):
        assert (float(by[("incremental-4", "blocking", interval)]["GB/rebalance"])
                < 0.5 * float(by[("eplb", "blocking", interval)]["GB/rebalance"]))

def test_overlapped_equals_replay_without_stalls(study, tmp_path):
    """The study derives 'overlapped' from the blocking replay; the library's blocking=False must agree."""
    mod = study("rebalance_interval")
    model = mod.study_model()
    topo = load_topology(mod.TOPOLOGY)
    cost = CostModel.roofline(model, topo.device)
    path = mod.write_trace(model, tmp_path / "t.mtrace", steps=12, drift=0.08, sample=64, step_tokens=1024)
    with Trace.open(path) as trace:
        kw = {"num_groups": model.num_groups}
        init = place(trace.load(0, 4).sum(axis=0).astype(float), "eplb", num_gpus=16, num_slots=272, **kw).mapping
        pol = "periodic:interval=5,window=5"
        blk, s1 = replay_with_rebalance(trace, topo, cost, model, init, pol, "eplb", place_kw=kw, blocking=True)
        ovl, s2 = replay_with_rebalance(trace, topo, cost, model, init, pol, "eplb", place_kw=kw, blocking=False)
    assert [e.step for e in s1] == [e.step for e in s2] and len(s1) == 2
    np.testing.assert_allclose(np.sum(blk.step_time) - np.sum(blk.stall_time), np.sum(ovl.step_time), rtol=1e-9)
