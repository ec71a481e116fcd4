"""Hostile inputs through the CLI: every class of bad input refused in one line (exit 2), in bounded time and
memory, never a traceback, never a silently wrong result.

The command lines run in ONE worker process (tests/robust/fuzz_driver.py) under an address-space cap of 2 GiB,
so a refusal that only came after allocating tens of GB would show as a MemoryError instead of the named limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from moesim.models import get_model
from moesim.trace import Trace, TraceWriter
from moesim.trace import format as fmt

DRIVER = Path(__file__).with_name("fuzz_driver.py")
MEMORY_CAP = 2 << 30
TINY = get_model("tiny")


# -- crafted files --------------------------------------------------------------------------------------------
def _good_trace(path: Path, steps: int = 6, tokens: int = 16) -> Path:
    rng = np.random.default_rng(0)
    with TraceWriter(path, TINY, chunk_bytes=1) as w:  # one chunk per step
        for _ in range(steps):
            w.add_step(rng.integers(0, TINY.num_experts, (TINY.num_layers, tokens, TINY.top_k)), phase="decode")
    return path


def _header_only(path: Path, model_changes: dict) -> Path:
    """A trace whose header declares ``model_changes`` (no chunks: the header alone must be refused)."""
    with Trace.open(_good_trace(path.with_suffix(".src"))) as t:
        header = dict(t.header)
    header["model"] = {**header["model"], **model_changes}
    body = json.dumps(header).encode()
    head = fmt.FILE_HEAD.pack(fmt.MAGIC, fmt.VERSION, len(body))
    path.write_bytes(head + body + b"\0" * fmt.pad(len(head) + len(body)))
    return path


def _chunk_bounds(path: Path) -> list[tuple[int, int, int]]:
    """(chunk start, payload start, chunk end) of every chunk."""
    with Trace.open(path) as t:
        return [(c["dir_start"] - fmt.CHUNK_HEAD.size, c["payload"], c["payload"] + c["payload_len"])
                for c in t._chunks]


def _rewrite_first_directory(path: Path, change) -> Path:
    """Edit chunk 0's JSON directory (same length, re-padded) and give it a valid checksum again."""
    data = bytearray(path.read_bytes())
    start, payload, end = _chunk_bounds(path)[0]
    dir_start = start + fmt.CHUNK_HEAD.size
    directory = json.loads(bytes(data[dir_start:payload]))
    change(directory)
    new = json.dumps(directory, separators=(",", ":")).encode()
    assert len(new) <= payload - dir_start, "the edit must fit the old directory"
    new += b" " * (payload - dir_start - len(new))
    data[dir_start:payload] = new
    magic, dlen, plen, _, res = fmt.CHUNK_HEAD.unpack_from(data, start)
    data[start:dir_start] = fmt.CHUNK_HEAD.pack(magic, dlen, plen, zlib.crc32(bytes(data[dir_start:end])), res)
    path.write_bytes(bytes(data))
    return path


def _counts_trace(path: Path, counts: np.ndarray, kv_len: float | None = None) -> Path:
    w = TraceWriter(path, TINY, kind="counts")
    arrays = {"phase": np.zeros(1, "u1"), "counts": counts.astype("<i8").reshape(1, *counts.shape[-2:])}
    if kv_len is not None:
        arrays["kv_len"] = np.array([kv_len], "<f8")
    w._write_chunk(0, 1, arrays)
    w.close()
    return path


def _topology(path: Path, gpus: int, bandwidth: float = 1e11, latency: float = 1e-6) -> Path:
    nodes = [{"id": f"gpu{i}", "kind": "gpu"} for i in range(gpus)] + [{"id": "sw", "kind": "switch"}]
    links = [{"source": f"gpu{i}", "target": "sw", "bandwidth": bandwidth, "latency": latency, "duplex": True}
             for i in range(gpus)]
    path.write_text(json.dumps({"format": "moesim.topology", "version": 1, "device": "h100",
                                "graph": {"nodes": nodes, "links": links}}))
    return path


