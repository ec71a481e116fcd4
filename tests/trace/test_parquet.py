"""Parquet export/import: exact round trips, the table as dataframe tools see it, malformed tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.cli import main
from moesim.errors import TraceError
from moesim.models import get_model
from moesim.trace import Trace, TraceWriter
from moesim.trace.parquet import export_parquet, read_parquet
from moesim.trace.sources import write_imported

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
TINY = get_model("tiny")  # 2 layers, 8 experts, top-2


def _token_trace(path: Path, rng: np.random.Generator, tokens: list[int], weights: bool, origin: bool,
                 kv: bool) -> list[tuple]:
    steps = []
    with TraceWriter(path, TINY, kind="tokens", weights=weights, weights_dtype="float32", origin=origin,
                     num_ranks=3 if origin else None, meta={"source": "test"}) as w:
        for i, T in enumerate(tokens):
            ids = np.array([[rng.choice(8, 2, replace=False) for _ in range(T)] for _ in range(2)]).reshape(2, T, 2)
            wt = rng.random((2, T, 2)).astype(np.float32) if weights else None
            o = rng.integers(0, 3, T) if origin else None
            phase = [None, "prefill", "decode"][i % 3]
            k = float(rng.integers(0, 100)) if kv and i % 2 else None
            w.add_step(ids, wt, o, phase, k)
            steps.append((ids, wt, o, phase, k))
    return steps


@given(seed=st.integers(0, 2**31), tokens=st.lists(st.integers(0, 5), min_size=1, max_size=4),
       weights=st.booleans(), origin=st.booleans(), kv=st.booleans())
@settings(max_examples=25, deadline=None)
def test_token_trace_round_trips_exactly(tmp_path_factory, seed, tokens, weights, origin, kv):
    tmp = tmp_path_factory.mktemp("pq")
    steps = _token_trace(tmp / "a.mtrace", np.random.default_rng(seed), tokens, weights, origin, kv)
    with Trace.open(tmp / "a.mtrace") as trace:
        info = export_parquet(trace, tmp / "a.parquet")
    assert info == {"rows": 2 * sum(tokens), "steps": len(tokens)}
    write_imported(read_parquet(tmp / "a.parquet"), tmp / "b.mtrace")
    with Trace.open(tmp / "b.mtrace") as back:
        assert back.model == TINY and back.num_steps == len(tokens) and back.has_weights == weights
        assert back.meta["source"] == "parquet:test"
        for step, (ids, wt, o, phase, _) in zip(back.steps(), steps):
            assert np.array_equal(step.ids, ids) and step.phase == phase
            assert wt is None or np.array_equal(step.weights, wt)
            assert o is None or np.array_equal(step.origin, o)
        want_kv = [np.nan if s[4] is None else s[4] for s in steps]
        got_kv = back.kv_len()
        assert (got_kv is None and not any(s[4] is not None for s in steps)) or \
            np.array_equal(got_kv, want_kv, equal_nan=True)


@given(seed=st.integers(0, 2**31), n=st.integers(1, 4))
@settings(max_examples=15, deadline=None)
def test_counts_trace_round_trips_exactly(tmp_path_factory, seed, n):
    tmp = tmp_path_factory.mktemp("pqc")
    counts = np.random.default_rng(seed).integers(0, 50, (n, 2, 8))
    with TraceWriter(tmp / "c.mtrace", TINY, kind="counts") as w:
        for i, c in enumerate(counts):
            w.add_counts(c, "decode" if i else "prefill")
    with Trace.open(tmp / "c.mtrace") as trace:
        export_parquet(trace, tmp / "c.parquet")
    table = pq.read_table(tmp / "c.parquet")
    assert table.num_rows == n * 2 * 8 and table.column_names[:4] == ["step", "layer", "expert", "count"]
    write_imported(read_parquet(tmp / "c.parquet"), tmp / "d.mtrace")
    with Trace.open(tmp / "d.mtrace") as back:
        assert back.kind == "counts" and np.array_equal(back.load(), counts)
        assert [s.phase for s in back.steps()] == ["prefill"] + ["decode"] * (n - 1)


def test_rows_are_one_per_step_layer_token(tmp_path):
    steps = _token_trace(tmp_path / "a.mtrace", np.random.default_rng(0), [3, 2], True, True, False)
    with Trace.open(tmp_path / "a.mtrace") as trace:
        export_parquet(trace, tmp_path / "a.parquet")
    rows = pq.read_table(tmp_path / "a.parquet").to_pylist()
    assert len(rows) == 2 * 3 + 2 * 2
    r = rows[3 + 1]  # step 0, layer 1, token 1
    ids, wt, o, _, _ = steps[0]
    assert (r["step"], r["layer"], r["token"]) == (0, 1, 1)
    assert r["expert_ids"] == ids[1, 1].tolist() and r["origin"] == int(o[1]) and r["phase"] is None
    assert np.allclose(r["weights"], wt[1, 1])
    assert rows[-1]["phase"] == "prefill"


def _show_and_duckdb_loads(duckdb, src, out, capsys) -> tuple[np.ndarray, np.ndarray]:
    """Export ``src`` to Parquet ``out``; the [layers, experts] load of `trace show --json --full` and DuckDB's
    per-(layer, expert) count of the exported ids."""
    assert main(["trace", "export", "--format", "parquet", str(src), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["trace", "show", str(src), "--json", "--full"]) == 0
    load = np.array(json.loads(capsys.readouterr().out)["load"])
    got = duckdb.sql(f"SELECT layer, e, count(*) AS n FROM (SELECT layer, unnest(expert_ids) AS e FROM '{out}') "
                     "GROUP BY ALL").fetchnumpy()
    table = np.zeros_like(load)
    table[got["layer"], got["e"]] = got["n"]
    return load, table


def test_duckdb_per_expert_counts_equal_trace_show(tmp_path, capsys):
    """The acceptance check on a DeepSeek-style trace: DuckDB's per-expert counts = `trace show --json --full`."""
    duckdb = pytest.importorskip("duckdb")
    src, out = tmp_path / "t.mtrace", tmp_path / "t.parquet"
    assert main(["trace", "synth", "--model", "tiny-deepseek", "--steps", "4", "--tokens", "64",
                 "--decode-tokens", "8", "--ranks", "4", "--out", str(src)]) == 0
    load, got = _show_and_duckdb_loads(duckdb, src, out, capsys)
    assert load.sum() > 0 and np.array_equal(got, load)


