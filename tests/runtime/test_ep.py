"""Expert parallelism across gloo ranks: the EP model equals the single-process reference; live remapping."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")  # the runtime needs torch; moesim itself does not

import json

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moesim.runtime.testing import assert_matches_reference, random_mapping, small_config, spawn_run
from moesim.runtime.weights import SeededWeights

from moesim.mapping import ExpertMapping
from moesim.models import get_model
from moesim.replica import ReplicaPolicy, choose_slots
from moesim.trace import Trace

pytestmark = pytest.mark.dist


@pytest.mark.slow
@settings(max_examples=5, deadline=None)
@given(world=st.sampled_from([2, 4]), backend=st.sampled_from(["all2all", "allgather"]),
       extra=st.integers(0, 2), preset=st.sampled_from(["tiny", "tiny-deepseek"]), seed=st.integers(0, 2**31),
       policy=st.sampled_from(["round_robin", "local"]))
def test_ep_logits_equal_reference(tmp_path_factory, world, backend, extra, preset, seed, policy) -> None:
    spec = get_model(preset)
    tmp = tmp_path_factory.mktemp("ep")
    mapping = random_mapping(np.random.default_rng(seed), spec.num_layers, spec.num_experts, world, extra)
    mapping.save(tmp / "m.json")
    cfg = small_config(preset=preset, nproc=world, backend=backend, mapping=str(tmp / "m.json"), seed=seed % 1000,
                       policy=policy, gpus_per_node=2)
    assert_matches_reference(cfg, spawn_run(cfg, tmp))


@pytest.mark.parametrize("backend", ["all2all", "allgather"])
def test_replicas_and_empty_ranks(tmp_path, backend) -> None:
    """Four ranks, one of which holds only replicas of a single expert (it receives few or no tokens)."""
    phy2log = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [7, 7, 7, 7], [0, 2, 4, 6]]).reshape(1, 16)
    ExpertMapping(np.repeat(phy2log, 2, axis=0), 4, 8).save(tmp_path / "m.json")
    cfg = small_config(nproc=4, backend=backend, mapping=str(tmp_path / "m.json"), record=str(tmp_path / "rec"))
    assert_matches_reference(cfg, spawn_run(cfg, tmp_path / "dump"))
    with Trace.open(tmp_path / "rec" / "trace.mtrace") as t:
        assert t.validate() == []
        tm = t.timings()
        assert len(tm) == cfg.steps * 2 * 4
        # every token-choice of the trace was computed by exactly one slot
        assert int(tm.tokens.sum()) == int(t.load().sum())
        # ... and by the slot the simulator's replica policy picks when it replays this trace (numpy side)
        mapping = ExpertMapping.load(tmp_path / "m.json")
        for step in t.steps():
            for layer in range(2):
                table, count = ReplicaPolicy().tables(mapping, layer)
                slots = choose_slots(table, count, step.ids[layer].astype(np.int64),
                                     step.origin.astype(np.int64), np.arange(step.num_tokens))
                per_slot = np.bincount(slots.ravel(), minlength=16).reshape(4, 4)
                rows = (tm.index[:, 0] == step.index) & (tm.index[:, 1] == layer)
                got = np.zeros((4, 4), dtype=np.int64)
                got[tm.index[rows, 2]] = tm.tokens[rows][:, :4]
                assert np.array_equal(got, per_slot)


def _checksums_of_source(preset: str, seed: int) -> dict[tuple[int, int], tuple[float, ...]]:
    from moesim.runtime.remap import fingerprint

    spec = get_model(preset)
    src = SeededWeights(spec, seed)
    out = {}
    for layer in range(spec.num_layers):
        for e in range(spec.num_experts):
            a, b = src.expert(layer, e)
            out[(layer, e)] = tuple(torch.stack([fingerprint(a), fingerprint(b)]).flatten().tolist())
    return out


@pytest.mark.parametrize(("backend", "transport"), [("all2all", "p2p"), ("allgather", "all2all")])
def test_live_remap_keeps_weights_and_outputs(tmp_path, backend, transport) -> None:
    spec = get_model("tiny")
    rng = np.random.default_rng(3)
    old = random_mapping(rng, spec.num_layers, spec.num_experts, 4, 1)
    new = random_mapping(rng, spec.num_layers, spec.num_experts, 4, 1)
    old.save(tmp_path / "old.json")
    new.save(tmp_path / "new.json")
    cfg = small_config(nproc=4, steps=4, backend=backend, mapping=str(tmp_path / "old.json"), remap_transport=transport,
                  remap_at=[(2, str(tmp_path / "new.json"))], record=str(tmp_path / "rec"))
    dumps = spawn_run(cfg, tmp_path / "dump")
    assert_matches_reference(cfg, dumps)  # outputs before and after the remap equal the reference
    truth = _checksums_of_source("tiny", cfg.seed)
    for rank, d in enumerate(dumps):
        assert d["mapping"] == new.phy2log.tolist()
        held = d["checksums"]["final"]
        assert {e for (_, e) in held} >= set(new.gpu_experts(0, rank).tolist())
        for key, value in held.items():  # every copy on every rank is bit-identical to the source
            assert value == truth[key], f"rank {rank} layer/expert {key} differs after the remap"
        for layer, (before, after) in enumerate(zip(d["rows_before"][2], d["rows"])):
            for row, e in enumerate(before):  # an expert that stays on this rank stays in its storage row
                if e in set(new.gpu_experts(layer, rank).tolist()):
                    assert after[row] == e
        for layer in range(spec.num_layers):
            want = set(new.gpu_experts(layer, rank).tolist())
            assert {e for (lay, e) in held if lay == layer} == want
    run = json.loads((tmp_path / "rec" / "run.json").read_text())
    assert [m["from_step"] for m in run["mappings"]] == [0, 2]
    assert run["remaps"][0]["ok"] and run["remaps"][0]["moved_experts"] > 0
    expert_bytes = 3 * spec.hidden_size * spec.ffn_size * 4  # float32
    assert run["remaps"][0]["moved_bytes"] == run["remaps"][0]["moved_experts"] * expert_bytes
    assert [s["mapping"] for s in run["steps"]] == [0, 0, 1, 1]
    with Trace.open(tmp_path / "rec" / "trace.mtrace") as t:  # the trace continues across the remap
        assert t.num_steps == 4 and t.validate() == []
        assert ExpertMapping.from_dict(t.meta["mapping"]) == old
        tm = t.timings()
        after = tm.index[:, 0] >= 2
        rank1 = (tm.index[:, 2] == 1) & (tm.index[:, 1] == 0)
        assert tm.experts[after & rank1][0, :3].tolist() == new.gpu_experts(0, 1).tolist()
        assert tm.experts[~after & rank1][0, :3].tolist() == old.gpu_experts(0, 1).tolist()


@pytest.mark.parametrize(("fault", "transport"), [("corrupt:1", "p2p"), ("corrupt:3", "all2all"), ("raise:2", "p2p")])
def test_fault_mid_remap_keeps_old_mapping(tmp_path, fault, transport) -> None:
    spec = get_model("tiny")
    rng = np.random.default_rng(5)
    old = random_mapping(rng, spec.num_layers, spec.num_experts, 4, 0)
    new = random_mapping(rng, spec.num_layers, spec.num_experts, 4, 0)
    old.save(tmp_path / "old.json")
    new.save(tmp_path / "new.json")
    cfg = small_config(nproc=4, steps=3, mapping=str(tmp_path / "old.json"), remap_at=[(1, str(tmp_path / "new.json"))],
                       record=str(tmp_path / "rec"), remap_transport=transport)
    dumps = spawn_run(cfg, tmp_path / "dump", env={"MOESIM_REMAP_FAULT": fault})
    assert_matches_reference(cfg, dumps)
    truth = _checksums_of_source("tiny", cfg.seed)
    for d in dumps:
        assert d["mapping"] == old.phy2log.tolist()
        for key, value in d["checksums"]["final"].items():
            assert value == truth[key]
    run = json.loads((tmp_path / "rec" / "run.json").read_text())
    assert len(run["mappings"]) == 1 and not run["remaps"][0]["ok"]
    assert ("checksum" if fault.startswith("corrupt") else "injected fault") in run["remaps"][0]["error"]
    assert "old mapping kept" in run["remaps"][0]["error"]


@pytest.mark.parametrize("backend", ["all2all", "allgather"])
def test_triton_kernels_in_the_ep_layer(tmp_path, backend) -> None:
    """The GPU production path's kernels (Triton router + fused MoE with the slot map), run by the interpreter."""
    spec = get_model("tiny-deepseek")
    random_mapping(np.random.default_rng(9), spec.num_layers, spec.num_experts, 2, 1).save(tmp_path / "m.json")
    cfg = small_config(preset="tiny-deepseek", kernels="triton", backend=backend, steps=2,
                       mapping=str(tmp_path / "m.json"))
    assert_matches_reference(cfg, spawn_run(cfg, tmp_path / "dump"))


@pytest.mark.gpu
def test_one_gpu_nccl_run_matches_reference(tmp_path) -> None:
    """World size 1 on a CUDA GPU with NCCL and the Triton kernels; float32 against the CPU reference."""
    cfg = small_config(nproc=1, device="cuda", dtype="float32", steps=4, record=str(tmp_path / "rec"))
    assert_matches_reference(cfg, spawn_run(cfg, tmp_path / "dump"), rtol=2e-3)  # Triton dots may use TF32
    with Trace.open(tmp_path / "rec" / "trace.mtrace") as t:
        tm = t.timings()
        assert t.validate() == [] and (tm.phases >= 0).all()
        # a world of one has no dispatch or combine work (no collective at all): only those phases may read 0
        assert all((tm.phase(p) > 0).all() for p in ("attention", "gate", "expert"))
        # under CUDA graphs: the prefill and every 8th decode step from step 1 carry phase timings
        assert sorted(set(tm.index[:, 0].tolist())) == [0, 1]
