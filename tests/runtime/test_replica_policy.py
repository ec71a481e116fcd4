"""The live runtime and the simulator pick the same replica for every token-choice, under every policy."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")  # the runtime needs torch; moesim itself does not

import numpy as np
from moesim.runtime.testing import assert_matches_reference, small_config, spawn_run

from moesim.mapping import ExpertMapping
from moesim.replica import ReplicaPolicy
from moesim.sim.config import SimConfig
from moesim.sim.workload import workload_from_ids
from moesim.trace import Trace

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("policy", ["vllm", "position", "local"])
def test_runtime_slot_loads_equal_the_simulators(tmp_path, policy) -> None:
    """Four ranks with redundant replicas: outputs equal the reference, and the tokens each slot computed (the
    runtime's timing records) equal the simulator's slot_tokens for the recorded trace under the same policy."""
    phy2log = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [7, 7, 0, 1], [0, 2, 4, 6]]).reshape(1, 16)
    mapping = ExpertMapping(np.repeat(phy2log, 2, axis=0), 4, 8)
    mapping.save(tmp_path / "m.json")
    cfg = small_config(nproc=4, mapping=str(tmp_path / "m.json"), record=str(tmp_path / "rec"), policy=policy,
                       gpus_per_node=2)
    assert_matches_reference(cfg, spawn_run(cfg, tmp_path / "dump"))
    with Trace.open(tmp_path / "rec" / "trace.mtrace") as t:
        tm = t.timings()
        for step in t.steps():
            wl = workload_from_ids(step.ids.astype(np.int64), np.array([step.num_tokens]), mapping,
                                   SimConfig(policy=ReplicaPolicy(policy, 2), dedup=False),
                                   origin=step.origin.astype(np.int64))
            for layer in range(2):
                rows = (tm.index[:, 0] == step.index) & (tm.index[:, 1] == layer)
                got = np.zeros((4, 4), dtype=np.int64)
                got[tm.index[rows, 2]] = tm.tokens[rows][:, :4]
                assert np.array_equal(got.ravel(), wl.slot_tokens[0, layer]), (policy, step.index, layer)
