"""`moesim replay` end to end, reports, determinism, result combining, and bad inputs (exit 2, one line)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import MoesimError
from moesim.mapping import ExpertMapping
from moesim.models import get_model
from moesim.sim.report import FILES, chrome_trace, format_table
from moesim.sim.result import SimResult
from moesim.trace import TraceWriter
from tests.sim.test_workload import random_ids


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    """A tiny-model token trace recorded on 4 ranks: a prefill step then decode steps."""
    model = get_model("tiny")
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("trace") / "t.mtrace"
    with TraceWriter(path, model, origin=True, num_ranks=4) as w:
        for s, T in enumerate([64, 16, 16, 16, 16, 16]):
            ids = random_ids(rng, model.num_layers, T, model.num_experts, model.top_k)
            w.add_step(ids, origin=np.arange(T) * 4 // T, phase="prefill" if s == 0 else "decode")
    return path


def run(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("engine,layout", [("analytic", "ep"), ("analytic", "tp"), ("des", "ep-tp-attn")])
def test_replay_writes_every_file(trace_path, tmp_path, capsys, engine, layout) -> None:
    out = tmp_path / "r"
    rc, stdout, err = run(["replay", "--trace", str(trace_path), "--topology", "dgx-h100", "--engine", engine,
                           "--layout", layout, "--out", str(out)], capsys)
    assert rc == 0, err
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    assert "step latency p50" in stdout and "busiest link" in stdout
    doc = json.loads((out / "report.json").read_text())
    assert doc["summary"]["steps"] == 6 and doc["summary"]["tokens"] == 144
    assert doc["inputs"]["layout"] == layout and doc["inputs"]["engine"] == engine
    assert doc["inputs"]["mapping"].startswith("linear") and doc["inputs"]["cost_model"]["format"]
    lines = (out / "steps.csv").read_text().splitlines()
    assert len(lines) == 7 and lines[1].split(",")[1] == "prefill"
    tl = json.loads((out / "timeline.json").read_text())
    tracks = {e["tid"] for e in tl["traceEvents"] if e["ph"] == "X"}
    assert tracks == set(range(8))  # one track per GPU
    assert {e["name"] for e in tl["traceEvents"] if e["ph"] == "X"} >= {"expert"}
    assert all(e["dur"] >= 0 for e in tl["traceEvents"] if e["ph"] == "X")


def test_same_inputs_same_report(trace_path, tmp_path, capsys) -> None:
    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}"
        rc, _, err = run(["replay", "--trace", str(trace_path), "--topology", "dgx-h100:2", "--policy", "local",
                          "--steps", "1:", "--out", str(out), "--quiet"], capsys)
        assert rc == 0, err
        outs.append(out)
    for name in FILES:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    doc = json.loads((outs[0] / "report.json").read_text())
    assert doc["summary"]["steps"] == 5 and doc["summary"]["first_step"] == 1
    # 8 experts on 16 GPUs: every node holds a replica of each, and the local policy keeps tokens in their node
    assert doc["summary"]["bytes_inter_node"] == 0 and doc["summary"]["bytes_intra_node"] > 0


def test_replay_with_mapping_and_rebalance(trace_path, tmp_path, capsys) -> None:
    model = get_model("tiny")
    m = ExpertMapping.round_robin(model.num_layers, model.num_experts, 4, 3)
    m.save(tmp_path / "m.json")
    flat = tmp_path / "topo.json"
    from moesim.topo import Topology

    flat.write_text(json.dumps(Topology.flat(4, 50e9, 2e-6, "h100").to_json()))
    rc, _, err = run(["replay", "--trace", str(trace_path), "--topology", str(flat), "--mapping",
                           str(tmp_path / "m.json"), "--out", str(tmp_path / "o"), "--no-plots",
                           "--rebalance", "periodic:interval=2,window=2"], capsys)
    assert rc == 0, err
    doc = json.loads((tmp_path / "o" / "report.json").read_text())
    assert doc["inputs"]["mapping"] == str(tmp_path / "m.json")
    assert doc["inputs"]["rebalance"] == "periodic:interval=2,window=2" and doc["inputs"]["rebalance_blocking"]
    assert not (tmp_path / "o" / "load_heatmap.png").exists()
    # overlapped moves: the same schedule, no stall charged
    rc, _, err = run(["replay", "--trace", str(trace_path), "--topology", str(flat), "--mapping",
                      str(tmp_path / "m.json"), "--out", str(tmp_path / "o2"), "--no-plots",
                      "--rebalance", "periodic:interval=2,window=2", "--rebalance-overlap"], capsys)
    assert rc == 0, err
    over = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert over["inputs"]["rebalance_blocking"] is False
    assert over["inputs"]["rebalance_schedule"] == doc["inputs"]["rebalance_schedule"]
    assert over["summary"]["step_latency_mean_s"] <= doc["summary"]["step_latency_mean_s"]


def bad_cases(trace_path, tmp_path):
    model = get_model("tiny")
    other = ExpertMapping.linear(4, 8, 8)  # 4 layers: another model
    other.save(tmp_path / "other.json")
    four = ExpertMapping.linear(model.num_layers, model.num_experts, 4)
    four.save(tmp_path / "four.json")
    (tmp_path / "junk.json").write_text("{not json")
    from moesim.topo import Topology

    topo = Topology.flat(8, 1e9, 1e-6, "h100").to_json()
    topo["graph"]["links"][0]["bandwidth"] = -1.0
    (tmp_path / "negbw.json").write_text(json.dumps(topo))
    topo = Topology.flat(8, 1e9, 1e-6, "h100").to_json()
    topo["graph"]["links"] = [e for e in topo["graph"]["links"] if "gpu3" not in (e["source"], e["target"])]
    (tmp_path / "island.json").write_text(json.dumps(topo))
    base = ["replay", "--trace", str(trace_path), "--out", str(tmp_path / "o")]
    return [
        (base + ["--topology", "dgx-h999"], "unknown topology"),
        (base + ["--topology", str(tmp_path / "negbw.json")], "bandwidth"),
        (base + ["--topology", str(tmp_path / "island.json")], "gpu3"),
        (base + ["--topology", "dgx-h100", "--mapping", str(tmp_path / "other.json")], "layers"),
        (base + ["--topology", "dgx-h100", "--mapping", str(tmp_path / "four.json")], "GPUs"),
        (base + ["--topology", "dgx-h100", "--mapping", str(tmp_path / "junk.json")], "JSON"),
        (base + ["--topology", "dgx-h100", "--steps", "4:2"], "--steps"),
        (base + ["--topology", "dgx-h100", "--steps", "x"], "--steps"),
        (base + ["--topology", "dgx-h100", "--cost", "nope.json"], "--cost"),
        (base + ["--topology", "dgx-h100", "--cost", "fit"], "timings"),
        (base + ["--topology", "dgx-h100", "--slots-per-gpu", "0"], "slots"),
        (["replay", "--trace", str(tmp_path / "missing.mtrace"), "--topology", "dgx-h100", "--out",
          str(tmp_path / "o")], "does not exist"),
    ]


def test_bad_inputs_exit_2_one_line(trace_path, tmp_path, capsys) -> None:
    for args, word in bad_cases(trace_path, tmp_path):
        rc, _, err = run(args, capsys)
        assert rc == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moesim: error:") and word in lines[0], (args, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written for a failed replay


def _result(S=3, L=2, G=2, t=1.0, engine="analytic") -> SimResult:
    return SimResult(step_time=np.full(S, t), phase_time=np.full((S, L, 5), t / (5 * L)), gpu_busy=np.ones((S, G)),
                     moe_time=np.ones((S, G)), bytes_intra=np.ones(S), bytes_inter=np.zeros(S),
                     link_bytes=np.ones(4), gpu_load=np.ones((L, G)), step_tokens=np.full(S, 10),
                     phase=np.zeros(S, np.uint8), first_step=0, extra={"engine": engine,
                                                                       "events": [(0, "expert", 0.0, 0.5)]})


def test_concat_and_stall() -> None:
    a, b = _result(), _result(S=2, t=2.0)
    b.first_step = 3
    c = SimResult.concat([a, b])
    assert c.num_steps == 5 and c.step_time.sum() == pytest.approx(7.0)
    np.testing.assert_allclose(c.gpu_load, 2 * np.ones((2, 2)))
    assert c.extra["events"][1] == (0, "expert", 3.0, 3.5)  # shifted by the first result's 3 s
    c.add_stall(3, 0.5, 1e9, "rebalance")
    assert c.step_time[3] == pytest.approx(2.5) and c.stall_time.sum() == pytest.approx(0.5)
    s = c.summary()
    assert s["stall_time_s"] == pytest.approx(0.5) and s["stalls"] == 1 and s["stall_bytes"] == 1e9
    assert "rebalance stalls" in format_table(s)
    with pytest.raises(MoesimError):
        c.add_stall(99, 1.0, 0.0, "x")
    with pytest.raises(MoesimError):
        c.add_stall(0, -1.0, 0.0, "x")
    with pytest.raises(MoesimError):
        SimResult.concat([])


def test_chrome_trace_uses_engine_events() -> None:
    tl = chrome_trace(_result(engine="des"))
    x = [e for e in tl["traceEvents"] if e["ph"] == "X"]
    assert x == [{"name": "expert", "cat": "phase", "ph": "X", "pid": 0, "tid": 0, "ts": 0.0, "dur": 5e5}]
    assert tl["otherData"]["source"] == "des"


def test_load_only_trace_replays(tmp_path, capsys) -> None:
    model = get_model("tiny")
    rng = np.random.default_rng(2)
    path = tmp_path / "c.mtrace"
    with TraceWriter(path, model, kind="counts") as w:
        for _ in range(3):
            w.add_counts(rng.multinomial(32 * model.top_k, np.ones(8) / 8, size=model.num_layers), phase="decode")
    rc, _, err = run(["replay", "--trace", str(path), "--topology", "dgx-h100", "--out", str(tmp_path / "o"),
                           "--engine", "des"], capsys)
    assert rc == 0, err
    doc = json.loads((tmp_path / "o" / "report.json").read_text())
    assert doc["summary"]["tokens"] == 96 and doc["inputs"]["trace_kind"] == "counts"
    assert sum(doc["summary"]["gpu_load_total"]) == pytest.approx(96 * model.top_k * model.num_layers)


def test_windows_give_the_same_result(trace_path, monkeypatch) -> None:
    """simulate() replays long traces in windows of steps; the concatenation equals one big window."""
    import moesim.sim as sim
    from moesim.cost import CostModel
    from moesim.sim.config import SimConfig
    from moesim.topo import load_topology
    from moesim.trace import Trace

    topo = load_topology("dgx-h100")
    model = get_model("tiny")
    mapping = ExpertMapping.linear(model.num_layers, model.num_experts, 8)
    cost = CostModel.roofline(model, topo.device)
    seen = []
    with Trace.open(trace_path) as tr:
        one = sim.simulate(tr, topo, mapping, cost, model, SimConfig(), progress=lambda d, n: seen.append((d, n)))
        monkeypatch.setattr(sim, "WINDOW_BYTES", 1)
        many = sim.simulate(tr, topo, mapping, cost, model, SimConfig(), start=0, stop=tr.num_steps)
    assert seen[-1] == (6, 6)
    for name in ("step_time", "phase_time", "gpu_busy", "moe_time", "bytes_intra", "bytes_inter", "link_bytes",
                 "gpu_load", "step_tokens", "phase"):
        np.testing.assert_allclose(getattr(many, name), getattr(one, name), rtol=1e-12, err_msg=name)


def test_progress_bar(capsys) -> None:
    from moesim.cli.cmd_replay import ProgressBar, parse_steps

    bar = ProgressBar(True)
    bar(3, 3)
    err = capsys.readouterr().err
    assert "3/3 steps" in err and err.endswith("\n")
    ProgressBar(False)(1, 2)
    assert capsys.readouterr().err == ""
    assert parse_steps("2:", 10) == (2, 10) and parse_steps(":-3", 10) == (0, 7) and parse_steps(None, 4) == (0, 4)


@pytest.mark.parametrize("policy,name", [("vllm", "vllm"), ("round_robin", "position"), ("position", "position")])
def test_replay_replica_policies(trace_path, tmp_path, capsys, policy, name) -> None:
    """--policy vllm (vLLM's hash of the token index) and the old position policy under both its names."""
    out = tmp_path / "r"
    rc, _, err = run(["replay", "--trace", str(trace_path), "--topology", "dgx-h100:2", "--slots-per-gpu", "1",
                      "--policy", policy, "--out", str(out), "--quiet"], capsys)
    assert rc == 0, err
    doc = json.loads((out / "report.json").read_text())
    assert json.dumps(doc["inputs"]).count(f'"policy": "{name}"') >= 1
