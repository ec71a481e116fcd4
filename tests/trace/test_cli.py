"""``moesim trace ...`` and ``moesim demo`` end to end, good and bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moesim.cli import main
from moesim.trace import Trace

FIX = Path(__file__).resolve().parent / "fixtures"


def _one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("moesim: error:") and "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture
def synth_trace(tmp_path) -> Path:
    out = tmp_path / "s.mtrace"
    assert main(["trace", "synth", "--model", "tiny-deepseek", "--steps", "5", "--tokens", "64",
                 "--decode-tokens", "8", "--ranks", "4", "--seed", "3", "--out", str(out)]) == 0
    return out


def test_synth_show_validate_load(tmp_path, synth_trace, capsys):
    with Trace.open(synth_trace) as trace:
        assert trace.num_steps == 5 and trace.num_tokens == 64 + 4 * 8 and trace.num_ranks == 4
        load = trace.load().sum(axis=0)

    assert main(["trace", "show", str(synth_trace)]) == 0
    out = capsys.readouterr().out
    assert "tiny-deepseek" in out and "busiest/mean" in out and "truncated  no" in out

    assert main(["trace", "info", str(synth_trace), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 2 and info["experts"] == 16 and info["top_k"] == 4
    assert info["steps"] == 5 and info["tokens"] == 96 and len(info["imbalance"]) == 2
    assert "load" not in info
    assert main(["trace", "show", str(synth_trace), "--json", "--full", "--start", "1", "--stop", "3"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["steps"] == 2 and info["tokens"] == 16 and np.array(info["load"]).sum() == 2 * 16 * 4

    assert main(["trace", "validate", str(synth_trace)]) == 0
    assert "valid" in capsys.readouterr().out

    for suffix in ("json", "csv", "npy"):
        out = tmp_path / f"load.{suffix}"
        assert main(["trace", "load", str(synth_trace), "--out", str(out)]) == 0
        if suffix == "json":
            got = np.array(json.loads(out.read_text())["load"])
        elif suffix == "csv":
            got = np.loadtxt(out, delimiter=",", dtype=np.int64)
        else:
            got = np.load(out, allow_pickle=False)
        assert np.array_equal(got, load)
    out = tmp_path / "steps.npy"
    assert main(["trace", "load", str(synth_trace), "--per-step", "--start", "2", "--out", str(out)]) == 0
    assert np.load(out).shape == (3, 2, 16)


def test_validate_reports_a_truncated_trace_with_exit_1(tmp_path, capsys):
    out = tmp_path / "big.mtrace"
    from moesim.models import get_model
    from moesim.trace import TraceWriter

    with TraceWriter(out, get_model("tiny"), chunk_bytes=1) as w:  # one chunk per step
        for _ in range(3):
            w.add_step(np.zeros((2, 5, 2), dtype=np.int64) + [0, 1])
    data = out.read_bytes()
    cut = tmp_path / "cut.mtrace"
    cut.write_bytes(data[:-10])
    assert main(["trace", "validate", str(cut)]) == 2
    err = capsys.readouterr().err
    assert "cut short" in err and "2 complete chunks" in err
    assert main(["trace", "show", str(cut)]) == 2  # damage is refused by every command ...
    assert "--allow-truncated" in capsys.readouterr().err
    assert main(["trace", "show", "--allow-truncated", str(cut)]) == 0  # ... unless asked: the complete steps read
    captured = capsys.readouterr()
    assert "warning" in captured.err and "cut short" in captured.out
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    bad = tmp_path / "crc.mtrace"
    bad.write_bytes(bytes(flipped))
    assert main(["trace", "validate", str(bad)]) == 2
    assert "checksum" in capsys.readouterr().err


def test_import_each_format(tmp_path, capsys):
    cases = [["sglang", "sglang_stat.json"], ["sglang", "sglang_per_pass.json"], ["vllm-eplb", "vllm_eplb.npz"],
             ["megatron", "megatron"], ["counts", "counts.csv"], ["counts", "counts.json"]]
    for i, (fmt, name) in enumerate(cases):
        out = tmp_path / f"{i}.mtrace"
        assert main(["trace", "import", "--format", fmt, str(FIX / name), "--model", "tiny", "--out", str(out)]) == 0
        assert main(["trace", "validate", str(out)]) == 0
    out = tmp_path / "m.mtrace"
    assert main(["trace", "import", "--format", "vllm", str(FIX / "vllm_load.npy"), "--mapping",
                 str(FIX / "phy2log.json"), "--model", "tiny", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out


def test_import_real_data(tmp_path, shared_data, capsys):
    out = tmp_path / "o.mtrace"
    assert main(["trace", "import", "--format", "olmoe", str(shared_data / "olmoe-routing-analysis" /
                                                            "expert_counts_all.json"), "--out", str(out)]) == 0
    assert "absent layers" in capsys.readouterr().out
    assert main(["trace", "show", str(out)]) == 0
    assert "note" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["trace", "show", "{missing}"],
    ["trace", "show", "{garbage}"],
    ["trace", "show", "{dir}"],
    ["trace", "validate", "{missing}"],
    ["trace", "validate", "{garbage}"],
    ["trace", "load", "{missing}", "--out", "{tmp}/x.json"],
    ["trace", "load", "{good}", "--out", "{tmp}/x.txt"],
    ["trace", "load", "{good}", "--out", "{tmp}/x.csv", "--per-step"],
    ["trace", "load", "{good}", "--out", "{tmp}/nodir/x.json"],
    ["trace", "show", "{good}", "--start", "5", "--stop", "3"],
    ["trace", "synth", "--model", "nope", "--out", "{tmp}/x.mtrace"],
    ["trace", "import", "--format", "counts", "{fix}/counts.csv", "--model", "list", "--out", "{tmp}/x.mtrace"],
    ["trace", "synth", "--model", "tiny", "--steps", "0", "--out", "{tmp}/x.mtrace"],
    ["trace", "synth", "--model", "tiny", "--skew", "-2", "--out", "{tmp}/x.mtrace"],
    ["trace", "synth", "--model", "tiny", "--out", "{tmp}/nodir/x.mtrace"],
    ["trace", "import", "--format", "sglang", "{missing}", "--out", "{tmp}/x.mtrace"],
    ["trace", "import", "--format", "sglang", "{garbage}", "--out", "{tmp}/x.mtrace"],
    ["trace", "import", "--format", "sglang", "{fix}/sglang_stat.json", "--model", "tiny", "--buffer-start", "9",
     "--out", "{tmp}/x.mtrace"],
    ["trace", "import", "--format", "parquet", "{fix}/counts.json", "--out", "{tmp}/x.mtrace"],
    ["trace", "import", "--format", "megatron", "{dir}", "--out", "{tmp}/x.mtrace"],
    ["trace", "export", "--format", "parquet", "{good}", "--out", "{tmp}/nodir/x.parquet"],
    ["trace", "import", "--format", "megatron", "{garbage}", "--out", "{tmp}/x.mtrace"],
    ["trace", "import", "--format", "vllm", "{fix}/megatron/router_trace_rank0.jsonl", "--out", "{tmp}/x.mtrace"],
    ["trace", "import", "--format", "megatron", "{fix}/counts.json", "--out", "{tmp}/x.mtrace"],
    ["trace", "import", "--format", "counts", "{fix}/counts.csv", "--model", "mixtral-8x7b", "--out", "{tmp}/x.mtrace"],
    ["trace", "import", "--format", "switch", "{fix}/counts.json", "--out", "{tmp}/x.mtrace"],
    ["trace", "import", "--format", "counts", "{fix}/counts.csv", "{fix}/counts.csv", "--model", "tiny",
     "--out", "{tmp}/x.mtrace"],
    ["demo", "--out", "{garbage}"],
])
def test_bad_inputs_exit_2_with_one_line(tmp_path, synth_trace, capsys, argv):
    garbage = tmp_path / "garbage.mtrace"
    garbage.write_bytes(b"\x00\x01 this is not a trace at all" * 10)
    (tmp_path / "dir").mkdir()
    subs = {"{missing}": str(tmp_path / "missing.mtrace"), "{garbage}": str(garbage), "{dir}": str(tmp_path / "dir"),
            "{good}": str(synth_trace), "{tmp}": str(tmp_path), "{fix}": str(FIX)}
    args = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        args.append(a)
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as exc:  # a flag argparse refuses (one line, exit 2)
        rc = exc.code
    _one_line_error(capsys, rc)
    assert not (tmp_path / "x.mtrace").exists() and not (tmp_path / "x.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "deepseek-v3" in text and "busiest/mean" in text and "step latency p50" in text
    assert "held-out steps" in text and "eplb" in text
    with Trace.open(out / "trace.mtrace") as trace:
        assert trace.validate() == [] and trace.num_steps == 12 and trace.num_ranks == 32
    report = json.loads((out / "replay" / "report.json").read_text())
    assert report["summary"]["step_latency_p50_s"] > 0
    for name in ("replay/steps.csv", "replay/timeline.json", "compare/compare.json", "compare/compare.png"):
        assert (out / name).is_file(), name
    from moesim.cli.cmd_demo import demo_trace

    again = demo_trace(tmp_path / "again")
    assert again.read_bytes() == (out / "trace.mtrace").read_bytes()  # the demo is reproducible


def test_synth_model_list(capsys):
    assert main(["trace", "synth", "--model", "list", "--out", "unused.mtrace"]) == 0
    out = capsys.readouterr().out
    assert "deepseek-v3" in out and "4/8" in out and not Path("unused.mtrace").exists()


def test_help_texts_and_module_entry():
    for argv in (["--help"], ["trace", "--help"], ["trace", "synth", "--help"], ["trace", "import", "--help"],
                 ["demo", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    res = subprocess.run([sys.executable, "-m", "moesim", "trace", "show", "/nonexistent/x.mtrace"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "does not exist" in res.stderr


def test_load_export_imports_back_as_counts(tmp_path, synth_trace):
    """trace load --per-step → trace import --format counts keeps every step's load exactly."""
    exported = tmp_path / "steps.json"
    assert main(["trace", "load", str(synth_trace), "--per-step", "--out", str(exported)]) == 0
    back = tmp_path / "back.mtrace"
    assert main(["trace", "import", "--format", "counts", str(exported), "--model", "tiny-deepseek",
                 "--out", str(back)]) == 0
    with Trace.open(synth_trace) as a, Trace.open(back) as b:
        assert b.kind == "counts" and np.array_equal(a.load(), b.load()) and a.num_tokens == b.num_tokens