def _deep_json(path: Path, depth: int = 100_000) -> Path:
    path.write_text("[" * depth + "]" * depth)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("fuzz")
    good = _good_trace(d / "good.mtrace")
    data = good.read_bytes()
    bounds = _chunk_bounds(good)
    f = {"d": str(d), "good": str(good)}
    f["experts_2e31"] = str(_header_only(d / "e.mtrace", {"num_experts": 2**31, "num_groups": 1}))
    f["layers_1e9"] = str(_header_only(d / "l.mtrace", {"num_layers": 10**9}))
    f["name_list"] = str(_header_only(d / "n.mtrace", {"name": ["a", "list"]}))
    f["shape_overflow"] = str(_rewrite_first_directory(
        Path(str(_good_trace(d / "o.mtrace"))), lambda dr: dr["arrays"]["ids"].__setitem__(1, [2**62, 2**62, 2])))
    (d / "cut.mtrace").write_bytes(data[:bounds[3][1] + 5])  # inside chunk 3
    f["cut"] = str(d / "cut.mtrace")
    (d / "garbage.mtrace").write_bytes(data + b"trailing garbage after the last chunk")
    f["garbage"] = str(d / "garbage.mtrace")
    (d / "gap.mtrace").write_bytes(data[:bounds[2][0]] + data[bounds[3][0]:])  # step 2 missing
    f["gap"] = str(d / "gap.mtrace")
    flipped = bytearray(data)
    flipped[bounds[1][2] - 3] ^= 0x01  # an id of chunk 1, still in range: only the checksum can tell
    (d / "flip.mtrace").write_bytes(bytes(flipped))
    f["flip"] = str(d / "flip.mtrace")
    f["huge_counts"] = str(_counts_trace(d / "huge.mtrace", np.full((2, 8), 2**62)))
    f["inf_kv"] = str(_counts_trace(d / "kv.mtrace", np.ones((2, 8)), kv_len=float("inf")))
    (d / "huge_load.json").write_text(json.dumps({"load": [[2.0**62] * 8] * 2}))
    f["huge_load"] = str(d / "huge_load.json")
    f["topo_3000"] = str(_topology(d / "t3000.json", 3000))
    f["topo_tiny_bw"] = str(_topology(d / "bw.json", 8, bandwidth=1e-300))
    f["topo_huge_lat"] = str(_topology(d / "lat.json", 8, latency=1e300))
    f["deep"] = str(_deep_json(d / "deep.json"))
    fifo = d / "fifo.json"
    os.mkfifo(fifo)
    f["fifo"] = str(fifo)
    np.savez(d / "obj.npz", expert_load_window=np.array([{"a": 1}, None], dtype=object))
    f["npz_object"] = str(d / "obj.npz")
    return f


