"""`moesim sweep` killed midway (SIGKILL of its process group) resumes with only the missing cells, and the
table equals an uninterrupted run's; the Ray executor's table equals the process pool's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from moesim.sweep import cells, load_spec, run_sweep, table
from tests.sweep.conftest import write_spec

GRID = """\
    command = "replay"
    [options]
    trace = "{trace}"
    no-plots = true
    [axes]
    topology = ["dgx-h100", "pcie-8gpu"]
    engine = ["analytic", "des"]
    slots-per-gpu = [1, 2]
"""


def sweep_cmd(spec, out, *extra):
    return [sys.executable, "-m", "moesim", "sweep", str(spec), "--out", str(out), *extra]


def finished(out) -> int:
    d = out / "cells"
    return sum(1 for p in d.iterdir() if (p / cells.RECORD).is_file() and not p.name.startswith(cells.TMP_PREFIX)) \
        if d.is_dir() else 0


def test_killed_sweep_resumes_with_only_the_missing_cells(tmp_path, traces) -> None:
    spec = write_spec(tmp_path, GRID.format(trace=traces / "tiny.mtrace"))
    out = tmp_path / "out"
    env = {**os.environ, "MOESIM_NO_PROGRESS": "1"}
    proc = subprocess.Popen(sweep_cmd(spec, out, "--workers", "2"), start_new_session=True, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while finished(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its workers, mid-cell
        proc.wait()
    done = finished(out)
    assert 2 <= done < 8, f"the kill came too late to test resuming ({done} of 8 cells finished)"
    before = {p.name: (p / cells.RECORD).read_text() for p in (out / "cells").iterdir()
              if (p / cells.RECORD).is_file() and not p.name.startswith(cells.TMP_PREFIX)}
    assert len(before) == done
    assert not (out / "results.csv").exists()  # the table is written only at the end
    r = subprocess.run(sweep_cmd(spec, out, "--workers", "2"), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"8 cells ({8 - done} run, {done} cached, 0 failed)" in r.stdout
    assert not [p for p in (out / "cells").iterdir() if p.name.startswith(cells.TMP_PREFIX)]  # no half cells left
    for name, record in before.items():  # finished cells were not run again (their wall times would differ)
        assert (out / "cells" / name / cells.RECORD).read_text() == record, name
    # an uninterrupted run (in one process this time) gives the same table
    ref = run_sweep(load_spec(spec), tmp_path / "ref", workers=1)
    cols, rows = table.read_csv(out / "results.csv")
    rcols, rrows = table.read_csv(tmp_path / "ref" / "results.csv")
    assert table.deterministic(cols, rows) == table.deterministic(rcols, rrows)
    assert len(rows) == 8 and ref.failed == 0 and all(r["status"] == "ok" for r in rows)


@pytest.mark.slow  # a local Ray cluster starts in ~10-20 s on 2 cores
def test_ray_table_equals_the_process_pool_table(tmp_path, traces) -> None:
    pytest.importorskip("ray")
    spec = load_spec(write_spec(tmp_path, GRID.format(trace=traces / "tiny.mtrace").replace(
        'engine = ["analytic", "des"]\n', "")))
    pool = run_sweep(spec, tmp_path / "pool", workers=2)
    ray = run_sweep(spec, tmp_path / "ray", ray=True)
    assert ray.ran == 4 and ray.failed == 0 and pool.failed == 0
    assert table.deterministic(*table.read_csv(tmp_path / "ray" / "results.csv")) == \
        table.deterministic(*table.read_csv(tmp_path / "pool" / "results.csv"))
    # the cells' report files came back from the Ray workers
    for row in ray.rows:
        assert (tmp_path / "ray" / "cells" / row["cell"] / "report.json").read_text() == \
            (tmp_path / "pool" / "cells" / row["cell"] / "report.json").read_text()
