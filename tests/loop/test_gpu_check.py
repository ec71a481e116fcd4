"""benchmarks/gpu_check.sh: valid bash; its CPU mode runs every step and leaves a flat folder of <= 8 files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def test_gpu_check_is_valid_bash_and_runs_the_four_steps_in_order() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    text = SCRIPT.read_text()
    start = text.index('if [ "$MODE" = gpu ]; then\n  step')
    gpu = text[start:text.index("\nelse\n", start)]
    order = [gpu.index(s) for s in ("pytest -m gpu", "bench_runtime --short", "moesim validate", "bench_kernels")]
    assert order == sorted(order)
    for flag in ("--device cuda --nproc 1", "--preset olmoe-1b-7b --batch 128 --prompt-len 256 --steps 32"):
        assert flag in gpu
    # every step has a timeout, and the timeouts of the GPU steps fit the 8-minute budget
    limits = [int(m) for m in re.findall(r'step "[^"]+" (\d+) ', gpu)] + [int(re.search(r"step install (\d+)",
                                                                                         text).group(1))]
    assert len(limits) == 5 and sum(limits) <= 8 * 60 + 30


@pytest.mark.slow
@pytest.mark.dist
def test_cpu_mode_runs_every_step_and_leaves_a_flat_folder(tmp_path) -> None:
    pytest.importorskip("torch")
    if shutil.which("timeout") is None:
        pytest.skip("no coreutils timeout")
    out = tmp_path / "gc"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu", str(out)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = list(out.iterdir())
    assert all(f.is_file() for f in files) and len(files) <= 8
    assert {"summary.md", "logs.txt", "bench_runtime.md", "bench_runtime.json", "validate_report.json"} <= {
        f.name for f in files}
    summary = (out / "summary.md").read_text()
    for name in ("install", "pytest -m gpu", "bench_runtime --smoke", "moesim validate (tiny, cpu)"):
        assert f"| {name} | 0 |" in summary, summary
    assert "| bench_kernels (short) | skipped: needs a GPU |" in summary
    assert "uncalibrated roofline" in summary  # validate's report.md landed in the summary
