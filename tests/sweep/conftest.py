"""Fixtures of the sweep tests: two small synthetic traces and a spec writer."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from moesim.models import get_model
from moesim.trace.synth import SynthConfig, synthesize


@pytest.fixture(scope="session")
def traces(tmp_path_factory) -> Path:
    """A folder with tiny.mtrace (6 steps, 4 ranks) and tiny-b.mtrace (another seed)."""
    d = tmp_path_factory.mktemp("sweep-traces")
    model = get_model("tiny")
    for name, seed in (("tiny.mtrace", 0), ("tiny-b.mtrace", 1)):
        synthesize(model, SynthConfig(steps=6, tokens=64, decode_tokens=32, num_ranks=4, seed=seed), d / name)
    return d


def write_spec(folder: Path, text: str, name: str = "spec.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path