# (id, argv with {name} placeholders, words the one error line must hold)
CASES = [
    ("header 2**31 experts: replay", "replay --trace {experts_2e31} --topology dgx-h100 --out {d}/r1", "experts"),
    ("header 2**31 experts: info", "trace info {experts_2e31}", "experts"),
    ("header 1e9 layers: info", "trace info {layers_1e9}", "layers"),
    ("header 1e9 layers: validate", "trace validate {layers_1e9}", "layers"),
    ("header 1e9 layers: place", "place --trace {layers_1e9} --topology dgx-h100 --algo greedy --out {d}/m.json",
     "layers"),
    ("header 1e9 layers: replay", "replay --trace {layers_1e9} --topology dgx-h100 --out {d}/r2", "layers"),
    ("shape overflowing the size check", "trace validate {shape_overflow}", "outside the chunk"),
    ("model name that is a list", "trace info {name_list}", "name"),
    ("synth 1e12 tokens", "trace synth --model tiny --tokens 1000000000000 --out {d}/s.mtrace", "memory budget"),
    ("synth seed -1", "trace synth --model tiny --seed -1 --out {d}/s.mtrace", "--seed"),
    ("synth empty out", "trace synth --model tiny --steps 2 --out ", "--out"),
    ("replay 1e9 slots per GPU", "replay --trace {good} --topology dgx-h100 --slots-per-gpu 1000000000 --out {d}/r3",
     "--slots-per-gpu"),
    ("place 1e5 slots per GPU", "place --trace {good} --topology dgx-h100 --slots-per-gpu 100000 --out {d}/m.json",
     "slots"),
    ("place 1e9 slots per GPU", "place --trace {good} --topology dgx-h100 --slots-per-gpu 1000000000 "
     "--out {d}/m.json", "slots"),
    ("place 1e12 redundant", "place --trace {good} --topology dgx-h100 --redundant 1000000000000 --out {d}/m.json",
     "--redundant"),
    ("3000-GPU topology file", "replay --trace {good} --topology {topo_3000} --out {d}/r4", "at most 2048"),
    ("bandwidth 1e-300", "replay --trace {good} --topology {topo_tiny_bw} --out {d}/r5", "bandwidth"),
    ("latency 1e300", "replay --trace {good} --topology {topo_huge_lat} --out {d}/r6", "latency"),
    ("deep JSON as --mapping", "replay --trace {good} --topology dgx-h100 --mapping {deep} --out {d}/r7",
     "nested too deeply"),
    ("FIFO as --mapping", "replay --trace {good} --topology dgx-h100 --mapping {fifo} --out {d}/r8",
     "not a regular file"),
    ("npz object array", "trace import --format vllm-eplb {npz_object} --model tiny --out {d}/i.mtrace",
     "numpy file"),
    ("cut trace: replay", "replay --trace {cut} --topology dgx-h100 --out {d}/r9", "--allow-truncated"),
    ("cut trace: place", "place --trace {cut} --topology dgx-h100 --algo greedy --out {d}/m.json",
     "--allow-truncated"),
    ("trailing garbage: replay", "replay --trace {garbage} --topology dgx-h100 --out {d}/r10", "bad magic"),
    ("step gap: place", "place --trace {gap} --topology dgx-h100 --algo greedy --out {d}/m.json", "expected 2"),
    ("bit flip: info", "trace info {flip}", "checksum"),
    ("bit flip: replay", "replay --trace {flip} --topology dgx-h100 --out {d}/r11", "checksum"),
    ("bit flip: place", "place --trace {flip} --topology dgx-h100 --algo greedy --out {d}/m.json", "checksum"),
    ("int64-overflowing counts: info", "trace info {huge_counts}", "load count"),
    ("huge counts in a load file", "compare --load {huge_load} --model tiny --topology dgx-h100 --algos greedy",
     "refused"),
    ("infinite kv_len: validate", "trace validate {inf_kv}", "kv_len"),
    ("milp weight nan", "place --trace {good} --topology dgx-h100 --algo milp --internode-weight nan "
     "--out {d}/m.json", "--internode-weight"),
    ("milp time limit 0", "place --trace {good} --topology dgx-h100 --algo milp --time-limit 0 --out {d}/m.json",
     "--time-limit"),
    ("milp time limit -1", "place --trace {good} --topology dgx-h100 --algo milp --time-limit -1 --out {d}/m.json",
     "--time-limit"),
    ("milp time limit nan", "place --trace {good} --topology dgx-h100 --algo milp --time-limit nan "
     "--out {d}/m.json", "--time-limit"),
    ("rebalance algo magic", "replay --trace {good} --topology dgx-h100 --rebalance-algo magic --out {d}/r12",
     "--rebalance-algo"),
]
RUN_CASES = [  # need torch: checked before any rank starts
    ("run prompt 1e6", "run --check-only --preset small --prompt-len 1000000 --steps 2", "memory"),
    ("run batch 1e8", "run --check-only --preset small --batch 100000000 --steps 2", "memory"),
    ("run threads -1", "run --check-only --preset tiny --steps 2 --threads -1", "--threads"),
    ("deep JSON as --remap-at", "run --check-only --preset tiny --steps 4 --remap-at 2:{deep}", "nested too deeply"),
]


def _argv(line: str, files: dict[str, str]) -> list[str]:
    parts = line.split(" ")
    return [p.format(**files) for p in parts]


@pytest.fixture(scope="module")
def results(files, tmp_path_factory) -> dict[str, dict]:
    cases = CASES + (RUN_CASES if _has_torch() else [])
    d = tmp_path_factory.mktemp("driver")
    (d / "cases.json").write_text(json.dumps([{"id": i, "argv": _argv(line, files), "timeout": 60}
                                              for i, line, _ in cases]))
    env = {**os.environ, "MOESIM_NO_PROGRESS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(DRIVER), str(d / "cases.json"), str(d / "results.json"),
                           str(MEMORY_CAP)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["id"]: r for r in json.loads((d / "results.json").read_text())}


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


