"""Importers: each public format read back exactly; malformed inputs are one-line TraceErrors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.errors import TraceError
from moesim.models import get_model
from moesim.trace import Trace
from moesim.trace.importers import import_trace, read_import

FIX = Path(__file__).resolve().parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_fixtures", FIX / "make_fixtures.py")
mf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mf)
TINY = get_model("tiny")

has_torch = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not has_torch, reason="reading .pt needs torch")


def _imported(tmp_path: Path, fmt: str, *files: str, **kw) -> Trace:
    out = tmp_path / f"{fmt}.mtrace"
    import_trace(fmt, [FIX / f for f in files], out, **kw)
    trace = Trace.open(out)
    assert trace.validate() == []
    return trace


@pytest.mark.parametrize("name", [pytest.param("sglang_stat.pt", marks=needs_torch), "sglang_stat.json"])
def test_sglang_stat(tmp_path, name):
    expected = mf.sglang_stat()["logical_count"][:3]  # the 4th buffer row is empty
    with _imported(tmp_path, "sglang", name, model=TINY) as trace:
        assert trace.kind == "counts" and trace.num_steps == 3
        assert np.array_equal(trace.load(), expected)
        assert trace.num_tokens == 12 + 5 + 7
        assert "unfilled" in trace.meta["note"]


@needs_torch
def test_sglang_stat_wrapped_buffer_in_time_order(tmp_path):
    """The dump of SGLang's circular buffer after a reset and a wrap: rows 3, 4, 0, 1 hold passes 1..4."""
    _, passes = mf.sglang_stat_wrapped()
    with _imported(tmp_path, "sglang", "sglang_stat_wrapped.pt", model=TINY) as trace:
        assert np.array_equal(trace.load(), passes)
        assert trace.meta["oldest_row"] == 3 and "oldest step is buffer row 3" in trace.meta["note"]


