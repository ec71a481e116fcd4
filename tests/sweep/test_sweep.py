"""`moesim sweep`: specs checked before any cell runs, the table's figures, resuming, failures, executors."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.cli import main
from moesim.errors import MoesimError
from moesim.sweep import cells, load_spec, run_sweep, table
from moesim.sweep.spec import cell_key
from tests.sweep.conftest import write_spec

REPLAY = """\
    command = "replay"
    [options]
    trace = "{trace}"
    no-plots = true
    [axes]
    topology = ["dgx-h100", "pcie-8gpu"]
    slots-per-gpu = [1, 2]
    [[plots]]
    x = "slots-per-gpu"
    y = "topology"
    metric = "step_latency_mean_s"
    [[plots]]
    kind = "line"
    x = "slots-per-gpu"
    series = "topology"
    metric = "bytes_intra_node_per_token"
"""


def run_cli(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def spec_for(tmp_path, traces, text=REPLAY, **fmt):
    return write_spec(tmp_path, text.format(trace=traces / "tiny.mtrace", **fmt))


# -- bad specs fail before any cell runs: one line, exit 2 -----------------------------------------------------
BAD = [
    ("unknown option", '[options]\nnonsense = 3\n', "unknown option 'nonsense' for moesim replay"),
    ("unknown axis option", '[axes]\nslotz = [1, 2]\n', "unknown option 'slotz'"),
    ("bad int value", '[axes]\nslots-per-gpu = [1, "two"]\n', "slots-per-gpu = 'two' is not a valid int"),
    ("bad choice", '[axes]\nengine = ["analytic", "gpu"]\n', "engine = 'gpu' is not one of: analytic, des"),
    ("axis not a list", '[axes]\nengine = "des"\n', "axes.engine must be a non-empty list"),
    ("empty axis", '[axes]\nengine = []\n', "axes.engine must be a non-empty list"),
    ("repeated value", '[axes]\nengine = ["des", "des"]\n', "axes.engine repeats a value"),
    ("flag given a value", '[options]\noverlap = "yes"\n', "overlap is a flag"),
    ("reserved option", '[options]\nout = "x"\n', "option 'out' is set by the sweep"),
    ("fixed and axis", '[axes]\nno-plots = [true, false]\n', "set by both options and axes.no-plots"),
    ("impossible steps", '[axes]\nsteps = ["0:2", "4:99"]\n', "outside the trace's 6 steps"),
    ("bad topology", '[axes]\ntopology = ["dgx-h100", "nosuch:2"]\n', "unknown topology 'nosuch:2'"),
    ("bad rebalance", '[axes]\nrebalance = ["static", "weekly:interval=2"]\n', "unknown rebalance policy"),
    ("plot axis", '[[plots]]\nx = "engine"\ny = "slots"\nmetric = "m"\n', "y = 'slots' is not an axis"),
]


@pytest.mark.parametrize("label,extra,message", BAD, ids=[b[0] for b in BAD])
def test_bad_spec_fails_before_any_cell(tmp_path, traces, capsys, label, extra, message) -> None:
    base = f'command = "replay"\n[options]\ntrace = "{traces / "tiny.mtrace"}"\ntopology = "dgx-h100"\n' \
           'no-plots = true\n'
    if extra.startswith("[options]"):
        base = base + extra.split("\n", 1)[1]
    else:
        base = base + extra
    if "axes" in extra and "topology" in extra:
        base = base.replace('topology = "dgx-h100"\n', "")
    if "[[plots]]" in extra:
        base = base.replace("[[plots]]", '[axes]\nengine = ["analytic", "des"]\n[[plots]]')
    spec = tmp_path / "s.toml"
    spec.write_text(base)
    rc, _out, err = run_cli(["sweep", str(spec), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2, (label, err)
    assert err.count("\n") == 1 and err.startswith("moesim: error: "), err
    assert message in err, err
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


@pytest.mark.parametrize("what", ["missing", "garbage", "directory"])
def test_unreadable_trace_fails_before_any_cell(tmp_path, traces, capsys, what) -> None:
    bad = tmp_path / "bad.mtrace"
    if what == "garbage":
        bad.write_bytes(b"not a trace at all" * 10)
    elif what == "directory":
        bad.mkdir()
    spec = write_spec(tmp_path, f"""\
        command = "replay"
        [options]
        topology = "dgx-h100"
        [axes]
        trace = ["{traces / 'tiny.mtrace'}", "{bad}"]
    """)
    rc, _out, err = run_cli(["sweep", str(spec), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "bad.mtrace" in err, err
    assert not (tmp_path / "out").exists()


def test_invalid_toml_and_unknown_command(tmp_path, capsys) -> None:
    spec = write_spec(tmp_path, 'command = "replay"\n[axes\n')
    rc, _o, err = run_cli(["sweep", str(spec), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "not valid TOML" in err and err.count("\n") == 1
    spec = write_spec(tmp_path, 'command = "run"\n')
    rc, _o, err = run_cli(["sweep", str(spec), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "command must be one of replay, place, compare" in err
    rc, _o, err = run_cli(["sweep", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "does not exist" in err


# -- keys ----------------------------------------------------------------------------------------------------
def test_cell_key_follows_content_not_names(tmp_path, traces) -> None:
    spec = load_spec(spec_for(tmp_path, traces))
    keys = [c.key for c in spec.cells]
    assert len(set(keys)) == 4
    # the same trace under another name and folder: same keys
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(traces / "tiny.mtrace", other / "renamed.mtrace")
    moved = load_spec(write_spec(other, REPLAY.format(trace="renamed.mtrace")))  # relative to the spec
    assert [c.key for c in moved.cells] == keys
    # other content: other keys
    changed = load_spec(write_spec(other, REPLAY.format(trace=traces / "tiny-b.mtrace"), name="b.toml"))
    assert not set(c.key for c in changed.cells) & set(keys)
    # one option more: another key
    args = spec.cells[0].args
    args2 = type(args)(**{**vars(args), "overlap": True})
    assert cell_key("replay", args2) != cell_key("replay", args)


# -- a small sweep on the process pool (what CI runs) -----------------------------------------------------------
def test_pool_sweep_table_holds_the_commands_figures(tmp_path, traces, capsys) -> None:
    spec = spec_for(tmp_path, traces)
    rc, out, err = run_cli(["sweep", str(spec), "--out", str(tmp_path / "out"), "--workers", "2"], capsys)
    assert rc == 0, err
    assert "4 cells (4 run, 0 cached, 0 failed)" in out
    cols, rows = table.read_csv(tmp_path / "out" / "results.csv")
    assert cols[:5] == ["cell", "topology", "slots-per-gpu", "status", "error"]
    assert [(r["topology"], r["slots-per-gpu"]) for r in rows] == [
        ("dgx-h100", "1"), ("dgx-h100", "2"), ("pcie-8gpu", "1"), ("pcie-8gpu", "2")]
    assert all(r["status"] == "ok" for r in rows)
    # every figure is the one `moesim replay` reports for the same options
    rc, _o, _e = run_cli(["replay", "--trace", str(traces / "tiny.mtrace"), "--topology", "pcie-8gpu",
                          "--slots-per-gpu", "2", "--no-plots", "--quiet", "--out", str(tmp_path / "direct")], capsys)
    assert rc == 0
    summary = json.loads((tmp_path / "direct" / "report.json").read_text())["summary"]
    row = rows[3]
    for k in ("step_latency_mean_s", "tokens_per_s", "busiest_gpu_over_mean_load", "bytes_intra_node",
              "busiest_link"):
        assert row[k] == (repr(summary[k]) if isinstance(summary[k], float) else str(summary[k])), k
    assert float(row["phase_share.expert"]) == summary["phase_share"]["expert"]
    # the cell's own report is in its folder
    report = json.loads((tmp_path / "out" / "cells" / row["cell"] / "report.json").read_text())
    assert report["summary"] == summary
    assert (tmp_path / "out" / "plots" / "heatmap-step_latency_mean_s-slots_per_gpu-topology.png").stat().st_size
    assert (tmp_path / "out" / "plots" / "line-bytes_intra_node_per_token-slots_per_gpu-topology.png").is_file()
    # a rerun runs nothing and writes the same table
    before = (tmp_path / "out" / "results.csv").read_text()
    rc, out, _e = run_cli(["sweep", str(spec), "--out", str(tmp_path / "out")], capsys)
    assert rc == 0 and "(0 run, 4 cached, 0 failed)" in out
    assert (tmp_path / "out" / "results.csv").read_text() == before


def test_parquet_equals_csv_or_is_skipped_in_one_line(tmp_path, traces, monkeypatch) -> None:
    res = run_sweep(spec_for(tmp_path, traces), tmp_path / "out", workers=1)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        assert res.notes == ["results.parquet skipped: pyarrow is not installed (pip install 'moesim[parquet]')"]
        return
    t = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert [r["step_latency_mean_s"] for r in t] == [r["step_latency_mean_s"] for r in res.rows]
    assert [r["topology"] for r in t] == ["dgx-h100", "dgx-h100", "pcie-8gpu", "pcie-8gpu"]
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    res = run_sweep(spec_for(tmp_path, traces), tmp_path / "out2", workers=1)
    assert res.notes and "pyarrow is not installed" in res.notes[0]
    assert (tmp_path / "out2" / "results.csv").is_file() and not (tmp_path / "out2" / "results.parquet").exists()


def test_failed_cell_is_recorded_and_the_sweep_goes_on(tmp_path, traces, monkeypatch) -> None:
    spec = load_spec(spec_for(tmp_path, traces))
    bad_key = spec.cells[1].key
    real = cells.execute

    def flaky(command, args, out):
        if args.topology == "dgx-h100" and args.slots_per_gpu == 2:
            raise MoesimError("the simulated cluster caught fire")
        return real(command, args, out)

    monkeypatch.setattr(cells, "execute", flaky)
    res = run_sweep(spec, tmp_path / "out", workers=1)
    assert [r["status"] for r in res.rows] == ["ok", "failed", "ok", "ok"]
    assert res.rows[1]["error"] == "the simulated cluster caught fire" and res.failed == 1
    assert (tmp_path / "out" / "cells" / cells.folder(bad_key) / "error.txt").is_file()
    # finished (failed) cells are not rerun ...
    monkeypatch.setattr(cells, "execute", real)
    res = run_sweep(spec, tmp_path / "out", workers=1)
    assert res.ran == 0 and res.failed == 1
    # ... unless asked to
    res = run_sweep(spec, tmp_path / "out", workers=1, retry_failed=True)
    assert res.ran == 1 and res.failed == 0 and all(r["status"] == "ok" for r in res.rows)


def test_cli_exit_1_when_a_cell_failed(tmp_path, traces, capsys, monkeypatch) -> None:
    real = cells.execute

    def flaky(command, args, out):
        if args.slots_per_gpu == 2:
            raise RuntimeError("boom")
        return real(command, args, out)

    monkeypatch.setattr(cells, "execute", flaky)
    spec = spec_for(tmp_path, traces)
    rc, out, err = run_cli(["sweep", str(spec), "--out", str(tmp_path / "out"), "--workers", "1"], capsys)
    assert rc == 1 and "(4 run, 0 cached, 2 failed)" in out
    lines = [ln for ln in err.splitlines() if not ln.startswith("moesim: note:")]  # "parquet skipped" without pyarrow
    assert len(lines) == 1 and "2 of 4 cells failed" in lines[0]
    _cols, rows = table.read_csv(tmp_path / "out" / "results.csv")
    assert [r["error"] for r in rows] == ["", "RuntimeError: boom", "", "RuntimeError: boom"]
    assert rows[1]["step_latency_mean_s"] == "" and float(rows[0]["step_latency_mean_s"]) > 0


def test_place_and_compare_cells(tmp_path, traces) -> None:
    from moesim.placement import place
    from moesim.trace import Trace

    spec = write_spec(tmp_path, f"""\
        command = "place"
        [options]
        trace = "{traces / 'tiny.mtrace'}"
        topology = "dgx-h100"
        [axes]
        algo = ["linear", "greedy"]
        slots-per-gpu = [1, 2]
    """)
    res = run_sweep(load_spec(spec), tmp_path / "p", workers=1)
    assert res.failed == 0 and len(res.rows) == 4
    with Trace.open(traces / "tiny.mtrace") as t:
        load = t.load(0, t.num_steps).sum(axis=0).astype(float)
    want = place(load, "greedy", num_gpus=8, num_slots=16, gpus_per_node=8)
    row = res.rows[3]
    assert (row["algo"], row["slots-per-gpu"]) == ("greedy", 2)
    assert row["balancedness"] == want.info["balancedness"]
    assert row["busiest_over_bound"] == want.info["busiest_over_bound"]
    assert "wall.algo_s" in res.columns and "seconds" not in res.columns
    assert (tmp_path / "p" / "cells" / row["cell"] / "mapping.json").is_file()

    spec = write_spec(tmp_path, f"""\
        command = "compare"
        [options]
        algos = "linear,greedy"
        [axes]
        case = [{{trace = "{traces / 'tiny.mtrace'}", topology = "dgx-h100"}},
                {{trace = "{traces / 'tiny-b.mtrace'}", topology = "pcie-8gpu"}}]
        holdout = [0.25, 0.5]
    """, name="c.toml")
    res = run_sweep(load_spec(spec), tmp_path / "c", workers=1)
    assert res.failed == 0
    assert [(r["trace"].endswith("tiny.mtrace"), r["topology"], r["holdout"]) for r in res.rows] == [
        (True, "dgx-h100", 0.25), (True, "dgx-h100", 0.5), (False, "pcie-8gpu", 0.25), (False, "pcie-8gpu", 0.5)]
    assert res.rows[0]["case"].startswith("trace=") and "topology=dgx-h100" in res.rows[0]["case"]
    data = json.loads((tmp_path / "c" / "cells" / res.rows[1]["cell"] / "compare.json").read_text())
    g = next(r for r in data["holdout_rows"] if r["algo"] == "greedy")
    assert res.rows[1]["holdout.greedy.busiest_over_bound"] == g["busiest_over_bound"]
    assert res.rows[1]["holdout_steps"] == f"{data['holdout_steps'][0]}:{data['holdout_steps'][1]}"
    assert {"wall.algo_s.linear", "wall.algo_s.greedy"} <= set(res.columns)


def test_plot_metric_that_is_no_column(tmp_path, traces, capsys) -> None:
    spec = spec_for(tmp_path, traces, text=REPLAY.replace('metric = "step_latency_mean_s"', 'metric = "speed"'))
    rc, _out, err = run_cli(["sweep", str(spec), "--out", str(tmp_path / "out"), "--workers", "1"], capsys)
    assert rc == 2 and "plots[0]: metric 'speed' is not a numeric column" in err
    assert (tmp_path / "out" / "results.csv").is_file()  # the table is kept: fix the spec, rerun (all cached)


def test_linked_axis_labels_and_defaults(tmp_path, traces) -> None:
    """A linked value may leave an option out (its default) and carry a label; the rebalance figures come from
    the report's schedule."""
    spec = write_spec(tmp_path, f"""\
        command = "replay"
        [options]
        trace = "{traces / 'tiny.mtrace'}"
        topology = "dgx-h100"
        slots-per-gpu = 2
        rebalance = "periodic:interval=2,window=2"
        no-plots = true
        [axes]
        rebalancer = [{{label = "from scratch", rebalance-algo = "greedy"}},
                      {{label = "1 swap", rebalance-algo = "incremental", rebalance-max-swaps = 1}}]
    """)
    res = run_sweep(load_spec(spec), tmp_path / "out", workers=1)
    assert res.failed == 0
    assert res.columns[1:4] == ["rebalancer", "rebalance-algo", "rebalance-max-swaps"]
    assert [(r["rebalancer"], r["rebalance-algo"], r["rebalance-max-swaps"]) for r in res.rows] == [
        ("from scratch", "greedy", None), ("1 swap", "incremental", 1)]
    for r in res.rows:
        report = json.loads((tmp_path / "out" / "cells" / r["cell"] / "report.json").read_text())
        sched = report["inputs"]["rebalance_schedule"]
        assert r["rebalances"] == len(sched) and len(sched) >= 1
        assert r["rebalance_moved_bytes"] == sum(e["moved_bytes"] for e in sched)
    assert report["inputs"]["rebalance_place_kw"] == {"max_swaps": 1}
    # a move budget for a rebalancer that has none fails before any cell runs
    bad = write_spec(tmp_path, spec.read_text().replace('rebalance-algo = "incremental"', 'rebalance-algo = "eplb"'),
                     name="bad.toml")
    with pytest.raises(MoesimError, match="--rebalance-max-swaps applies to --rebalance-algo incremental only"):
        load_spec(bad)


