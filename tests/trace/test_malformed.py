"""Every malformed input, through the API (TraceError / MappingError) and the CLI (exit 2, one stderr line).

Traces: truncated (inside the header, inside a chunk), wrong magic, a future version, a corrupted checksum, ids out
of range, a wrong top-k, a header with no steps, a directory, a missing file. Mappings (through `moesim replay`):
an expert dropped, slots not divisible by the GPUs, ids out of range, a mapping made for another model.
``moesim trace validate`` answers 1 for a readable trace with problems (its documented convention), 2 otherwise.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.cli import main
from moesim.errors import MappingError, TraceError
from moesim.mapping import ExpertMapping
from moesim.models import get_model
from moesim.trace import Trace, TraceWriter
from moesim.trace import format as fmt

MODEL = get_model("tiny")  # 2 layers, 8 experts, top-2: 8 GPUs of dgx-h100 hold one expert each


def _steps(n: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, MODEL.num_experts, (MODEL.num_layers, 4 + i, MODEL.top_k)) for i in range(n)]


@pytest.fixture
def good(tmp_path) -> Path:
    """A sound trace of three steps, one chunk each."""
    path = tmp_path / "good.mtrace"
    with TraceWriter(path, MODEL, chunk_bytes=1) as w:
        for ids in _steps():
            w.add_step(ids)
    return path


def _chunk_starts(path: Path) -> list[int]:
    with Trace.open(path) as t:
        return [c["dir_start"] - fmt.CHUNK_HEAD.size for c in t._chunks] + [t.end_offset]


def _error(capsys, rc: int, *words: str) -> str:
    """The CLI's answer must be exit 2 and exactly one stderr line naming the problem."""
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moesim: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _crafted(path: Path, arrays: dict[str, np.ndarray], n_steps: int, model=MODEL) -> Path:
    """A trace whose only chunk holds ``arrays`` as given (valid checksum, contents chosen by the test)."""
    w = TraceWriter(path, model)
    w._write_chunk(0, n_steps, arrays)
    w.close()
    return path


# -- truncation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep, words", [(0, "too short"), (10, "too short"), (20, "truncated inside its header")])
def test_truncated_inside_the_header(tmp_path, good, capsys, keep, words):
    cut = tmp_path / "cut.mtrace"
    cut.write_bytes(good.read_bytes()[:keep])
    with pytest.raises(TraceError, match=words):
        Trace.open(cut)
    for cmd in ("show", "validate"):
        _error(capsys, main(["trace", cmd, str(cut)]), words, str(cut))