@given(size=st.integers(1, 6), ops=st.lists(st.one_of(st.just(-1), st.integers(1, 5)), min_size=1, max_size=14),
       seed=st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_sglang_stat_buffer_order_property(tmp_path_factory, size, ops, seed):
    """Any sequence of appends (tokens) and resets (-1): the import is the passes since the last reset, oldest
    first (when the buffer is full: the last `size` of them, given --buffer-start = the write index)."""
    rng = np.random.default_rng(seed)
    buf, since = mf.SGLangCircularBuffer(size, (2, 8)), []
    for op in ops:
        if op < 0:
            buf.reset()
            since = []
        else:
            c = mf._logical_count(mf._route(rng, op))
            buf.append(c)
            since.append(c)
    path = tmp_path_factory.mktemp("st") / "stat.json"
    path.write_text(json.dumps({"rank": 0, "logical_count": buf.get_all().tolist()}))
    if not since:
        with pytest.raises(TraceError, match="no load"):
            read_import("sglang", [path], model=TINY)
        return
    full = len(since) >= size
    imp = read_import("sglang", [path], model=TINY, buffer_start=buf.curr_index if full else None)
    assert np.array_equal(imp.counts, np.stack(since[-size:]))
    if full:
        plain = read_import("sglang", [path], model=TINY)
        assert "does not say where it wrapped" in plain.notes[0]
        assert np.array_equal(plain.counts, buf.get_all())


@needs_torch
def test_sglang_per_token_two_ranks(tmp_path):
    _, expected = mf.sglang_per_token()
    with _imported(tmp_path, "sglang", "sglang_per_token_rank1.pt", "sglang_per_token_rank0.pt") as trace:
        assert trace.kind == "tokens" and trace.model.name == "tiny"  # inferred from the shape
        assert trace.num_steps == 3 and trace.num_ranks == 2
        for step, ids in zip(trace.steps(), expected):
            assert np.array_equal(step.ids, ids)
        assert [s.phase for s in trace.steps()] == ["prefill", "decode", "decode"]
        assert np.array_equal(trace.step(0).origin, [0] * 6 + [1] * 4)
        assert trace.meta["forward_pass_ids"] == [100, 101, 102]


def test_sglang_per_pass_json(tmp_path):
    _, expected = mf.sglang_per_token()
    with _imported(tmp_path, "sglang", "sglang_per_pass.json", model=TINY) as trace:
        assert trace.kind == "counts"
        want = np.stack([[np.bincount(ids[layer].ravel(), minlength=8) for layer in range(2)] for ids in expected])
        assert np.array_equal(trace.load(), want)


@pytest.mark.parametrize("name", [pytest.param("vllm_eplb.pt", marks=needs_torch), "vllm_eplb.npz"])
def test_vllm_eplb_window_folded_and_unrolled(tmp_path, name):
    _, expected = mf.vllm_eplb()
    with _imported(tmp_path, "vllm-eplb", name, model=TINY) as trace:
        assert np.array_equal(trace.load(), expected)


def test_vllm_global_window_is_logical_already(tmp_path):
    """global_expert_load_window is per logical expert: taken as it is, never folded through the physical map."""
    state, expected = mf.vllm_eplb()
    np.savez(tmp_path / "g.npz", global_expert_load_window=expected,
             physical_to_logical_map=state["physical_to_logical_map"])  # P=10 physical slots, E=8 logical
    imp = read_import("vllm", [tmp_path / "g.npz"], model=TINY)
    assert np.array_equal(imp.counts, expected) and imp.meta["source"] == "vllm-eplb:global_expert_load_window"
    np.savez(tmp_path / "s.npz", global_expert_load_window=expected.sum(axis=0))  # vLLM's sum over the window
    assert np.array_equal(read_import("vllm", [tmp_path / "s.npz"]).counts, expected.sum(axis=0)[None])
    with pytest.raises(TraceError, match="already all-reduced"):
        read_import("vllm", [tmp_path / "g.npz", tmp_path / "g.npz"], model=TINY)


def test_vllm_rank_windows_summed_with_empty_slots(tmp_path, capsys):
    states, expected = mf.vllm_rank_windows(3)
    files = []
    for r, s in enumerate(states):
        np.savez(tmp_path / f"rank{r}.npz", **s)
        files.append(tmp_path / f"rank{r}.npz")
    imp = read_import("vllm", files, model=TINY)
    assert np.array_equal(imp.counts, expected)
    assert any("summed" in n for n in imp.notes) and any("empty physical slots" in n for n in imp.notes)
    assert not np.array_equal(read_import("vllm", files[:1], model=TINY).counts, expected)  # one rank: a part
    bad = dict(states[0])
    bad["expert_load_window"] = bad["expert_load_window"].copy()
    bad["expert_load_window"][0, 1, -1] = 3
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(TraceError, match="layer 1 physical slot 11 is empty"):
        read_import("vllm", [tmp_path / "bad.npz"], model=TINY)
    other = dict(states[1])
    other["expert_load_window_step"] = 2
    np.savez(tmp_path / "other.npz", **other)
    with pytest.raises(TraceError, match="expert_load_window_step differ"):
        read_import("vllm", [files[0], tmp_path / "other.npz"], model=TINY)
    out = tmp_path / "v.mtrace"
    from moesim.cli import main

    assert main(["trace", "import", "--format", "vllm", *map(str, files), "--model", "tiny", "--out", str(out)]) == 0
    with Trace.open(out) as trace:
        assert np.array_equal(trace.load(), expected)


def test_vllm_bare_npy_needs_the_mapping(tmp_path):
    _, expected = mf.vllm_eplb()
    with _imported(tmp_path, "vllm", "vllm_load.npy", model=TINY, mapping=FIX / "phy2log.json") as trace:
        assert np.array_equal(trace.load(), expected[[3, 0, 1, 2]])  # no window step: file order
    with pytest.raises(TraceError, match="--mapping"):
        read_import("vllm", [FIX / "vllm_load.npy"], model=TINY)


def test_megatron_trace_directory(tmp_path):
    """The directory --moe-routing-trace-path leaves: both ranks merged per step, MTP records kept apart."""
    _, decoder, _ = mf.megatron_trace()
    with _imported(tmp_path, "megatron", "megatron", model=TINY) as trace:
        assert trace.kind == "tokens" and not trace.has_weights and trace.num_ranks == 2
        assert trace.meta["layers"] == [1, 3] and trace.meta["steps"] == [0, 1, 2]
        assert trace.meta["stage"] == "pre_dispatch" and trace.meta["block"] == "decoder"
        assert "6 mtp:0 records" in trace.meta["note"]
        assert trace.num_steps == 3
        for step, ids in zip(trace.steps(), decoder):
            assert np.array_equal(step.ids, ids)
            assert step.phase is None
        assert np.array_equal(trace.step(0).origin, [0] * 3 + [1] * 4)


def test_megatron_files_in_any_order_and_mtp_block(tmp_path):
    _, decoder, mtp = mf.megatron_trace()
    d = FIX / "megatron"
    imp = read_import("megatron", [d / "router_trace_rank1.jsonl", d / "router_trace_rank0.jsonl"], model=TINY)
    assert all(np.array_equal(s[0], ids) for s, ids in zip(imp.steps, decoder))
    for select in ("mtp", "mtp:0"):
        imp = read_import("megatron", [d], model=TINY, select=select)
        assert imp.model.num_layers == 1 and imp.meta["layers"] == ["mtp0.0"]
        assert all(np.array_equal(s[0], ids) for s, ids in zip(imp.steps, mtp))
        assert "12 decoder records" in imp.notes[0]
    with pytest.raises(TraceError, match="no MTP head 1 records"):
        read_import("megatron", [d], model=TINY, select="mtp:1")
    with pytest.raises(TraceError, match="pass --model"):
        read_import("megatron", [d], select="mtp")
    with pytest.raises(TraceError, match="--select for megatron"):
        read_import("megatron", [d], model=TINY, select="encoder")


def test_megatron_micro_batches_concatenate(tmp_path):
    """A training iteration with two micro-batches writes each layer twice per step: tokens concatenate."""
    rng = np.random.default_rng(0)
    a, b = mf._route(rng, 2), mf._route(rng, 3)
    recs = [mf.megatron_record(5, layer, 0, x[j]) for x in (a, b) for j, layer in enumerate((0, 1))]
    src = tmp_path / "router_trace_rank0.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    imp = read_import("megatron", [tmp_path], model=TINY)
    assert np.array_equal(imp.steps[0][0], np.concatenate([a, b], axis=1)) and imp.meta["steps"] == [5]
    assert "micro-batches" in imp.notes[0]


@pytest.mark.parametrize("name", ["counts.csv", "counts.json"])
def test_counts_tables(tmp_path, name):
    with _imported(tmp_path, "counts", name, model=TINY) as trace:
        assert np.array_equal(trace.load()[0], mf.counts_table())
        assert trace.num_tokens == 40


# -- round trips (hypothesis) ---------------------------------------------------------------------------------
counts_strategy = st.integers(1, 4).flatmap(lambda S: st.lists(
    st.lists(st.lists(st.integers(0, 10**6), min_size=8, max_size=8), min_size=2, max_size=2),
    min_size=S, max_size=S))


@given(counts=counts_strategy, fmt=st.sampled_from(["sglang-json", "counts-json", "counts-npy", "counts-csv"]))
@settings(max_examples=25, deadline=None)
def test_counts_round_trip_exactly(tmp_path_factory, counts, fmt):
    tmp = tmp_path_factory.mktemp("rt")
    arr = np.array(counts, dtype=np.int64)
    arr[:, :, 0] += 1  # no all-zero step (SGLang drops those as unfilled buffer rows)
    if fmt == "sglang-json":
        src = tmp / "dump.json"
        src.write_text(json.dumps({"rank": 0, "logical_count": arr.tolist()}))
        name = "sglang"
    elif fmt == "counts-json":
        src = tmp / "load.json"
        src.write_text(json.dumps({"load": arr.tolist()}))
        name = "counts"
    elif fmt == "counts-npy":
        src = tmp / "load.npy"
        np.save(src, arr, allow_pickle=False)
        name = "counts"
    else:
        arr = arr[:1]
        src = tmp / "load.csv"
        src.write_text("\n".join(",".join(map(str, r)) for r in arr[0]))
        name = "counts"
    out = tmp / "t.mtrace"
    import_trace(name, [src], out, model=TINY)
    with Trace.open(out) as trace:
        assert np.array_equal(trace.load(), arr)


@given(data=st.data())
@settings(max_examples=25, deadline=None)
def test_vllm_physical_counts_fold_to_logical_exactly(tmp_path_factory, data):
    """Any split of logical load over replicas folds back to the logical load (conservation)."""
    tmp = tmp_path_factory.mktemp("vl")
    W = data.draw(st.integers(1, 5))
    extra = data.draw(st.lists(st.integers(0, 7), min_size=0, max_size=6))
    p2l = np.array([list(range(8)) + extra] * 2)
    perm = data.draw(st.permutations(range(p2l.shape[1])))
    p2l = p2l[:, list(perm)]
    phys = np.array(data.draw(st.lists(st.integers(0, 1000), min_size=W * 2 * p2l.shape[1],
                                       max_size=W * 2 * p2l.shape[1]))).reshape(W, 2, -1)
    phys[:, :, 0] += 1
    logical = np.zeros((W, 2, 8), dtype=np.int64)
    for layer in range(2):
        for slot in range(p2l.shape[1]):
            logical[:, layer, p2l[layer, slot]] += phys[:, layer, slot]
    src = tmp / "eplb.json"
    src.write_text(json.dumps({"expert_load_window": phys.tolist(), "physical_to_logical_map": p2l.tolist()}))
    out = tmp / "t.mtrace"
    import_trace("vllm-eplb", [src], out, model=TINY)
    with Trace.open(out) as trace:
        assert np.array_equal(trace.load(), logical)


@given(seed=st.integers(0, 2**31), steps=st.integers(1, 4), ranks=st.integers(1, 3))
@settings(max_examples=20, deadline=None)
def test_megatron_round_trip_conserves_tokens(tmp_path_factory, seed, steps, ranks):
    """Token ids survive exactly (DeepSeek-style dense-first numbering), counts sum to tokens x top_k per layer."""
    tmp = tmp_path_factory.mktemp("mg")
    rng = np.random.default_rng(seed)
    model = get_model("tiny-deepseek")
    files: dict[int, list[str]] = {r: [] for r in range(ranks)}
    expected = []
    for step in range(steps):
        parts = []
        for rank in range(ranks):
            T = int(rng.integers(0, 6))
            ids = np.array([[rng.choice(16, 4, replace=False) for _ in range(T)] for _ in range(2)]).reshape(2, T, 4)
            for j, layer in enumerate((3, 4)):
                files[rank].append(json.dumps(mf.megatron_record(step, layer, rank, ids[j])))
            parts.append(ids)
        expected.append(np.concatenate(parts, axis=1))
    for rank, lines in files.items():
        (tmp / f"router_trace_rank{rank}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp / "t.mtrace"
    tokens = [e.shape[1] for e in expected]
    if not sum(tokens):
        with pytest.raises(TraceError, match="no tokens"):
            import_trace("megatron", [tmp], out, model=model)
        return
    import_trace("megatron", [tmp], out, model=model)
    with Trace.open(out) as trace:
        assert trace.num_tokens == sum(tokens) and trace.meta["layers"] == [3, 4]
        assert np.array_equal(trace.load().sum(axis=2), np.repeat(np.array(tokens)[:, None], 2, 1) * 4)
        for step, ids in zip(trace.steps(), expected):
            assert np.array_equal(step.ids, ids)


# -- malformed inputs ---------------------------------------------------------------------------------------
def _write(tmp: Path, name: str, text: str | bytes) -> Path:
    p = tmp / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _mg(step: int, layer: int, top: list, **kw) -> str:
    """One line of a Megatron-Core router trace (fixture writer's record), fields overridden by ``kw``."""
    rec = mf.megatron_record(step, layer, 0, np.array(top, dtype=np.int64).reshape(len(top), -1))
    rec.update(kw)
    return json.dumps(rec) + "\n"


BAD = [
    ("sglang", "x.json", "{}", "no field 'records'"),
    ("sglang", "x.json", "[1, 2", "not valid JSON"),
    ("sglang", "x.json", '{"logical_count": [[[1, -2]]]}', "negative"),
    ("sglang", "x.json", '{"logical_count": [[1, 2], [3]]}', "not a rectangular|numeric"),
    ("sglang", "x.json", '{"logical_count": [[[0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]]]}', "no load"),
    ("sglang", "x.json", '{"records": [{"forward_pass_id": 0, "global_physical_count": [[1]]}]}', "preset"),
    ("sglang", "x.txt", "hello", "unsupported extension"),
    ("sglang", "x.pt", b"garbage bytes", "not a readable torch file|needs torch"),
    ("vllm-eplb", "x.json", '{"foo": 1}', "expert_load_window"),
    ("vllm-eplb", "x.npy", b"\x93NUMPY garbage", "not a readable numpy file"),
    ("vllm-eplb", "x.json", '{"expert_load_window": [[[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]]],'
                            ' "physical_to_logical_map": [[0, 1, 2, 3, 4, 5, 6, 9], [0, 1, 2, 3, 4, 5, 6, 7]]}',
     "outside"),
    ("megatron", "router_trace_rank0.jsonl", _mg(0, 0, [[0, 0]]) + _mg(0, 1, [[0, 1]]), "same expert twice"),
    ("megatron", "router_trace_rank0.jsonl", _mg(0, 0, [[0, 1]]) + _mg(1, 1, [[0, 1]]), "lacks decoder layers"),
    ("megatron", "router_trace_rank0.jsonl", _mg(0, 0, [[0, 9]]) + _mg(0, 1, [[0, 1]]), "outside"),
    ("megatron", "router_trace_rank0.jsonl", _mg(0, 0, [[0, 1]], num_tokens=2), "num_tokens says 2"),
    ("megatron", "router_trace_rank0.jsonl", _mg(0, 0, [[0, 1, 2]], topk=2), "topk=2"),
    ("megatron", "router_trace_rank0.jsonl", _mg(0, 0, [[0, 1]], block='encoder'), "block must be"),
    ("megatron", "router_trace_rank0.jsonl", _mg(0, 0, [[0, 1]], block='mtp'), "mtp_idx"),
    ("megatron", "router_trace_rank0.jsonl", _mg(-1, 0, [[0, 1]]), "non-negative integer"),
    ("megatron", "router_trace_rank0.jsonl", _mg(0, 0, [[0, 1]], stage=3), "stage must be"),
    ("megatron", "router_trace_rank0.jsonl", _mg(0, 0, [[0, 1]]) + _mg(0, 1, [[0, 1]], stage='x'), "several stages"),
    ("megatron", "router_trace_rank0.jsonl", '{"iteration": 0, "layer": 0, "topk_idx": [[0, 1]]}', "lacks step"),
    ("megatron", "router_trace_rank0.jsonl", "not json\n", "not valid JSON"),
    ("megatron", "router_trace_rank0.jsonl", "[1]\n", "not a JSON object"),
    ("megatron", "router_trace_rank0.jsonl", "", "no records"),
    ("counts", "x.csv", "1,2,3\n4,5\n", "different lengths"),
    ("counts", "x.csv", "a,b\n", "not a CSV of numbers"),
    ("counts", "x.json", '{"load": [[1.5, 2]]}', "fractional values.*moesim place --load"),
    ("counts", "z.json", '{"load": [[0, 0]]}', "all zero"),
    ("counts", "x.json", '{"load": [[1, 2], [3, 4]]}', "preset|experts"),
    ("olmoe", "x.json", '{"olmoe/expert_counts/x": {"pairs": []}}', "no load counts"),
    ("olmoe", "x.json", '{"a/b/c": {"counts": []}}', "no entry"),
    ("olmoe", "x.json", "[]", "not the OLMoE"),
    ("switch", "x.json", '{"expert_usage_by_layer": {"1": {"0": -3}}, "layers": [1]}', "bad entry"),
]


@pytest.mark.parametrize("fmt,name,text,match", BAD)
def test_malformed_inputs_are_one_line_errors(tmp_path, fmt, name, text, match):
    src = _write(tmp_path, name, text)
    model = None if match == "preset" else TINY
    if fmt in ("olmoe", "switch"):
        model = None
    with pytest.raises(TraceError, match=match) as err:
        import_trace(fmt, [src], tmp_path / "out.mtrace", model=model)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out.mtrace").exists()


def test_missing_file_and_directory(tmp_path):
    for fmt in ("sglang", "vllm", "megatron", "counts", "mixtral-csv", "olmoe", "switch"):
        with pytest.raises(TraceError, match="does not exist"):
            read_import(fmt, [tmp_path / "nope.json"])
    with pytest.raises(TraceError, match="no router_trace_rank"):
        read_import("megatron", [tmp_path])
        with pytest.raises(TraceError, match="directory"):
            read_import(fmt, [tmp_path])


# -- the real statistics in ../shared/data/routing -------------------------------------------------------------
def test_real_mixtral_counts(tmp_path, shared_data):
    for name in ("expert_activation_count.csv", "expert_activation_count.npy"):
        out = tmp_path / f"{name}.mtrace"
        import_trace("mixtral-csv", [shared_data / "mixtral-8x7b-expert-counts" / name], out)
        with Trace.open(out) as trace:
            assert trace.model.name == "mixtral-8x7b" and trace.model.num_layers == 32
            load = trace.load()[0]
            assert load.shape == (32, 8) and np.all(load.sum(axis=1) == 119_010)
            assert trace.num_tokens == 59_505
            ratio = load.max(axis=1) / load.mean(axis=1)
            assert ratio.min() >= 1.1 and ratio.max() <= 1.96


def test_real_olmoe_counts(tmp_path, shared_data):
    src = shared_data / "olmoe-routing-analysis" / "expert_counts_all.json"
    out = tmp_path / "o.mtrace"
    import_trace("olmoe", [src], out)
    with Trace.open(out) as trace:
        assert trace.model.name == "olmoe-1b-7b" and trace.model.num_layers == 3 and trace.model.top_k == 8
        assert trace.meta["layers"] == [0, 7, 15] and trace.meta["model_layers"] == 16
        assert trace.num_steps == 6  # arxiv, book, c4, github, tulu, wikipedia
        load = trace.load()
        assert np.all(load[0].sum(axis=1) == 1_671_168)  # arxiv: 208,896 tokens x 8
        assert load[0].sum(axis=1)[0] // 8 == 208_896
    out2 = tmp_path / "m.mtrace"
    import_trace("olmoe", [src], out2, select="mistral/expert_counts/arxiv")
    with Trace.open(out2) as trace:
        assert trace.model.name == "mixtral-8x7b" and trace.num_steps == 1
        assert np.all(trace.load()[0].sum(axis=1) == 417_792)


def test_real_switch_counts(tmp_path, shared_data):
    out = tmp_path / "s.mtrace"
    import_trace("switch", [shared_data / "switch-base-128-expert-counts" / "expert_statistics_3d.json"], out)
    with Trace.open(out) as trace:
        assert trace.model.name == "switch-base-128" and trace.model.num_layers == 6
        assert trace.meta["layers"] == [1, 3, 5, 7, 9, 11]
        load = trace.load()[0]
        assert np.all(load.sum(axis=1) == 206_866)
        ratio = load.max(axis=1) / load.mean(axis=1)
        assert ratio.max() > 25  # heavily skewed: the README's 2.5-31x


def test_sglang_per_token_identical_ranks_kept_once(tmp_path):
    """Under tensor-parallel attention every rank records the same tokens: import them once."""
    dumps, _ = mf.sglang_per_token()
    rank0 = mf._jsonable(dumps[0])
    twin = json.loads(json.dumps(rank0))
    for rec in twin["records"]:
        rec["rank"] = 1
    (tmp_path / "r0.json").write_text(json.dumps(rank0))
    (tmp_path / "r1.json").write_text(json.dumps(twin))
    out = tmp_path / "t.mtrace"
    _, info = import_trace("sglang", [tmp_path / "r0.json", tmp_path / "r1.json"], out, model=TINY)
    assert any("kept once" in n for n in info["notes"])
    with Trace.open(out) as trace:
        assert [s.num_tokens for s in trace.steps()] == [6, 2, 2]


def test_megatron_deepseek_v3_numbering_finds_the_preset(tmp_path):
    """DeepSeek-V3 in Megatron-Core: routers on decoder layers 3..60 (the first 3 are dense), 256 experts, top-8,
    plus one MTP head; the shape alone names the preset."""
    rng = np.random.default_rng(1)
    lines = []
    for layer in range(3, 61):
        top = np.stack([rng.choice(256, 8, replace=False) for _ in range(2)])
        top[0, 0] = 255 if 255 not in top[0] else top[0, 0]
        lines.append(json.dumps(mf.megatron_record(0, layer, 0, top)))
    lines.append(json.dumps(mf.megatron_record(0, 0, 0, np.stack([rng.choice(256, 8, replace=False)] * 2), 0)))
    (tmp_path / "router_trace_rank0.jsonl").write_text("\n".join(lines) + "\n")
    imp = read_import("megatron", [tmp_path])
    assert imp.model.name == "deepseek-v3" and imp.meta["layers"] == list(range(3, 61))
    assert imp.steps[0][0].shape == (58, 2, 8)
    mtp = read_import("megatron", [tmp_path], model=get_model("deepseek-v3"), select="mtp")
    assert mtp.model.num_layers == 1 and mtp.steps[0][0].shape == (1, 2, 8)
