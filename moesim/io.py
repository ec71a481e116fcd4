"""Small file helpers: every output is written atomically, every input read with a one-line error."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
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
    remove_stale_temporaries(parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=parent)
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


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def remove_stale_temporaries(parent: Path, name: str) -> list[Path]:
    """Remove ``.NAME.<pid>.*tmp*`` files and folders that a killed writer of ``NAME`` left in ``parent``.

    Why by pid: a writer that is still alive (another process writing the same output) keeps its temporary.
    """
    removed = []
    prefix = f".{name}."
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            if not entry.name.startswith(prefix) or "tmp" not in entry.name[len(prefix):]:
                continue
            pid = entry.name[len(prefix):].split(".", 1)[0]
            if not pid.isdigit() or pid_alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


OUTPUT_MARKER = ".moesim-output"


@contextlib.contextmanager
def atomic_dir(path: str | Path, what: str = "--out", previous: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; swap it in as ``path`` whole only if the block succeeds.

    An output directory then always holds exactly one run: a killed or failed run leaves the previous one
    untouched, and no file of an older run survives beside a newer run's files. A non-empty ``path`` that is
    not a previous moesim output (no marker file, none of the ``previous`` file names) is refused, not replaced.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists() and not path.is_dir():
        raise MoesimError(f"{what} {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not any((path / n).exists() for n in (OUTPUT_MARKER, *previous)):
        raise MoesimError(f"{what} {path} is a non-empty directory that is not a moesim output; "
                          "choose a new or empty directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoesimError(f"cannot create {what} {path}: {exc.strerror}") from None
    remove_stale_temporaries(parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=parent))
    try:
        (tmp / OUTPUT_MARKER).write_text("written by moesim; the folder is replaced whole by the next run\n")
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.old", suffix=".tmp", dir=parent))
            os.replace(path, old / "run")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def check_file(path: str | Path, what: str, max_bytes: int | None = None) -> Path:
    """Raise a one-line error unless ``path`` is an existing regular file (of at most ``max_bytes``).

    Why regular: a FIFO or device given as an input would block or never end.
    """
    path = Path(path)
    if str(path) == "":
        raise MoesimError(f"{what} is an empty path")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise MoesimError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise MoesimError(f"{what} {path} cannot be read: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise MoesimError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise MoesimError(f"{what} {path} is not a regular file (a FIFO, socket or device is refused)")
    if max_bytes is not None and st.st_size > max_bytes:
        raise MoesimError(f"{what} {path} is {st.st_size / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} MiB "
                          "a file of this kind may have")
    return path


MAX_JSON_DEPTH = 64
MAX_JSON_BYTES = 1 << 30


def parse_json(text: str | bytes, what: str) -> Any:
    """``json.loads`` with one-line errors, no NaN/Infinity constants and nesting bounded to MAX_JSON_DEPTH."""
    def refuse_constant(name: str) -> Any:
        raise MoesimError(f"{what} holds {name}, a non-finite number (not valid JSON)")

    try:
        data = json.loads(text, parse_constant=refuse_constant)
    except RecursionError:
        raise MoesimError(f"{what} is nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    except UnicodeDecodeError:
        raise MoesimError(f"{what} is not a text (JSON) file") from None
    except json.JSONDecodeError as exc:
        raise MoesimError(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if json_depth(data) > MAX_JSON_DEPTH:
        raise MoesimError(f"{what} is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return data


def json_depth(data: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    depth, stack = 0, [(data, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            depth = max(depth, d)
            stack.extend((child, d + 1) for child in node if isinstance(child, (dict, list)))
    return depth


def read_json(path: str | Path, what: str) -> Any:
    path = check_file(path, what, max_bytes=MAX_JSON_BYTES)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise MoesimError(f"{what} {path} is not a text (JSON) file") from None
    return parse_json(text, f"{what} {path}")


def finite_json(data: Any) -> Any:
    """``data`` with every non-finite float replaced by None, so what is written is always valid JSON."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` atomically as strict JSON: NaN and infinities become null (they mean "undefined")."""
    text = json.dumps(finite_json(json.loads(json.dumps(data, default=_json_default))), indent=2, allow_nan=False)
    atomic_write_text(path, text + "\n")


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
