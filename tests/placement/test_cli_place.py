"""``moesim place`` end to end: load files of every format, a trace window, and one-line errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moesim.cli import main
from moesim.mapping import ExpertMapping
from moesim.placement import read_load


def _load_file(tmp_path: Path, fmt: str, data: np.ndarray) -> Path:
    p = tmp_path / f"load.{fmt}"
    if fmt == "npy":
        np.save(p, data)
    elif fmt == "json":
        p.write_text(json.dumps(data.tolist()))
    else:
        p.write_text("\n".join(",".join(str(x) for x in row) for row in data.tolist()) + "\n")
    return p


@pytest.mark.parametrize("fmt", ["npy", "json", "csv"])
def test_place_from_load_file(tmp_path, fmt, capsys):
    rng = np.random.default_rng(0)
    load = rng.integers(0, 100, (4, 8))
    path = _load_file(tmp_path, fmt, load)
    out = tmp_path / "m.json"
    sg = tmp_path / "sg.json"
    rc = main(["place", "--load", str(path), "--topology", "dgx-h100", "--algo", "greedy", "--redundant", "8",
               "--model", "small", "--out", str(out), "--sglang", str(sg)])
    assert rc == 0
    m = ExpertMapping.load(out)
    assert m.num_gpus == 8 and m.num_slots == 16 and np.all(m.logcnt >= 1)
    assert json.loads(sg.read_text())["physical_to_logical_map"] == m.phy2log.tolist()
    assert "balancedness" in capsys.readouterr().out
    assert np.array_equal(read_load(path), load)


def test_place_from_trace_window(tmp_path):
    from moesim.models import get_model
    from moesim.trace.synth import SynthConfig, synthesize

    trace = synthesize(get_model("tiny-deepseek"), SynthConfig(steps=4, tokens=64, seed=1), tmp_path / "t.mtrace")
    for algo in ("eplb", "affinity", "milp"):
        out = tmp_path / f"{algo}.json"
        rc = main(["place", "--trace", str(trace), "--window", "0:2", "--topology", "dgx-h100:2", "--algo", algo,
                   "--slots-per-gpu", "1", "--time-limit", "2", "--out", str(out)])
        assert rc == 0, algo
        m = ExpertMapping.load(out)
        assert m.num_gpus == 16 and m.meta["algo"] == algo


def test_place_real_mixtral_counts(tmp_path, shared_data):
    out = tmp_path / "m.json"
    csv = shared_data / "mixtral-8x7b-expert-counts" / "expert_activation_count.csv"
    rc = main(["place", "--load", str(csv), "--topology", "dgx-h100",
               "--slots-per-gpu", "2", "--algo", "eplb", "--model", "mixtral-8x7b", "--out", str(out)])
    assert rc == 0 and ExpertMapping.load(out).num_slots == 16


@pytest.mark.parametrize("content, fmt, needle", [
    ("[[1, 2], [3]]", "json", "different lengths"),
    ("[[1, NaN]]", "json", "non-finite"),
    ("[[1, 2", "json", "not valid JSON"),
    ("1,2\n3,nan\n", "csv", "non-finite"),
    ("1,2\n3,-4\n", "csv", "negative"),
    ("1,2\nx,y\n", "csv", "not all numbers"),
    ("{\"foo\": 1}", "json", "'load'"),
    ("[[0, 0], [0, 0]]", "json", "all zero"),
    ("0,0\n0,0\n", "csv", "all zero"),
    ("1,2,3\n", "txt", None),
])
def test_bad_load_files(tmp_path, capsys, content, fmt, needle):
    p = tmp_path / f"load.{fmt}"
    p.write_text(content)
    out = tmp_path / "m.json"
    rc = main(["place", "--load", str(p), "--topology", "dgx-h100", "--algo", "greedy", "--out", str(out)])
    err = capsys.readouterr().err
    if needle is None:  # a valid one-layer CSV under .txt: fine (3 experts, 8 GPUs × 1 slot)
        assert rc == 0
        return
    assert rc == 2 and needle in err and err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--algo", "nope"], "unknown placement algorithm"),
    (["--slots-per-gpu", "0"], "must be positive"),
    (["--redundant", "3"], "do not divide"),
    (["--model", "deepseek-v3"], "has shape"),
    (["--algo", "eplb", "--groups", "3"], "groups"),
    (["--algo", "greedy", "--slots-per-gpu", "9"], "at most 8 experts × 8 GPUs"),
])
def test_bad_requests_exit_2(tmp_path, capsys, args, needle):
    path = _load_file(tmp_path, "npy", np.ones((4, 8)))
    out = tmp_path / "m.json"
    rc = main(["place", "--load", str(path), "--topology", "dgx-h100", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1 and not out.exists()


def test_wrong_shape_npy(tmp_path, capsys):
    p = tmp_path / "load.npy"
    np.save(p, np.ones((2, 3, 4)))
    rc = main(["place", "--load", str(p), "--topology", "dgx-h100", "--out", str(tmp_path / "m.json")])
    assert rc == 2 and "shape" in capsys.readouterr().err


def test_impossible_slots(tmp_path, capsys):
    path = _load_file(tmp_path, "npy", np.ones((2, 32)))
    rc = main(["place", "--load", str(path), "--topology", "dgx-h100", "--slots-per-gpu", "2",
               "--out", str(tmp_path / "m.json")])
    assert rc == 2 and "cannot hold" in capsys.readouterr().err


def test_fractional_loads_mean_the_same_in_place_and_import(tmp_path, capsys):
    """A load file is weights: fractional shares place exactly like the same shares scaled to counts; the trace
    importer stores token counts and refuses fractions with one line naming `moesim place --load`."""
    frac = np.array([[0.5, 0.25, 0.125, 0.125, 1.0, 0.75, 0.25, 1.0]])
    a = _load_file(tmp_path, "json", frac)
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps((frac * 8).tolist()))
    for src, out in ((a, tmp_path / "a.json"), (whole, tmp_path / "b.json")):
        assert main(["place", "--load", str(src), "--topology", "dgx-h100:1", "--slots-per-gpu", "2",
                     "--algo", "greedy", "--out", str(out)]) == 0
    assert ExpertMapping.load(tmp_path / "a.json") == ExpertMapping.load(tmp_path / "b.json")
    capsys.readouterr()
    rc = main(["trace", "import", "--format", "counts", str(a), "--model", "small",
               "--out", str(tmp_path / "t.mtrace")])
    err = capsys.readouterr().err
    assert rc == 2 and "fractional" in err and "moesim place --load" in err and err.count("\n") == 1
