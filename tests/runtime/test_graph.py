"""The graph-ready forward pass (moesim.runtime.graph): equal to the reference model, no host synchronisation,
in-place remap state, steps without phase timings; CUDA-graph replay on a GPU."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")  # the runtime needs torch; moesim itself does not

import json

import numpy as np
import torch
import torch.distributed as dist
from hypothesis import example, given, settings
from hypothesis import strategies as st
from moesim.runtime.config import RunConfig
from moesim.runtime.graph import Engine, bucket_for, prefill_chunks, static_attention
from moesim.runtime.model import build_decoder, make_tokens
from moesim.runtime.testing import (
    HostSyncError,
    assert_matches_reference,
    forbid_host_sync,
    free_port,
    probe_entry,
    random_mapping,
    small_config,
    spawn_run,
)
from moesim.runtime.weights import SeededWeights
from moesim.runtime.worker import chunk_kv_positions, kv_positions

from moesim import kernels
from moesim.mapping import ExpertMapping
from moesim.models import get_model
from moesim.replica import ReplicaPolicy, choose_slots
from moesim.trace import Trace

torch.set_num_threads(1)


def _model(preset: str = "tiny", **changes):
    spec = get_model(preset).with_(**changes) if changes else get_model(preset)
    return spec, build_decoder(spec, SeededWeights(spec, 0), "cpu", torch.float32)


@pytest.fixture(scope="module")
def world_of_one():
    """An in-process gloo group of one rank (the EP layer asks torch.distributed for its rank and world)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_buckets_and_chunks() -> None:
    assert [bucket_for(b) for b in (1, 3, 128, 129, 512, 600)] == [1, 4, 128, 160, 512, 640]
    assert prefill_chunks(5, 2) == [(0, 2), (2, 2), (4, 1)]
    assert prefill_chunks(5, 0) == prefill_chunks(5, 9) == [(0, 5)]
    for window in (None, 3):  # one chunk over the whole prompt: the unchunked prefill's figure
        assert chunk_kv_positions(0, 7, window) == kv_positions(0, 7, window)
    assert chunk_kv_positions(4, 2, None) == 5.5  # tokens at positions 4 and 5 see 5 and 6 keys


@pytest.mark.parametrize("window", [None, 3, 6])
@pytest.mark.parametrize("chunks", [[9], [6, 1, 1, 1], [4, 3, 2], [1] * 9])
def test_static_attention_equals_reference_attention(window, chunks) -> None:
    """Fixed-size cache + device length mask + grouped GQA = the reference attention, chunk by chunk."""
    spec, model = _model("tiny", sliding_window=window) if window else _model("tiny")
    assert spec.num_attention_heads != spec.num_kv_heads  # the grouped-query path is exercised
    torch.manual_seed(0)
    x = torch.randn(2, sum(chunks), spec.hidden_size)
    ref_cache, cache = model.new_cache(2, sum(chunks)), model.new_cache(2, 64)
    start = 0
    for n in chunks:
        ref = model.attention(0, x[:, start:start + n], ref_cache)
        ref_cache.length += n
        got = static_attention(model, 0, x[:, start:start + n], cache)
        cache.lens += n
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        start += n