@pytest.mark.slow
def test_demo_trace_in_duckdb(tmp_path, capsys):
    """The issue's acceptance on the demo's own trace (DeepSeek-V3, 12 steps)."""
    duckdb = pytest.importorskip("duckdb")
    from moesim.cli.cmd_demo import demo_trace

    src = demo_trace(tmp_path)
    out = tmp_path / "demo.parquet"
    load, got = _show_and_duckdb_loads(duckdb, src, out, capsys)
    assert np.array_equal(got, load)


def test_cli_round_trip_and_window(tmp_path, capsys):
    _token_trace(tmp_path / "a.mtrace", np.random.default_rng(1), [4, 3, 2], False, True, True)
    out, back = tmp_path / "a.parquet", tmp_path / "b.mtrace"
    assert main(["trace", "export", "--format", "parquet", str(tmp_path / "a.mtrace"), "--start", "1",
                 "--out", str(out)]) == 0
    assert "10 rows" in capsys.readouterr().out
    assert main(["trace", "import", "--format", "parquet", str(out), "--out", str(back)]) == 0
    with Trace.open(back) as t, Trace.open(tmp_path / "a.mtrace") as a:
        assert t.num_steps == 2 and np.array_equal(t.load(), a.load(1))


def test_foreign_table_needs_model(tmp_path):
    """A table another tool wrote (no moesim metadata): read with --model; steps from the step column."""
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"step": [7, 7, 9, 9], "layer": [0, 1, 0, 1], "token": [0, 0, 0, 0],
                             "expert_ids": [[0, 1], [2, 3], [4, 5], [6, 7]], "phase": ["decode"] * 4}), path)
    with pytest.raises(TraceError, match="pass --model"):
        read_parquet(path)
    imp = read_parquet(path, TINY)
    assert [s[0].tolist() for s in imp.steps] == [[[[0, 1]], [[2, 3]]], [[[4, 5]], [[6, 7]]]]
    assert [s[3] for s in imp.steps] == ["decode", "decode"] and imp.steps[0][2] is None