def test_ray_missing_is_one_line(tmp_path, traces, capsys, monkeypatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    rc, _out, err = run_cli(["sweep", str(spec_for(tmp_path, traces)), "--out", str(tmp_path / "o"), "--ray"], capsys)
    assert rc == 2 and err == "moesim: error: --ray needs Ray: pip install 'moesim[ray]' (or pip install ray)\n"
    assert not (tmp_path / "o" / "cells").exists() or not any((tmp_path / "o" / "cells").iterdir())


def test_progress_bar_counts(capsys) -> None:
    from moesim.sweep.executors import Progress

    bar = Progress(total=5, cached=2, enabled=True)
    bar.tick(2)
    bar.finished({"status": "ok"})
    bar.finished({"status": "failed"})
    err = capsys.readouterr().err
    assert "sweep [" in err and "4/5 cells (2 cached), 2 running, 1 failed, ETA " in err
    bar.finished({"status": "ok"})
    assert capsys.readouterr().err.endswith("5/5 cells (2 cached), 2 running, 1 failed, ETA 0s   \n")
    quiet = Progress(total=1, cached=0, enabled=False)
    quiet.finished({"status": "ok"})
    assert capsys.readouterr().err == ""


@settings(max_examples=15, deadline=None)
@given(algos=st.lists(st.sampled_from(["linear", "round_robin", "lpt", "greedy", "eplb"]), min_size=1, max_size=4,
                      unique=True),
       slots=st.lists(st.integers(1, 4), min_size=1, max_size=3, unique=True),
       groups=st.lists(st.sampled_from([1, 2, 4]), min_size=1, max_size=2, unique=True))
def test_grid_is_the_product_of_the_axes(tmp_path_factory, algos, slots, groups) -> None:
    """Every combination of axis values is one cell, in spec order (last axis fastest), parsed into its options,
    and distinct options give distinct keys."""
    d = tmp_path_factory.mktemp("grid")
    (d / "load.json").write_text(json.dumps([[5, 1, 2, 8, 3, 3, 1, 9]] * 2))
    spec = load_spec(write_spec(d, f"""\
        command = "place"
        [options]
        load = "load.json"
        topology = "pcie-8gpu"
        [axes]
        algo = {json.dumps(algos)}
        slots-per-gpu = {json.dumps(slots)}
        groups = {json.dumps(groups)}
    """))
    want = [(a, s, g) for a in algos for s in slots for g in groups]
    assert [(c.args.algo, c.args.slots_per_gpu, c.args.groups) for c in spec.cells] == want
    assert [(c.axes["algo"], c.axes["slots-per-gpu"], c.axes["groups"]) for c in spec.cells] == want
    assert len({c.key for c in spec.cells}) == len(want)
    assert all(c.args.load == str(d / "load.json") for c in spec.cells)


def test_values_that_look_like_options(tmp_path, traces) -> None:
    spec = load_spec(write_spec(tmp_path, f"""\
        command = "replay"
        [options]
        trace = "{traces / 'tiny.mtrace'}"
        topology = "dgx-h100"
        [axes]
        steps = ["-2:", ":-4"]
    """))
    assert [c.args.steps for c in spec.cells] == ["-2:", ":-4"]
