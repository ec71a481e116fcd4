"""``moesim run`` end to end: validation before spawning, a recorded run, a run killed mid-way."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")  # the runtime needs torch; moesim itself does not

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from moesim.cli import main
from moesim.mapping import ExpertMapping
from moesim.models import get_model
from moesim.trace import Trace

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _one_line_error(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("moesim: error:") and match in err, err


def test_bad_inputs_fail_before_any_process_starts(tmp_path, capsys) -> None:
    ExpertMapping.linear(4, 8, 2).save(tmp_path / "small.json")  # a mapping for another model
    _one_line_error(capsys, ["run", "--nproc", "2", "--preset", "tiny", "--mapping", str(tmp_path / "small.json")],
                    "layers")
    _one_line_error(capsys, ["run", "--nproc", "3", "--preset", "tiny"], "does not divide")
    ExpertMapping.linear(2, 8, 2, slots_per_gpu=5).save(tmp_path / "r.json")
    _one_line_error(capsys, ["run", "--nproc", "4", "--mapping", str(tmp_path / "r.json")], "for 2 GPUs")
    _one_line_error(capsys, ["run", "--nproc", "2", "--checkpoint", str(tmp_path / "missing")], "does not exist")
    from moesim.runtime.weights import SeededWeights, save_checkpoint

    save_checkpoint(SeededWeights(get_model("tiny-deepseek"), 0), tmp_path / "other")
    _one_line_error(capsys, ["run", "--nproc", "2", "--checkpoint", str(tmp_path / "other")], "has shape")
    _one_line_error(capsys, ["run", "--nproc", "2", "--remap-at", "x.json"], "STEP:MAPPING")
    _one_line_error(capsys, ["run", "--nproc", "2", "--profile"], "--record")
    _one_line_error(capsys, ["run", "--nproc", "2", "--preset", "gpt-5"], "unknown model preset")
    ExpertMapping.linear(2, 8, 2).save(tmp_path / "ok.json")
    _one_line_error(capsys, ["run", "--nproc", "2", "--await-mapping", "8:m.json"], "outside the run's steps")
    _one_line_error(capsys, ["run", "--nproc", "2", "--await-mapping", f"2:{tmp_path}/no/m.json"], "does not exist")
    _one_line_error(capsys, ["run", "--nproc", "2", "--await-mapping", "2:m.json", "--remap-at",
                             f"2:{tmp_path}/ok.json"], "also a --remap-at step")
    _one_line_error(capsys, ["run", "--nproc", "2", "--await-mapping", "2:m.json", "--await-timeout", "0"],
                    "--await-timeout")
    _one_line_error(capsys, ["run", "--nproc", "2", "--await-mapping", "m.json"], "STEP:MAPPING")
    _one_line_error(capsys, ["run", "--nproc", "2", "--prefill-chunk", "-1"], "--prefill-chunk")
    _one_line_error(capsys, ["run", "--nproc", "2", "--profile-every", "0"], "--profile-every")


def test_run_help_and_validation_do_not_import_torch(tmp_path) -> None:
    code = ("import sys; from moesim.cli import main; rc = main(['run', '--check-only', '--nproc', '2']); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, cwd=tmp_path, capture_output=True)


@pytest.mark.dist
def test_moesim_run_records_a_trace(tmp_path) -> None:
    """A real subprocess: 2 ranks, allgather, a live remap, the profiler; trace, timings, run.json, Chrome trace."""
    spec = get_model("tiny")
    ExpertMapping.round_robin(spec.num_layers, spec.num_experts, 2, slots_per_gpu=5).save(tmp_path / "m2.json")
    ExpertMapping.linear(spec.num_layers, spec.num_experts, 2, slots_per_gpu=5).save(tmp_path / "m1.json")
    out = tmp_path / "rec"
    cmd = [sys.executable, "-m", "moesim", "run", "--nproc", "2", "--preset", "tiny", "--steps", "4",
           "--backend", "allgather", "--mapping", str(tmp_path / "m1.json"), "--remap-at", f"2:{tmp_path / 'm2.json'}",
           "--record", str(out), "--profile"]
    proc = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tokens/s" in proc.stdout and "remapped before step 2" in proc.stdout
    with Trace.open(out / "trace.mtrace") as t:
        assert t.validate() == [] and t.num_steps == 4 and t.has_origin and t.num_ranks == 2
        steps = list(t.steps())
        assert [s.phase for s in steps] == ["prefill", "decode", "decode", "decode"]
        assert steps[0].num_tokens == 2 * 2 * 16 and steps[1].num_tokens == 2 * 2
        assert sorted(set(steps[0].origin.tolist())) == [0, 1]
        tm = t.timings()
        assert len(tm) == 4 * spec.num_layers * 2 and tm.phase_names == ("attention", "gate", "dispatch", "expert",
                                                                         "combine")
        assert (tm.phases > 0).all()
        assert int(tm.tokens.sum()) == int(t.load().sum())
        _fit(tm, spec)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["summary"]["tokens_per_s"] > 0
    assert [m["from_step"] for m in run["mappings"]] == [0, 2]
    assert len(run["steps"]) == 4 and all(s["wall_s"] > 0 for s in run["steps"])
    for rank in range(2):
        prof = json.loads((out / f"profile-rank{rank}.json").read_text())
        names = {e.get("name") for e in prof.get("traceEvents", [])}
        assert {"moesim.dispatch", "moesim.expert", "moesim.combine"} <= names
    check = subprocess.run([sys.executable, "-m", "moesim", "trace", "validate", str(out / "trace.mtrace")],
                           env=ENV, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def _fit(tm, spec) -> None:
    """The recorded timings load into the simulator's cost-model fit, and the fit predicts them."""
    from moesim.cost import CostModel

    model, report = CostModel.fit(tm, spec)
    assert report["records"] == len(tm)
    for phase in ("expert", "attention", "gate"):
        assert np.isfinite(report["phases"][phase]["median_rel_error"])
    assert (model.expert_time(tm.tokens.astype(float)) > 0).all()


