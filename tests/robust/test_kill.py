"""SIGKILL at several moments: nothing survives, nothing is mixed, nothing is left behind.

- ``moesim run``: killing its process group at any moment leaves no worker alive 10 s later;
- ``moesim replay --out D``: D holds the previous run whole (or, after the kill lands too late, the new one whole);
- ``moesim trace synth``: the old output stays untouched; the next run removes the killed run's temporary.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moesim.cli import main


def _moesim(*args: str) -> subprocess.Popen:
    env = {**os.environ, "MOESIM_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "moesim", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=env)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _processes_of(launcher: int) -> list[int]:
    """Live processes started on behalf of the launcher ``launcher`` (they carry MOESIM_LAUNCHER_PID)."""
    found = []
    needle = f"MOESIM_LAUNCHER_PID={launcher}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env and state != "Z":
            found.append(int(entry))
    return found


@pytest.mark.dist
@pytest.mark.parametrize("after_s", [0.3, 1.5, 4.0])
def test_no_worker_survives_a_killed_run(tmp_path, after_s):
    proc = _moesim("run", "--nproc", "2", "--preset", "tiny", "--steps", "400", "--record", str(tmp_path / "rec"))
    time.sleep(after_s)
    _kill_group(proc)
    deadline = time.monotonic() + 10
    while _processes_of(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _processes_of(proc.pid)
    for pid in left:  # do not leave them to the rest of the suite either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} process(es) of the killed run survived 10 s"
    run_json = tmp_path / "rec" / "run.json"
    if run_json.exists():  # the next start settles a run that was killed while "running"
        assert main(["run", "--nproc", "2", "--preset", "tiny", "--steps", "2", "--check-only",
                     "--record", str(tmp_path / "rec")]) == 2
        assert json.loads(run_json.read_text())["status"] in ("killed", "done")


@pytest.mark.dist
def test_a_new_run_never_destroys_a_recording(tmp_path, capsys):
    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "trace.mtrace").write_bytes(b"an earlier recording")
    (rec / "run.json").write_text(json.dumps({"status": "done"}))
    assert main(["run", "--nproc", "1", "--preset", "tiny", "--steps", "2", "--record", str(rec)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (rec / "trace.mtrace").read_bytes() == b"an earlier recording"


@pytest.fixture(scope="module")
def medium_trace(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kill") / "m.mtrace"
    assert main(["trace", "synth", "--model", "mixtral-8x7b", "--steps", "24", "--tokens", "2048", "--ranks", "8",
                 "--out", str(out)]) == 0
    return out


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.exists() else {}


def test_a_killed_replay_leaves_the_previous_output_whole(tmp_path, medium_trace):
    out = tmp_path / "out"
    args = ["replay", "--trace", str(medium_trace), "--topology", "dgx-h100", "--engine", "des", "--out", str(out)]
    t0 = time.monotonic()
    proc = _moesim(*args)
    assert proc.wait(timeout=600) == 0
    full = time.monotonic() - t0
    before = _snapshot(out)
    assert "report.json" in before and any(n.endswith(".png") for n in before)
    for frac in (0.15, 0.4, 0.7, 0.95):
        proc = _moesim(*args[:-2], "--no-plots", "--steps", "0:20", "--out", str(out))
        time.sleep(full * frac)
        _kill_group(proc)
        now = _snapshot(out)
        if now != before:  # the kill came after the swap: the new run, whole and alone
            assert not any(n.endswith(".png") for n in now) and json.loads(now["report.json"])["inputs"]["steps"] \
                == [0, 20]
            before = now
    proc = _moesim(*args)
    assert proc.wait(timeout=600) == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporaries left behind"


def test_a_killed_synth_leaves_the_old_trace_and_no_temporary(tmp_path):
    out = tmp_path / "t.mtrace"
    assert main(["trace", "synth", "--model", "tiny", "--steps", "3", "--tokens", "8", "--out", str(out)]) == 0
    old = out.read_bytes()
    for after in (0.5, 1.5):
        proc = _moesim("trace", "synth", "--model", "deepseek-v3", "--steps", "200", "--tokens", "4096",
                       "--out", str(out))
        time.sleep(after)
        _kill_group(proc)
        assert out.read_bytes() == old
    assert main(["trace", "synth", "--model", "tiny", "--steps", "3", "--tokens", "8", "--out", str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["t.mtrace"], "a killed run's temporary survived the next run"


@pytest.mark.parametrize("launcher_dies", ["before the import", "after the import"])
def test_a_worker_process_dies_with_its_launcher(launcher_dies):
    """What the run test cannot force on a fast machine: a worker whose launcher is gone before it could set a
    parent-death signal, or while it waits on something that never comes (a rendezvous, a collective)."""
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    if launcher_dies == "before the import":
        launcher.kill()
        launcher.wait()
    env = {**os.environ, "MOESIM_LAUNCHER_PID": str(launcher.pid)}
    worker = subprocess.Popen([sys.executable, "-c", "import moesim.runtime, time; print('up', flush=True); "
                                                     "time.sleep(60)"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        if launcher_dies == "after the import":
            assert worker.stdout.readline().strip() == "up"
            launcher.kill()
            launcher.wait()
        worker.wait(timeout=10)
    finally:
        for p in (worker, launcher):
            p.kill()
            p.wait()
    assert worker.returncode == 128 + signal.SIGKILL
