"""The simulator side must run on a laptop without torch: importing it (and building the CLI) never loads torch.

(``moesim run`` registers its options from runtime.config, which is torch-free by design.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODULES = ["moesim", "moesim.sim", "moesim.sim.des", "moesim.placement", "moesim.placement.rebalance",
           "moesim.topology", "moesim.cost", "moesim.trace.synth", "moesim.trace.importers", "moesim.trace.stats",
           "moesim.validate", "moesim.calibration"]


def test_simulator_side_imports_without_torch() -> None:
    code = ("import sys\n"
            + "".join(f"import {m}\n" for m in MODULES)
            + "from moesim.cli import build_parser\nbuild_parser()\n"
            + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'kernels'))\n"
            + "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