@pytest.mark.parametrize("inside", [1, fmt.CHUNK_HEAD.size - 1, fmt.CHUNK_HEAD.size + 5, -1])
def test_truncated_inside_a_chunk_keeps_the_complete_chunks(tmp_path, good, capsys, inside):
    starts = _chunk_starts(good)
    data = good.read_bytes()
    last = starts[-2]
    end = last + inside if inside > 0 else starts[-1] + inside
    cut = tmp_path / "cut.mtrace"
    cut.write_bytes(data[:end])
    with pytest.raises(TraceError, match="--allow-truncated"):
        Trace.open(cut)  # damage is refused unless asked for
    with Trace.open(cut, allow_truncated=True) as t:
        assert t.num_steps == 2 and t.num_chunks == 2
        assert "chunk 2" in t.truncated and "cut short" in t.truncated and "2 complete chunks" in t.truncated
        for step, ids in zip(t.steps(), _steps()[:2]):
            assert np.array_equal(step.ids, ids)
    _error(capsys, main(["trace", "show", str(cut)]), "cut short", "--allow-truncated")
    assert main(["trace", "show", "--allow-truncated", str(cut)]) == 0  # the complete steps read, the cut reported
    captured = capsys.readouterr()
    assert "cut short" in captured.out and "warning" in captured.err
    assert main(["trace", "validate", str(cut)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cut short" in err[0]


def test_truncated_inside_the_first_chunk(tmp_path, good, capsys):
    cut = tmp_path / "cut.mtrace"
    cut.write_bytes(good.read_bytes()[:_chunk_starts(good)[0] + 30])
    with pytest.raises(TraceError, match=r"holds no complete step .*cut short"):
        Trace.open(cut)
    _error(capsys, main(["trace", "show", str(cut)]), "no complete step", "cut short")


# -- header -------------------------------------------------------------------------------------------------
def test_wrong_magic(tmp_path, good, capsys):
    bad = tmp_path / "magic.mtrace"
    bad.write_bytes(b"NOTATRACE" + good.read_bytes()[9:])
    with pytest.raises(TraceError, match="bad magic"):
        Trace.open(bad)
    _error(capsys, main(["trace", "show", str(bad)]), "not a moesim trace")
    _error(capsys, main(["trace", "validate", str(bad)]), "not a moesim trace")


@pytest.mark.parametrize("version", [fmt.VERSION + 1, 0, 2**31])
def test_unsupported_version(tmp_path, good, capsys, version):
    data = bytearray(good.read_bytes())
    struct.pack_into("<I", data, 8, version)
    bad = tmp_path / "future.mtrace"
    bad.write_bytes(bytes(data))
    with pytest.raises(TraceError, match=f"version {version}"):
        Trace.open(bad)
    _error(capsys, main(["trace", "show", str(bad)]), f"version {version}", "reads versions 1..")


@pytest.mark.parametrize("body, words", [
    (b"{not json", "malformed header"),
    (b'{"format": "other"}', "not 'moesim.trace'"),
    (b'{"format": "moesim.trace", "kind": "tokens", "model": {"name": "x"}}', "malformed header"),
    (b'[1, 2]', "not a JSON object"),
])
def test_malformed_header(tmp_path, capsys, body, words):
    bad = tmp_path / "hdr.mtrace"
    bad.write_bytes(fmt.FILE_HEAD.pack(fmt.MAGIC, fmt.VERSION, len(body)) + body)
    with pytest.raises(TraceError, match="malformed header"):
        Trace.open(bad)
    _error(capsys, main(["trace", "show", str(bad)]), words)


def test_empty_trace(tmp_path, capsys):
    empty = tmp_path / "empty.mtrace"
    TraceWriter(empty, MODEL).close()  # a header and nothing else
    with pytest.raises(TraceError, match="holds no complete step"):
        Trace.open(empty)
    with Trace.open(empty, require_steps=False) as t:
        assert t.num_steps == 0 and t.truncated is None and list(t.steps()) == [] and t.load().shape == (0, 2, 8)
    _error(capsys, main(["trace", "show", str(empty)]), "holds no complete step")
    _error(capsys, main(["replay", "--trace", str(empty), "--topology", "dgx-h100", "--out", str(tmp_path / "r")]),
           "holds no complete step")
    assert main(["trace", "validate", str(empty)]) == 2
    assert "no complete step" in capsys.readouterr().err


def test_directory_and_missing_file(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    for path, words in ((tmp_path / "d", "is a directory"), (tmp_path / "nope.mtrace", "does not exist")):
        with pytest.raises(TraceError, match=words):
            Trace.open(path)
        for cmd in ("show", "validate"):
            _error(capsys, main(["trace", cmd, str(path)]), words)
        _error(capsys, main(["trace", "load", str(path), "--out", str(tmp_path / "l.json")]), words)
    assert not (tmp_path / "l.json").exists()


# -- chunk contents -----------------------------------------------------------------------------------------
def test_corrupted_checksum(tmp_path, good, capsys):
    data = bytearray(good.read_bytes())
    data[_chunk_starts(good)[1] - 5] ^= 0x01  # inside chunk 0's payload padding: still readable
    bad = tmp_path / "crc.mtrace"
    bad.write_bytes(bytes(data))
    with Trace.open(bad) as t:
        problems = t.validate()
    assert len(problems) == 1 and "chunk 0" in problems[0] and "checksum" in problems[0]
    assert main(["trace", "validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checksum" in err[0] and str(bad) in err[0]


def test_ids_out_of_range(tmp_path, capsys):
    w = TraceWriter(tmp_path / "api.mtrace", MODEL)
    ids = np.zeros((2, 3, 2), dtype=np.int64)
    ids[1, 2, 0] = 8
    with pytest.raises(TraceError, match=r"expert id out of range \[0, 8\)"):
        w.add_step(ids)
    with pytest.raises(TraceError, match="out of range"):
        w.add_step(ids - 9)
    w.close()
    # on disk (a foreign or corrupt writer): the reader refuses the chunk in one line, validate lists it
    bad = _crafted(tmp_path / "ids.mtrace", {"phase": np.zeros(1, "u1"), "step_tokens": np.array([3], "<i8"),
                                             "ids": ids.astype("<u2")}, 1)
    with Trace.open(bad) as t:
        with pytest.raises(TraceError, match=r"chunk 0 \(steps 0..0\) holds expert id 8, out of range"):
            t.load()
        with pytest.raises(TraceError, match="expert id 8"):
            list(t.steps())
    _error(capsys, main(["trace", "show", str(bad)]), "expert id 8", "out of range")
    _error(capsys, main(["trace", "load", str(bad), "--out", str(tmp_path / "l.npy")]), "expert id 8")
    _error(capsys, main(["replay", "--trace", str(bad), "--topology", "dgx-h100", "--out", str(tmp_path / "r"),
                         "--no-plots", "--quiet"]), "expert id 8")
    assert main(["trace", "validate", str(bad)]) == 2
    assert "expert id 8 out of range" in capsys.readouterr().err


def test_origin_out_of_range(tmp_path, capsys):
    with TraceWriter(tmp_path / "o.mtrace", MODEL, origin=True, num_ranks=2) as w:
        with pytest.raises(TraceError, match="origin rank out of range"):
            w.add_step(np.zeros((2, 3, 2), dtype=np.int64), origin=np.array([0, 1, 2]))
        with pytest.raises(TraceError, match="origin must have shape"):
            w.add_step(np.zeros((2, 3, 2), dtype=np.int64), origin=np.array([0, 1]))
        with pytest.raises(TraceError, match="pass origin"):
            w.add_step(np.zeros((2, 3, 2), dtype=np.int64))


@pytest.mark.parametrize("shape, words", [((2, 3, 3), "[2, tokens, 2]"), ((3, 3, 2), "[2, tokens, 2]"),
                                          ((3, 2), "[2, tokens, 2]")])
def test_wrong_top_k(tmp_path, capsys, shape, words):
    with TraceWriter(tmp_path / "api.mtrace", MODEL) as w, pytest.raises(TraceError, match=r"must have shape") as e:
        w.add_step(np.zeros(shape, dtype=np.int64))
    assert words in str(e.value)
    with TraceWriter(tmp_path / "w.mtrace", MODEL, weights=True) as w, \
            pytest.raises(TraceError, match="weights shape"):
        w.add_step(np.zeros((2, 3, 2), dtype=np.int64), weights=np.zeros((2, 3, 3)))
    # on disk: a chunk with top-3 ids in a top-2 trace is refused when the file is opened
    bad = _crafted(tmp_path / "k.mtrace", {"phase": np.zeros(1, "u1"), "step_tokens": np.array([3], "<i8"),
                                           "ids": np.zeros((2, 3, 3), "<u2")}, 1)
    with pytest.raises(TraceError, match=r"ids shape \[2, 3, 3\] is not \[layers 2, tokens 3, top-k 2\]"):
        Trace.open(bad)
    _error(capsys, main(["trace", "show", str(bad)]), "ids shape [2, 3, 3]", "top-k 2")
    assert main(["trace", "validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ids shape [2, 3, 3]" in err[0]


@pytest.mark.parametrize("arrays, words", [
    ({"phase": np.zeros(1, "u1"), "step_tokens": np.array([4], "<i8"), "ids": np.zeros((2, 3, 2), "<u2")},
     "tokens 4"),
    ({"phase": np.zeros(1, "u1"), "step_tokens": np.array([-3], "<i8"), "ids": np.zeros((2, 3, 2), "<u2")},
     "negative token count"),
    ({"phase": np.zeros(1, "u1"), "step_tokens": np.array([3], "<i8"), "ids": np.zeros((2, 3, 2), "<i4")},
     "ids dtype"),
    ({"phase": np.zeros(1, "u1"), "step_tokens": np.array([3], "<i8"), "ids": np.zeros((2, 3, 2), "<u2"),
      "origin": np.zeros(2, "<u2")}, "origin shape"),
    ({"phase": np.zeros(1, "u1"), "step_tokens": np.array([3], "<i8"), "ids": np.zeros((2, 3, 2), "<u2"),
      "timing_index": np.zeros((1, 3), "<i4"), "timing_phases": np.zeros((1, 4))}, "incomplete timing"),
    ({"phase": np.zeros(1, "u1"), "step_tokens": np.array([3], "<i8")}, "missing arrays"),
    ({"phase": np.zeros(2, "u1"), "step_tokens": np.array([3], "<i8"), "ids": np.zeros((2, 3, 2), "<u2")},
     "phase length"),
])
def test_inconsistent_chunks_are_refused_when_opened(tmp_path, capsys, arrays, words):
    bad = _crafted(tmp_path / "c.mtrace", arrays, 1)
    with pytest.raises(TraceError, match="no complete step") as e:
        Trace.open(bad)
    assert words in str(e.value) and "malformed directory" in str(e.value)
    _error(capsys, main(["trace", "show", str(bad)]), words)


def test_bad_load_only_chunks(tmp_path, capsys):
    counts = get_model("tiny")
    with TraceWriter(tmp_path / "api.mtrace", counts, kind="counts") as w:
        with pytest.raises(TraceError, match=r"counts must have shape \[2, 8\]"):
            w.add_counts(np.zeros((2, 7)))
        with pytest.raises(TraceError, match="negative count"):
            w.add_counts(-np.ones((2, 8)))
        with pytest.raises(TraceError, match="use add_counts"):
            w.add_step(np.zeros((2, 1, 2)))
    path = tmp_path / "neg.mtrace"
    w = TraceWriter(path, counts, kind="counts")
    w._write_chunk(0, 1, {"phase": np.zeros(1, "u1"), "counts": -np.ones((1, 2, 8), "<i8")})
    w.close()
    _error(capsys, main(["trace", "show", str(path)]), "negative load count")


# -- mappings -----------------------------------------------------------------------------------------------
@pytest.fixture
def replay(tmp_path, good, capsys):
    """Run `moesim replay` of the good trace on dgx-h100 (8 GPUs) with a mapping file holding ``data``."""
    def run(data) -> int:
        m = tmp_path / "m.json"
        m.write_text(json.dumps(data))
        capsys.readouterr()
        return main(["replay", "--trace", str(good), "--topology", "dgx-h100", "--mapping", str(m),
                     "--out", str(tmp_path / "out"), "--no-plots", "--quiet"])
    return run


def _moesim_mapping(p2l, gpus: int = 8, experts: int = 8) -> dict:
    return {"format": "moesim.mapping", "version": 1, "num_gpus": gpus, "num_experts": experts, "phy2log": p2l}


def test_mapping_that_drops_an_expert(replay, capsys):
    p2l = [list(range(8)), [0, 1, 2, 3, 4, 5, 6, 6]]
    with pytest.raises(MappingError, match="layer 1: logical expert 7 is held by no slot"):
        ExpertMapping(np.array(p2l), 8, 8)
    _error(capsys, replay(_moesim_mapping(p2l)), "layer 1", "expert 7", "held by no slot")
    _error(capsys, replay({"physical_to_logical_map": p2l}), "layer 1", "expert 7")  # SGLang's JSON too


def test_mapping_slots_not_divisible_by_gpus(replay, capsys):
    p2l = [list(range(8)) + [0]] * 2
    with pytest.raises(MappingError, match="9 physical slots per layer are not divisible by 8 GPUs"):
        ExpertMapping(np.array(p2l), 8, 8)
    _error(capsys, replay(_moesim_mapping(p2l)), "9 physical slots", "8 GPUs")
    _error(capsys, replay({"physical_to_logical_map": p2l}), "9 physical slots", "8 GPUs")


def test_mapping_ids_out_of_range(replay, capsys):
    p2l = [list(range(8)), [0, 1, 2, 3, 4, 5, 6, 11]]
    with pytest.raises(MappingError, match=r"layer 1 slot 7: expert id 11 is out of range \[0, 8\)"):
        ExpertMapping(np.array(p2l), 8, 8)
    _error(capsys, replay(_moesim_mapping(p2l)), "layer 1 slot 7", "expert id 11")


def test_mapping_for_another_model(replay, capsys):
    three_layers = ExpertMapping.linear(3, 8, 8).to_dict()
    _error(capsys, replay(three_layers), "3 layers", "'tiny' has 2")
    sixteen = ExpertMapping.linear(2, 16, 8).to_dict()
    _error(capsys, replay(sixteen), "16 experts", "'tiny' has 8")
    four_gpus = ExpertMapping.linear(2, 8, 4).to_dict()
    _error(capsys, replay(four_gpus), "4 GPUs", "has 8")
    _error(capsys, replay({"physical_to_logical_map": [list(range(8))] * 3}), "3 layers")


def test_mapping_file_problems(tmp_path, replay, capsys):
    _error(capsys, replay([1, 2, 3]), "expected a JSON object")
    _error(capsys, replay(_moesim_mapping([[0, 1], [0]])), "different lengths")
    (tmp_path / "m.json").write_text("{oops")
    _error(capsys, main(["replay", "--trace", str(tmp_path / "good.mtrace"), "--topology", "dgx-h100", "--mapping",
                         str(tmp_path / "m.json"), "--out", str(tmp_path / "out")]), "not valid JSON")
    _error(capsys, main(["replay", "--trace", str(tmp_path / "good.mtrace"), "--topology", "dgx-h100", "--mapping",
                         str(tmp_path / "missing.json"), "--out", str(tmp_path / "out")]), "does not exist")
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_good_mapping_replays(replay, capsys):
    """The fixture itself works: the errors above come from the mapping, not from the command line."""
    assert replay(ExpertMapping.round_robin(2, 8, 8).to_dict()) == 0


# -- anything else: no corruption may escape as a traceback --------------------------------------------------
def _rich_trace(path: Path) -> Path:
    rng = np.random.default_rng(5)
    with TraceWriter(path, MODEL, weights=True, origin=True, num_ranks=3, chunk_bytes=200) as w:
        for i, ids in enumerate(_steps(4)):
            w.add_step(ids, weights=rng.random(ids.shape), origin=rng.integers(0, 3, ids.shape[1]),
                       phase="decode" if i else "prefill")
            w.add_timing(i, 1, 2, [1, 2, 3, 4, 5], [0, 1, 2], [3, 4, 5])
    return path


def _survives(path: Path, capsys) -> None:
    """Reading through every API either works or raises TraceError; the CLI answers 0/1/2 without a traceback."""
    try:
        with Trace.open(path, require_steps=False) as t:
            for step in t.steps():
                assert step.ids is None or step.ids.shape[0] == MODEL.num_layers
            t.load()
            t.timings()
            t.validate()
            _ = t.num_tokens
    except TraceError as exc:
        assert "\n" not in str(exc)
    assert main(["trace", "show", str(path)]) in (0, 2)
    assert main(["trace", "validate", str(path)]) in (0, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err


def _with_header(good: Path, out: Path, **changes) -> Path:
    data = good.read_bytes()
    _, _, hlen = fmt.FILE_HEAD.unpack_from(data, 0)
    header = json.loads(data[fmt.FILE_HEAD.size:fmt.FILE_HEAD.size + hlen])
    rest = data[fmt.FILE_HEAD.size + hlen + fmt.pad(fmt.FILE_HEAD.size + hlen):]
    header.update(changes)
    body = json.dumps(header).encode()
    head = fmt.FILE_HEAD.pack(fmt.MAGIC, fmt.VERSION, len(body)) + body
    out.write_bytes(head + b"\0" * fmt.pad(len(head)) + rest)
    return out


@pytest.mark.parametrize("changes", [
    {"timing_phases": 5}, {"timing_phases": ["a"]}, {"timing_phases": [1, 2, 3, 4, 5]}, {"num_ranks": "x"},
    {"num_ranks": -1}, {"num_ranks": 1}, {"ids_dtype": "<f8"}, {"ids_dtype": None}, {"weights_dtype": "<f8"},
    {"weights_dtype": None}, {"has_origin": "yes"}, {"meta": 3}, {"meta": []}, {"kind": "counts"},
    {"version": 9}, {"model": {"name": "x", "num_layers": 2, "num_experts": 8, "top_k": 3, "hidden_size": 1,
                               "ffn_size": 1}},
])
def test_header_fields_of_the_wrong_kind(tmp_path, capsys, changes):
    path = _with_header(_rich_trace(tmp_path / "rich.mtrace"), tmp_path / "h.mtrace", **changes)
    _survives(path, capsys)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(edits=st.lists(st.tuples(st.one_of(st.integers(0, 700), st.integers(0, 1 << 14)), st.integers(0, 255)),
                      min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 1 << 14)))
def test_random_corruption_never_escapes(tmp_path_factory, capsys, edits, cut):
    d = tmp_path_factory.mktemp("fuzz")
    data = bytearray(_rich_trace(d / "rich.mtrace").read_bytes())
    for pos, value in edits:
        data[pos % len(data)] = value
    path = d / "bad.mtrace"
    path.write_bytes(bytes(data[:cut]))
    _survives(path, capsys)