@pytest.mark.dist
def test_in_process_cli_with_a_checkpoint(tmp_path, capsys) -> None:
    """``moesim.cli.main`` in this process, loading a safetensors checkpoint (each rank reads its experts)."""
    from moesim.runtime.weights import SeededWeights, save_checkpoint

    spec = get_model("tiny-deepseek")
    save_checkpoint(SeededWeights(spec, 11), tmp_path / "ckpt", shard_every=50)
    rc = main(["run", "--nproc", "2", "--preset", "tiny-deepseek", "--steps", "2", "--checkpoint",
               str(tmp_path / "ckpt"), "--record", str(tmp_path / "rec"), "--batch", "1", "--prompt-len", "4"])
    assert rc == 0
    with Trace.open(tmp_path / "rec" / "trace.mtrace") as t:
        assert t.num_steps == 2 and t.validate() == []
        ids = next(t.steps()).ids
        groups = ids // (spec.num_experts // spec.num_groups)
        assert max(len(set(g)) for g in groups.reshape(-1, spec.top_k).tolist()) <= spec.topk_groups


@pytest.mark.dist
def test_killed_run_leaves_a_readable_trace(tmp_path) -> None:
    out = tmp_path / "rec"
    cmd = [sys.executable, "-m", "moesim", "run", "--nproc", "2", "--preset", "tiny", "--steps", "100000",
           "--record", str(out)]
    proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        steps = 0
        while steps < 3:
            assert time.monotonic() < deadline, "the run recorded no steps in time"
            assert proc.poll() is None, "the run ended early"
            time.sleep(0.5)
            if (out / "trace.mtrace").exists():
                try:
                    with Trace.open(out / "trace.mtrace", require_steps=False) as t:
                        steps = t.num_steps
                except Exception:
                    steps = 0
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(3)  # the ranks get SIGTERM from their dying parents and stop
        with Trace.open(out / "trace.mtrace") as t:
            assert t.num_steps >= 3
            problems = t.validate()
            assert all("cut short" in p for p in problems), problems  # at worst the chunk being written
            assert t.load().sum() > 0 and len(t.timings()) >= 3 * 2 * 2
        run = json.loads((out / "run.json").read_text())
        assert run["status"] == "running" and len(run["steps"]) >= 3
        # the workers died with the launcher: the trace stops growing
        size = (out / "trace.mtrace").stat().st_size
        time.sleep(2)
        assert (out / "trace.mtrace").stat().st_size == size
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.dist
def test_await_mapping_that_never_comes_or_does_not_fit_keeps_the_old_mapping(tmp_path) -> None:
    """The paused run gives up after --await-timeout, or refuses a mapping for another shape; either way it
    records a failed remap, finishes on the initial mapping and exits 0."""
    ExpertMapping.linear(2, 8, 4).save(tmp_path / "four.json")  # tiny's shape, but for 4 ranks
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)  # crashed both ranks once (RecursionError)
    for label, target, error in (("late", tmp_path / "never.json", "no mapping appeared"),
                                 ("wrong", tmp_path / "four.json", "4 GPUs"),
                                 ("deep", tmp_path / "deep.json", "nested too deeply")):
        rec = tmp_path / label
        cmd = [sys.executable, "-m", "moesim", "run", "--nproc", "2", "--preset", "tiny", "--steps", "4",
               "--record", str(rec), "--await-mapping", f"2:{target}", "--await-timeout", "1"]
        proc = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        doc = json.loads((rec / "run.json").read_text())
        assert doc["status"] == "done" and len(doc["steps"]) == 4 and doc["awaiting"] is None
        assert [m["from_step"] for m in doc["mappings"]] == [0]
        (remap,) = doc["remaps"]
        assert remap["step"] == 2 and remap["ok"] is False and error in remap["error"], remap
        assert "no remap before step 2" in proc.stderr
        with Trace.open(rec / "trace.mtrace") as trace:  # the KV length of every step is recorded
            assert trace.kv_len().tolist() == [8.5, 17.0, 18.0, 19.0]


def test_worker_args_round_trip() -> None:
    """The launcher passes every option to the worker, which parses them back into the same config."""
    import argparse

    from moesim.runtime.config import RunConfig, add_arguments, config_from_args
    from moesim.runtime.launch import torchrun_command, worker_args

    cfg = RunConfig(preset="small", nproc=4, backend="allgather", mapping="m.json", steps=5, batch=3, prompt_len=7,
                    seed=9, record="out", remap_at=[(2, "a.json"), (4, "b.json")], profile=True, checkpoint="ck",
                    dtype="float32", device="cpu", policy="local", gpus_per_node=2, kernels="triton",
                    remap_transport="all2all", await_mapping=(3, "c.json"), await_timeout_s=7.5, graphs=False,
                    prefill_chunk=3, profile_every=4)
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert config_from_args(p.parse_args(worker_args(cfg)), 4) == cfg
    cmd = torchrun_command(cfg, port=1234)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nnodes"] and "moesim.runtime.worker" in cmd
    assert np.all([a in cmd for a in ("--nproc-per-node", "4", "--master-port", "1234")])