@pytest.mark.parametrize("case", CASES + RUN_CASES, ids=[c[0] for c in CASES + RUN_CASES])
def test_bad_input_is_one_line_exit_2(results, case):
    name, _, words = case
    if name not in results:
        pytest.skip("needs torch")
    r = results[name]
    lines = r["stderr"].strip().splitlines()
    assert r["rc"] == 2, r
    assert len(lines) == 1 and lines[0].startswith("moesim: error:"), r["stderr"]
    assert "Traceback" not in r["stderr"] and words in lines[0], lines[0]
    assert r["seconds"] < 30, f"{name} took {r['seconds']:.1f} s"


def test_damage_is_accepted_only_when_asked_and_then_reported(files, tmp_path, capsys):
    from moesim.cli import main

    out = tmp_path / "r"
    assert main(["replay", "--trace", files["cut"], "--topology", "dgx-h100", "--allow-truncated", "--no-plots",
                 "--quiet", "--out", str(out)]) == 0
    assert "warning" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert "cut short" in report["inputs"]["trace_truncated"]
    assert report["inputs"]["steps"] == [0, 3]


def test_report_json_is_strict_even_with_undefined_figures(tmp_path):
    from moesim.io import write_json

    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": np.float64("nan")})
    assert json.loads((tmp_path / "x.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == \
        {"a": None, "b": [1.0, None], "c": None}


def test_an_output_directory_holds_one_run(files, tmp_path, capsys):
    from moesim.cli import main

    out = tmp_path / "r"
    base = ["replay", "--trace", files["good"], "--topology", "dgx-h100", "--quiet", "--out", str(out)]
    assert main(base) == 0
    assert list(out.glob("*.png"))
    assert main([*base, "--no-plots"]) == 0
    assert not list(out.glob("*.png")), "a PNG of the previous run survived beside this one"
    cmp_out = tmp_path / "c"
    cmp = ["compare", "--trace", files["good"], "--topology", "dgx-h100", "--out", str(cmp_out)]
    assert main([*cmp, "--algos", "linear,greedy"]) == 0
    assert main([*cmp, "--algos", "greedy"]) == 0
    assert sorted(p.name for p in cmp_out.glob("mapping-*.json")) == ["mapping-greedy.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporaries left behind"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not moesim's")
    capsys.readouterr()
    assert main([*base[:-1], str(foreign)]) == 2
    assert "not a moesim output" in capsys.readouterr().err and (foreign / "notes.txt").exists()


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    from moesim.cli import main

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".t.mtrace.{dead.pid}.tmp"
    stale.write_bytes(b"x" * 100)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".t.mtrace.{other.pid}.tmp"  # a writer still running keeps its temporary
        live.write_bytes(b"y")
        assert main(["trace", "synth", "--model", "tiny", "--steps", "2", "--tokens", "8", "--out",
                     str(tmp_path / "t.mtrace")]) == 0
        assert not stale.exists() and live.exists()
    finally:
        other.kill()
        other.wait()


def test_memory_budget_is_configurable(monkeypatch):
    from moesim.errors import MoesimError
    from moesim.limits import check_memory, memory_budget

    monkeypatch.setenv("MOESIM_MEMORY_BUDGET", "1.5G")
    assert memory_budget() == int(1.5 * 2**30)
    check_memory(2**30, "x")
    with pytest.raises(MoesimError, match=r"1\.5 GiB"):
        check_memory(2**31, "x")
    monkeypatch.setenv("MOESIM_MEMORY_BUDGET", "lots")
    with pytest.raises(MoesimError, match="MOESIM_MEMORY_BUDGET"):
        memory_budget()


def test_json_depth_is_bounded_without_recursion():
    from moesim.errors import MoesimError
    from moesim.io import json_depth, parse_json

    assert json_depth([[1], {"a": [2]}]) == 3 and json_depth(5) == 0
    assert parse_json("[" * 64 + "]" * 64, "x") == parse_json("[" * 64 + "]" * 64, "x")
    with pytest.raises(MoesimError, match="nested too deeply"):
        parse_json("[" * 65 + "]" * 65, "x")
    with pytest.raises(MoesimError, match="NaN"):
        parse_json('{"a": NaN}', "x")


def test_chunk_checksum_is_checked_once_per_chunk(files):
    with Trace.open(files["flip"]) as t:
        list(t.steps(0, 1))  # chunk 0 is sound
        with pytest.raises(Exception, match="checksum"):
            list(t.steps(1, 2))
    good = Path(files["good"])
    with Trace.open(good) as t:
        t.load()
        assert all(c.get("crc_ok") for c in t._chunks)
