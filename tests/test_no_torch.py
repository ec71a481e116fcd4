"""The simulator side must run on a laptop without torch: importing it (and building the CLI) never loads torch.

(``moesim run`` registers its options from moesim.runtime.config, which is torch-free by design.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODULES = ["moesim", "moesim.sim", "moesim.sim.des", "moesim.placement", "moesim.placement.rebalance",
           "moesim.topo",  "moesim.cost", "moesim.trace.synth", "moesim.trace.importers", "moesim.trace.stats",
           "moesim.validate", "moesim.calibration", "moesim.trace.megatron", "moesim.trace.parquet", "moesim.timeline"]


def test_simulator_side_imports_without_torch() -> None:
    code = ("import sys\n"
            + "".join(f"import {m}\n" for m in MODULES)
            + "from moesim.cli import build_parser\nbuild_parser()\n"
            + "bad = sorted(m for m in sys.modules\n"
            + "             if m.split('.')[0] in ('torch', 'triton') or m.startswith('moesim.kernels'))\n"
            + "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_runtime_commands_without_torch_fail_in_one_line(monkeypatch, capsys, tmp_path) -> None:
    """A simulator-only install meeting `moesim run` / `moesim validate`: one line, exit 2, nothing written."""
    import importlib.util

    from moesim.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    for argv in (["run", "--nproc", "2"], ["validate", "--out", str(tmp_path / "v")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "needs torch" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "v").exists()