def test_static_attention_with_a_different_length_per_sequence() -> None:
    """Sequences of 2, 7 and 4 cached tokens decode together; each equals its own single-sequence reference."""
    spec, model = _model("tiny")
    torch.manual_seed(1)
    lens = [2, 7, 4]
    cache = model.new_cache(3, 64)
    refs = []
    for b, n in enumerate(lens):
        x = torch.randn(1, n + 1, spec.hidden_size)
        rc = model.new_cache(1, n + 1)
        model.attention(0, x[:, :n], rc)
        rc.length = n
        refs.append((x[:, n:], model.attention(0, x[:, n:], rc)))
        cache.k[0, b, :, :n], cache.v[0, b, :, :n] = rc.k[0, 0, :, :n], rc.v[0, 0, :, :n]
    cache.lens.copy_(torch.tensor(lens))
    got = static_attention(model, 0, torch.cat([r[0] for r in refs]), cache)
    torch.testing.assert_close(got, torch.cat([r[1] for r in refs]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("preset", "window"), [("tiny", None), ("tiny-deepseek", None), ("tiny", 4)])
def test_engine_equals_reference_forward(preset, window) -> None:
    """Chunked prefill and padded-bucket decode steps through the Engine give the reference model's logits."""
    spec, model = _model(preset, sliding_window=window) if window else _model(preset)
    _, ref = _model(preset, sliding_window=window) if window else _model(preset)
    B, P, steps = 3, 7, 4
    engine = Engine(model, B, P + steps, rank=0, graphs=False)
    assert engine.bucket == 4 and engine.cache.max_len % 64 == 0
    engine.warm_up([3, 1])  # warm-up leaves no trace in the cache's lengths
    assert int(engine.cache.lens.abs().sum()) == 0 and engine.position == 0
    ref_cache = ref.new_cache(B, P + steps)
    prompt = make_tokens(0, 0, 0, (B, P), spec.vocab_size)
    want = ref.forward(prompt, ref_cache)
    got = torch.cat([engine.prefill(prompt[:, s:s + n])[0] for s, n in prefill_chunks(P, 3)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for step in range(1, steps):
        tokens = make_tokens(0, 0, step, (B, 1), spec.vocab_size)
        logits, ids, weights = engine.decode(tokens)
        assert ids.shape == (spec.num_layers, B, spec.top_k) and weights.shape == ids.shape
        torch.testing.assert_close(logits, ref.forward(tokens, ref_cache)[:, 0], rtol=1e-5, atol=1e-5)
    assert engine.cache.lens[:B].tolist() == [P + steps - 1] * B


def test_forbid_host_sync_catches_every_kind_of_read() -> None:
    """The guard the no-host-sync tests rely on does fail: each forbidden read raises inside, works outside."""
    t = torch.arange(4.0)
    reads = [lambda: t[0].item(), lambda: t.tolist(), lambda: bool(t[0]), lambda: int(t[1]), lambda: float(t[1]),
             lambda: torch.nonzero(t), lambda: t.nonzero(), lambda: torch.bincount(t.long()), lambda: t.cpu(),
             lambda: t.numpy(), lambda: torch.repeat_interleave(t.long()), lambda: t.unique()]
    # (boolean-mask indexing, x[mask], syncs on CUDA too but cannot be patched: the GPU test's sync debug mode
    # covers it)
    with forbid_host_sync():
        for read in reads:
            with pytest.raises(HostSyncError):
                read()
        # the torch reference expert kernel sizes its groups on the host: the guard sees it
        w13, w2 = torch.randn(2, 8, 4), torch.randn(2, 4, 4)
        with pytest.raises(HostSyncError):
            kernels.fused_moe(torch.randn(3, 4), w13, w2, torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.long),
                              impl="torch")
    for read in reads:
        read()  # restored


def test_set_mapping_updates_device_tables_in_place(world_of_one) -> None:
    """A remap rewrites the slot map and replica table inside the same buffers a captured graph reads."""
    from moesim.runtime.dispatch import make_backend
    from moesim.runtime.moe_layer import EPMoE, load_store

    spec = get_model("tiny")
    rng = np.random.default_rng(4)
    old, new = (random_mapping(rng, spec.num_layers, spec.num_experts, 1, extra) for extra in (2, 2))
    policy = ReplicaPolicy()
    src = SeededWeights(spec, 0)
    lay = EPMoE(spec, 0, 0, load_store(src, spec, old, 0, 0, "cpu", torch.float32), old, make_backend("all2all"),
                policy)
    ptrs = [lay.slot_map.data_ptr(), lay.table.data_ptr(), lay.count.data_ptr()]
    lay.set_mapping(new, load_store(src, spec, new, 0, 0, "cpu", torch.float32))
    assert [lay.slot_map.data_ptr(), lay.table.data_ptr(), lay.count.data_ptr()] == ptrs
    ids = torch.from_numpy(rng.integers(0, spec.num_experts, (16, spec.top_k)))
    key = torch.arange(16)
    table, count = policy.tables(new, 0)
    want = choose_slots(table, count, ids.numpy(), np.zeros(16, dtype=np.int64), key.numpy())
    got = choose_slots(lay.table, lay.count, ids, torch.zeros(16, dtype=torch.long), key)
    assert np.array_equal(got.numpy(), want)
    # every slot maps to the row that holds its expert
    rows = lay.store.row_expert
    for j, e in enumerate(new.gpu_experts(0, 0).tolist()):
        assert rows[int(lay.slot_map[j])] == e



@pytest.mark.dist
@pytest.mark.parametrize(("world", "backend"), [(1, "all2all"), (2, "allgather"), (4, "all2all")])
def test_graph_ready_steps_never_ask_the_host(tmp_path, world, backend) -> None:
    """Every prefill chunk and decode step runs with item/tolist/nonzero/bincount/cpu/... raising; outputs equal the
    single-process reference; every token-choice is computed by exactly one slot."""
    spec = get_model("tiny")
    random_mapping(np.random.default_rng(world), spec.num_layers, spec.num_experts, world, 1).save(tmp_path / "m.json")
    cfg = small_config(nproc=world, backend=backend, batch=3, prompt_len=5, prefill_chunk=2, steps=3,
                       mapping=str(tmp_path / "m.json"))
    dumps = spawn_run(cfg, tmp_path / "dump", entry=probe_entry)
    assert_matches_reference(cfg, dumps)
    for i, (_, n) in enumerate(prefill_chunks(cfg.prompt_len, cfg.prefill_chunk)):
        per_layer = sum(d["slot_tokens"][i] for d in dumps).sum(dim=1)  # [L] over ranks and slots
        assert per_layer.tolist() == [cfg.batch * n * spec.top_k * world] * spec.num_layers


@pytest.mark.dist
@settings(max_examples=2, deadline=None)
@given(world=st.sampled_from([1, 2, 4]), backend=st.sampled_from(["all2all", "allgather"]), extra=st.integers(0, 2),
       batch=st.sampled_from([1, 3]), chunk=st.sampled_from([0, 2, 3]),
       preset=st.sampled_from(["tiny", "tiny-deepseek"]), seed=st.integers(0, 2**31))
@example(world=1, backend="all2all", extra=0, batch=3, chunk=2, preset="tiny", seed=1)
@example(world=4, backend="allgather", extra=2, batch=1, chunk=0, preset="tiny-deepseek", seed=2)
def test_worker_equals_reference(tmp_path_factory, world, backend, extra, batch, chunk, preset, seed) -> None:
    """The worker (warm-up, chunked prefill, padded decode bucket) equals the reference; the record says how."""
    spec = get_model(preset)
    tmp = tmp_path_factory.mktemp("graph")
    random_mapping(np.random.default_rng(seed), spec.num_layers, spec.num_experts, world, extra).save(tmp / "m.json")
    cfg = small_config(preset=preset, nproc=world, backend=backend, batch=batch, prefill_chunk=chunk, steps=3,
                       mapping=str(tmp / "m.json"), seed=seed % 1000, record=str(tmp / "rec"))
    assert_matches_reference(cfg, spawn_run(cfg, tmp / "dump"))
    chunks = prefill_chunks(cfg.prompt_len, chunk)
    run = json.loads((tmp / "rec" / "run.json").read_text())
    assert run["warmup_s"] > 0 and run["execution"]["decode_bucket"] == bucket_for(batch)
    assert not run["execution"]["graphs"] and all(s["timed"] for s in run["steps"])  # CPU: every step timed
    assert [s["phase"] for s in run["steps"]] == ["prefill"] * len(chunks) + ["decode"] * (cfg.steps - 1)
    with Trace.open(tmp / "rec" / "trace.mtrace") as t:
        assert t.num_steps == len(chunks) + cfg.steps - 1 and t.validate() == []
        assert [s.num_tokens for s in t.steps()] == [batch * n * world for _, n in chunks] + [batch * world] * 2
        tm = t.timings()
        assert len(tm) == t.num_steps * spec.num_layers * world
        assert int(tm.tokens.sum()) == int(t.load().sum())  # padding rows were never routed nor counted


def test_steps_without_phase_timings_are_recorded_and_consumed(tmp_path) -> None:
    """A replayed-graph step (timer None) has routing but no timing records; run.json says which steps are timed;
    the trace validates, the cost fit and validate's measurement read it (NaN phases where a step has none)."""
    from moesim.runtime.recorder import Recorder, StepTimer

    from moesim.cost import CostModel
    from moesim.validate import measure

    spec = get_model("tiny")
    mapping = ExpertMapping.linear(spec.num_layers, spec.num_experts, 1)
    rec = Recorder(tmp_path, spec, 0, 1, RunConfig(nproc=1).to_dict(), mapping)
    rng = np.random.default_rng(0)
    timed = [True, True, False, True, False]
    for step, has in enumerate(timed):
        T = 6 if step == 0 else 2
        ids = torch.from_numpy(np.stack([rng.permutation(spec.num_experts)[:spec.top_k] for _ in range(T)]))
        ids = ids[None].repeat(spec.num_layers, 1, 1)
        timer = None
        if has:
            timer = StepTimer(spec.num_layers, mapping.slots_per_gpu, torch.device("cpu"))
            timer.seconds[:] = 1e-3 * (1 + step) * (1 + rng.random(timer.seconds.shape))
            timer.slot_tokens[:] = np.bincount(ids[0].flatten().numpy(), minlength=spec.num_experts)
        rec.record_step(step, "prefill" if step == 0 else "decode", ids, torch.full(ids.shape, 0.5), timer,
                        [list(range(spec.num_experts))] * spec.num_layers, 0.01, T, float(4 + step))
    rec.close()
    run = json.loads((tmp_path / "run.json").read_text())
    assert [s["timed"] for s in run["steps"]] == timed
    with Trace.open(tmp_path / "trace.mtrace") as t:
        assert t.num_steps == 5 and t.validate() == []
        tm = t.timings()
        assert sorted(set(tm.index[:, 0].tolist())) == [0, 1, 3]
        CostModel.fit_trace(t)  # fits on the timed steps only
        m = measure(tmp_path, t)
    assert np.isnan(m.phase_time[[2, 4]]).all() and not np.isnan(m.phase_time[[0, 1, 3]]).any()


# -- GPU: CUDA-graph replay ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_decode_replays_equal_eager_without_syncing(world_of_one) -> None:
    """World of one on a GPU (Triton kernels, float32): graph replays equal the eager steps, and replay runs under
    ``torch.cuda.set_sync_debug_mode("error")`` (any synchronising call would raise)."""
    from moesim.runtime.worker import build_rank

    cfg = RunConfig(preset="tiny", nproc=1, batch=3, prompt_len=6, steps=6, device="cuda", dtype="float32")
    dev = torch.device("cuda")
    engines = []
    for graphs in (True, False):
        engine, _ = build_rank(RunConfig.from_dict({**cfg.to_dict(), "graphs": graphs}), 0, 1, dev)
        with torch.inference_mode():
            engine.warm_up([cfg.prompt_len])
        engines.append(engine)
    assert engines[0].graph is not None and engines[1].graph is None
    spec = get_model("tiny")
    with torch.inference_mode():
        prompt = make_tokens(0, 0, 0, (3, cfg.prompt_len), spec.vocab_size).to(dev)
        outs = [e.prefill(prompt)[0] for e in engines]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
        for step in range(1, cfg.steps):
            tokens = make_tokens(0, 0, step, (3, 1), spec.vocab_size).to(dev)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                graphed = [x.clone() for x in engines[0].decode(tokens)]
            finally:
                torch.cuda.set_sync_debug_mode("default")
            eager = engines[1].decode(tokens)
            torch.testing.assert_close(graphed[0], eager[0], rtol=1e-4, atol=1e-4)
            assert torch.equal(graphed[1], eager[1])  # the same routing
        assert torch.equal(engines[0].cache.lens, engines[1].cache.lens)