BAD = [
    ({"step": [0], "layer": [0]}, "needs step, layer, token"),
    ({"step": [0, 0], "layer": [0, 1], "token": [0, 0], "expert_ids": [[0, 0], [1, 2]]}, "same expert twice"),
    ({"step": [0, 0], "layer": [0, 1], "token": [0, 0], "expert_ids": [[0, 9], [1, 2]]}, "outside"),
    ({"step": [0, 0], "layer": [0, 1], "token": [0, 0], "expert_ids": [[0, 1, 2], [1, 2, 3]]}, "top-2"),
    ({"step": [0, 0], "layer": [0, 1], "token": [0, 0], "expert_ids": [[0, 1], [1]]}, "differ in length"),
    ({"step": [0, 0], "layer": [0, 0], "token": [0, 1], "expert_ids": [[0, 1], [1, 2]]}, "every \\(layer, token\\)"),
    ({"step": [0, 0], "layer": [0, 5], "token": [0, 0], "expert_ids": [[0, 1], [1, 2]]}, "layer outside"),
    ({"step": [0, 0], "layer": [0, 1], "token": [0, 0], "expert_ids": [[0, 1], [1, 2]], "origin": [0, 1]},
     "origin differs"),
    ({"step": [0, 0], "layer": [0, 1], "token": [0, 0], "expert_ids": [[0, 1], [1, 2]],
      "phase": ["decode", "prefill"]}, "disagree on phase"),
    ({"step": [0, 0], "layer": [0, 1], "token": [0, 0], "expert_ids": [[0, 1], [1, 2]],
      "phase": ["warmup", "warmup"]}, "not prefill, decode"),
    ({"step": [0, -1], "layer": [0, 1], "token": [0, 0], "expert_ids": [[0, 1], [1, 2]]}, "negative"),
    ({"step": [0, 0], "layer": [0, 0], "expert": [1, 1], "count": [3, 4]}, "two rows"),
    ({"step": [0], "layer": [0], "expert": [8], "count": [3]}, "expert outside"),
]


@pytest.mark.parametrize("columns,match", BAD)
def test_malformed_tables_are_one_line_errors(tmp_path, columns, match):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(TraceError, match=match) as err:
        read_parquet(path, TINY)
    assert "\n" not in str(err.value)


def test_bad_files_and_metadata(tmp_path, capsys):
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(TraceError, match="not a readable Parquet file"):
        read_parquet(tmp_path / "x.parquet")
    with pytest.raises(TraceError, match="does not exist"):
        read_parquet(tmp_path / "nope.parquet")
    t = pa.table({"step": [0], "layer": [0], "expert": [1], "count": [3]})
    for meta, match in (({"moesim": "{"}, "not JSON"), ({"moesim": '{"format": "x"}'}, "not 'moesim.parquet'"),
                        ({"moesim": '{"format": "moesim.parquet", "version": 9}'}, "version 9")):
        pq.write_table(t.replace_schema_metadata(meta), tmp_path / "m.parquet")
        with pytest.raises(TraceError, match=match):
            read_parquet(tmp_path / "m.parquet")
    out = tmp_path / "o.mtrace"
    capsys.readouterr()
    assert main(["trace", "import", "--format", "parquet", str(tmp_path / "x.parquet"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moesim: error:") and "\n" not in err and not out.exists()


def test_without_pyarrow_one_clear_line(tmp_path, monkeypatch, capsys):
    _token_trace(tmp_path / "a.mtrace", np.random.default_rng(1), [2], False, False, False)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    capsys.readouterr()
    assert main(["trace", "export", "--format", "parquet", str(tmp_path / "a.mtrace"), "--out",
                 str(tmp_path / "a.parquet")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'moesim[parquet]'" in err and err.count("\n") == 1
    assert not (tmp_path / "a.parquet").exists()
