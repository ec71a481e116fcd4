"""Small file helpers: every output is written atomically, every input read with a one-line error."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moesim.errors import MoesimError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash or an error leaves any previous file at ``path`` untouched and no half-written file behind.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise MoesimError(f"cannot write {path}: directory {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files others may read
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def check_file(path: str | Path, what: str) -> Path:
    """Raise a one-line error unless ``path`` is an existing regular file."""
    path = Path(path)
    if not path.exists():
        raise MoesimError(f"{what} {path} does not exist")
    if path.is_dir():
        raise MoesimError(f"{what} {path} is a directory, not a file")
    return path


def read_json(path: str | Path, what: str) -> Any:
    path = check_file(path, what)
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError:
        raise MoesimError(f"{what} {path} is not a text (JSON) file") from None
    except json.JSONDecodeError as exc:
        raise MoesimError(f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")
