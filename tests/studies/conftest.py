"""Load a study's run.py as a module (studies/ is not a package on the import path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

STUDIES = Path(__file__).resolve().parents[2] / "studies"
ROUTING_DATA = STUDIES.parent.parent / "shared" / "data" / "routing"


def _load(name: str) -> ModuleType:
    path = STUDIES / name / "run.py"
    spec = importlib.util.spec_from_file_location(f"study_{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def study():
    return _load
