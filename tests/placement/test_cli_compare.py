"""``moesim compare`` end to end (load file and trace with held-out steps) and its bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.cli import main
from moesim.mapping import ExpertMapping


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    from moesim.models import get_model
    from moesim.trace.synth import SynthConfig, synthesize

    path = tmp_path_factory.mktemp("cmp") / "t.mtrace"
    return synthesize(get_model("tiny-deepseek"), SynthConfig(steps=8, tokens=128, prefill_steps=2, num_ranks=16,
                                                              seed=3), path)


def test_compare_load_file(tmp_path, capsys):
    load = np.random.default_rng(0).integers(0, 500, (4, 8))
    path = tmp_path / "load.npy"
    np.save(path, load)
    out = tmp_path / "cmp"
    rc = main(["compare", "--load", str(path), "--model", "small", "--topology", "dgx-h100", "--redundant", "8",
               "--algos", "linear,eplb,greedy,milp", "--time-limit", "2", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "busiest/bound" in text and "greedy" in text and "step time" in text
    data = json.loads((out / "compare.json").read_text())
    rows = {r["algo"]: r for r in data["rows"]}
    assert set(rows) == {"linear", "eplb", "greedy", "milp"}
    for r in rows.values():
        assert r["busiest_over_bound"] >= 1 - 1e-9 and 0 < r["balancedness"] <= 1 and r["step_time"] > 0
    assert rows["milp"]["busiest_over_bound"] <= rows["greedy"]["busiest_over_bound"] + 1e-9
    assert (out / "compare.png").stat().st_size > 1000 and (out / "compare.md").exists()
    assert ExpertMapping.load(out / "mapping-eplb.json").num_slots == 16


def test_compare_trace_holdout(tmp_path, small_trace, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--trace", str(small_trace), "--topology", "dgx-h100:2", "--slots-per-gpu", "2",
               "--algos", "eplb,eplb-global,greedy,affinity", "--holdout", "0.25", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "compare.json").read_text())
    assert data["fit_steps"] == [0, 6] and data["holdout_steps"] == [6, 8]
    assert len(data["holdout_rows"]) == 4
    # tokens cross the 2 nodes (flat: once per destination GPU, there and back): more than nothing, at most
    # top_k copies each way of the token's hidden state
    from moesim.models import get_model

    spec = get_model("tiny-deepseek")
    for r in data["rows"]:
        assert 0 < r["inter_bytes_per_token"] <= 2 * spec.top_k * spec.token_bytes
    assert "held-out steps 6:8" in capsys.readouterr().out


def test_compare_comm_backend(tmp_path, small_trace, capsys):
    """--comm hierarchical sends a token once per destination node: never more inter-node bytes than flat."""
    inter = {}
    for comm in ("flat", "hierarchical"):
        out = tmp_path / comm
        assert main(["compare", "--trace", str(small_trace), "--topology", "dgx-h100:2", "--algos", "linear,greedy",
                     "--comm", comm, "--out", str(out)]) == 0
        rows = json.loads((out / "compare.json").read_text())["rows"]
        inter[comm] = {r["algo"]: r["inter_bytes_per_token"] for r in rows}
    for algo in ("linear", "greedy"):
        assert 0 < inter["hierarchical"][algo] < inter["flat"][algo]
    capsys.readouterr()
    rc = main(["compare", "--trace", str(small_trace), "--topology", "dgx-h100:2", "--comm", "ring"])
    err = capsys.readouterr().err
    assert rc == 2 and "--comm" in err and err.count("\n") == 1


def test_compare_window_holds_out_following_steps(tmp_path, small_trace):
    out = tmp_path / "cmp"
    assert main(["compare", "--trace", str(small_trace), "--window", "2:5", "--topology", "dgx-h100",
                 "--algos", "greedy", "--out", str(out)]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert data["fit_steps"] == [2, 5] and data["holdout_steps"] == [5, 8]


@pytest.mark.parametrize("args, needle", [
    (["--algos", "greedy,bogus"], "unknown placement algorithm"),
    (["--algos", ","], "empty"),
    (["--holdout", "1.5"], "--holdout"),
    (["--window", "5:2"], "--window"),
])
def test_compare_bad_inputs(tmp_path, small_trace, capsys, args, needle):
    rc = main(["compare", "--trace", str(small_trace), "--topology", "dgx-h100", *args])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1


def test_compare_colocate_end_to_end(tmp_path, small_trace):
    """colocate through the CLI: co-activation from the trace (computed since affinity is listed), greedy's
    balance within its (1 + ε) cap, a mapping written like every algorithm's."""
    out = tmp_path / "cmp"
    rc = main(["compare", "--trace", str(small_trace), "--topology", "dgx-h100:2", "--slots-per-gpu", "2",
               "--algos", "greedy,affinity,colocate", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "compare.json").read_text())
    rows = {r["algo"]: r for r in data["rows"]}
    assert rows["colocate"]["busiest_over_bound"] <= rows["greedy"]["busiest_over_bound"] * 1.004 + 1e-9
    assert rows["colocate"]["inter_bytes_per_token"] > 0
    m = ExpertMapping.load(out / "mapping-colocate.json")
    assert m.num_slots == 32 and np.all(m.logcnt >= 1)


