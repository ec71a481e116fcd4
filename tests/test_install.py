"""The installed distribution claims no top-level name but ``moesim``: a decoy ``kernels`` / ``runtime`` installed
first (Hugging Face ships a top-level ``kernels``) leaves ``moesim run`` working."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

DECOY_PYPROJECT = """[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "decoy-kernels-runtime"
version = "1.0"

[tool.setuptools]
packages = ["kernels", "runtime"]
"""


def _sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.dist
def test_decoy_kernels_and_runtime_do_not_shadow_moesim(tmp_path) -> None:
    pytest.importorskip("torch")
    base = getattr(sys, "_base_executable", sys.executable)
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    _sh([base, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, env)
    py = venv / "bin" / "python"
    # building a project needs its build backend (setuptools>=68) from a package index or wheel folder
    probe = subprocess.run([str(py), "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp_path / "wh"),
                            "setuptools>=68"], env=env, capture_output=True, text=True, timeout=300)
    if probe.returncode:
        pytest.skip("no package index here to fetch setuptools for building the project in a fresh venv")
    # 1. the decoys: top-level kernels and runtime packages, as another distribution installs them
    decoy = tmp_path / "decoy"
    for name in ("kernels", "runtime"):
        (decoy / name).mkdir(parents=True)
        (decoy / name / "__init__.py").write_text(f'"""Decoy {name}: not moesim\'s."""\nDECOY = True\n')
    (decoy / "pyproject.toml").write_text(DECOY_PYPROJECT)
    _sh([str(py), "-m", "pip", "install", "-q", "--no-deps", str(decoy)], tmp_path, env)
    # 2. the project, from a copy of its tracked files (a clean source tree; the build writes into it)
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for f in files:
        if (REPO / f).is_file() and not f.startswith(("tests/", "studies/", "benchmarks/")):
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    _sh([str(py), "-m", "pip", "install", "-q", "--no-deps", str(src)], tmp_path, env)  # deps: system site
    # 3. the names resolve to the right packages, and a 2-rank run works
    work = tmp_path / "work"
    work.mkdir()
    out = _sh([str(py), "-c", "import kernels, runtime, moesim.kernels, moesim.runtime, moesim.runtime.worker; "
               "print(kernels.DECOY, runtime.DECOY, hasattr(moesim.kernels, 'DECOY'), moesim.runtime.__file__)"],
              work, env)
    flag_k, flag_r, ours, where = out.split()
    assert (flag_k, flag_r, ours) == ("True", "True", "False") and str(venv) in where
    out = _sh([str(venv / "bin" / "moesim"), "run", "--nproc", "2", "--preset", "tiny", "--steps", "2",
               "--record", str(work / "rec")], work, env, timeout=400)
    assert "tokens/s" in out and (work / "rec" / "trace.mtrace").is_file()
