"""replay_with_rebalance over the analytic engine: stalls where blocking, none when overlapped or static."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.mapping import ExpertMapping
from moesim.placement.rebalance import changed_pairs, replay_with_rebalance


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from moesim.cost import CostModel
    from moesim.models import get_model
    from moesim.topo import load_topology
    from moesim.trace import Trace
    from moesim.trace.synth import SynthConfig, synthesize

    model = get_model("tiny-deepseek")
    path = synthesize(model, SynthConfig(steps=12, tokens=96, prefill_steps=2, num_ranks=16, drift=0.3, seed=5),
                      tmp_path_factory.mktemp("rb") / "t.mtrace")
    topo = load_topology("dgx-h100:2")
    trace = Trace.open(path)
    cost = CostModel.roofline(model, topo.device)
    init = ExpertMapping.linear(model.num_layers, model.num_experts, topo.num_gpus, 2)
    return trace, topo, cost, model, init


def test_static_moves_nothing(setup):
    trace, topo, cost, model, init = setup
    res, sched = replay_with_rebalance(trace, topo, cost, model, init, "static")
    assert sched == [] and res.num_steps == trace.num_steps and not res.extra.get("stalls")


def test_periodic_blocking_charges_stalls(setup):
    trace, topo, cost, model, init = setup
    static, _ = replay_with_rebalance(trace, topo, cost, model, init, "static")
    res, sched = replay_with_rebalance(trace, topo, cost, model, init, "periodic:interval=4,window=4", "greedy")
    assert sched and all(s.step % 4 == 0 for s in sched)
    prev = init
    for s in sched:
        assert s.moved_bytes == pytest.approx(changed_pairs(prev, s.mapping) * model.expert_bytes)
        assert s.seconds > 0
        prev = s.mapping
    stalls = res.extra["stalls"]
    assert [st["step"] for st in stalls] == [s.step for s in sched if s.moved_bytes > 0]
    assert np.sum(res.stall_time) == pytest.approx(sum(s.seconds for s in sched))
    over, sched2 = replay_with_rebalance(trace, topo, cost, model, init, "periodic:interval=4,window=4", "greedy",
                                         blocking=False)
    assert [s.step for s in sched2] == [s.step for s in sched] and not over.extra.get("stalls")
    assert np.sum(res.step_time) == pytest.approx(np.sum(over.step_time) + np.sum(res.stall_time))
    assert res.extra["rebalance"]["events"][0]["step"] == sched[0].step
    assert static.num_steps == res.num_steps


def test_replay_hook_from_args(setup):
    import argparse

    from moesim.errors import MoesimError
    from moesim.placement.rebalance import add_rebalance_arguments, replay_from_args

    trace, topo, cost, model, init = setup
    p = argparse.ArgumentParser()
    add_rebalance_arguments(p)
    args = p.parse_args(["--rebalance", "threshold:balancedness=0.99,window=3", "--rebalance-algo", "eplb",
                         "--rebalance-overlap"])
    res, sched = replay_from_args(args, trace, topo, cost, model, init)
    assert res.num_steps == trace.num_steps and not res.extra.get("stalls")
    assert all(s.mapping.meta.get("algo") == "eplb" for s in sched)
    with pytest.raises(MoesimError, match="rebalance-algo"):
        replay_from_args(p.parse_args(["--rebalance", "static", "--rebalance-algo", "x"]), trace, topo, cost, model,
                         init)


def test_moesim_replay_rebalance_cli(tmp_path, setup, capsys):
    import json

    from moesim.cli import main

    trace = setup[0]
    out = tmp_path / "rp"
    rc = main(["replay", "--trace", str(trace.path), "--topology", "dgx-h100:2", "--rebalance",
               "periodic:interval=4,window=4", "--rebalance-algo", "greedy", "--out", str(out), "--no-plots",
               "--quiet"])
    assert rc == 0
    inputs = json.loads((out / "report.json").read_text())["inputs"]
    assert inputs["rebalance_schedule"] and all(e["step"] % 4 == 0 for e in inputs["rebalance_schedule"])
    rc = main(["replay", "--trace", str(trace.path), "--topology", "dgx-h100:2", "--rebalance", "sometimes",
               "--out", str(tmp_path / "bad")])
    assert rc == 2 and "unknown rebalance policy" in capsys.readouterr().err