def _domain_trace(tmp_path):
    """Four 'domains' as trace steps (a [steps, layers, experts] counts table, imported): the held-out one moves
    its load onto experts that are cold in the others."""
    rng = np.random.default_rng(5)
    E, L = 8, 4
    base = rng.integers(50, 150, (L, E))
    steps = [base + rng.integers(0, 20, (L, E)) for _ in range(3)]
    drift = base.copy()
    drift[:, :2] *= 6
    table = tmp_path / "domains.json"
    table.write_text(json.dumps({"load": [s.tolist() for s in steps + [drift]]}))
    trace = tmp_path / "domains.mtrace"
    assert main(["trace", "import", "--format", "counts", str(table), "--model", "small", "--out", str(trace)]) == 0
    return trace


def test_compare_holdout_domains(tmp_path, capsys):
    trace = _domain_trace(tmp_path)
    out = tmp_path / "cmp"
    capsys.readouterr()
    assert main(["compare", "--trace", str(trace), "--holdout-domains", "3", "--topology", "dgx-h100",
                 "--slots-per-gpu", "2", "--algos", "eplb,greedy,robust", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out 3 (mappings fitted on the other domains)" in text and "held-out ÷ fitted" in text
    data = json.loads((out / "compare.json").read_text())
    assert data["split"] == "domain" and data["fit_steps"] == ["0", "1", "2"] and data["holdout_steps"] == ["3"]
    from moesim.placement import imbalance
    from moesim.trace import Trace

    per_step = Trace.open(trace).load().astype(float)
    for row, hrow in zip(data["rows"], data["holdout_rows"]):
        m = ExpertMapping.load(out / f"mapping-{row['algo']}.json")
        assert row["imbalance"] == pytest.approx(imbalance(per_step[:3].sum(0), m))
        assert hrow["imbalance"] == pytest.approx(imbalance(per_step[3], m))
        assert hrow["ratio"] == pytest.approx(hrow["imbalance"] / row["imbalance"])


@pytest.mark.parametrize("args, needle", [
    (["--holdout-domains", "physics"], "no step or domain 'physics'"),
    (["--holdout-domains", "0,1,2,3"], "nothing left to fit on"),
    (["--holdout-domains", "1", "--window", "0:2"], "cannot be combined"),
    (["--holdout-domains", ","], "--holdout-domains is empty"),
])
def test_compare_holdout_domains_bad(tmp_path, capsys, args, needle):
    trace = _domain_trace(tmp_path)
    capsys.readouterr()
    rc = main(["compare", "--trace", str(trace), "--topology", "dgx-h100", "--algos", "greedy", *args])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1


def test_compare_olmoe_domains(tmp_path, shared_data, capsys):
    """The in-repo drift case: OLMoE fitted on four domains, scored on github and tulu (names from the import)."""
    trace = tmp_path / "olmoe.mtrace"
    assert main(["trace", "import", "--format", "olmoe", str(shared_data / "olmoe-routing-analysis" /
                                                             "expert_counts_all.json"), "--out", str(trace)]) == 0
    out = tmp_path / "cmp"
    assert main(["compare", "--trace", str(trace), "--holdout-domains", "github,tulu", "--topology", "dgx-h100",
                 "--slots-per-gpu", "9", "--algos", "eplb,greedy", "--out", str(out)]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert data["fit_steps"] == ["arxiv", "book", "c4", "wikipedia"] and data["holdout_steps"] == ["github", "tulu"]
    assert all(h["ratio"] > 1.2 for h in data["holdout_rows"])  # the drift: fitted balance is lost held out
