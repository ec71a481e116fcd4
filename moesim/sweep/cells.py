"""Running one sweep cell: the command's library code into the cell's folder, its figures as one record.

Why: a cell must run the same code as the command (``execute`` of ``moesim/cli/cmd_<command>.py``), never a
subprocess, in a local worker process or a Ray task alike. A finished cell is a folder ``cells/<key>/`` holding
the command's report files and ``cell.json`` (the record: status, error, figures, wall times); it appears by one
rename, so a sweep killed at any moment leaves finished cells whole and no half-written ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from moesim import __version__
from moesim.errors import MoesimError

CELL_FORMAT = "moesim.sweep-cell"
RECORD = "cell.json"
TMP_PREFIX = ".tmp-"


def _flat(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    """Scalars of a nested dict as ``a.b`` keys (lists are per-GPU detail: left to the cell's report)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif obj is None or isinstance(obj, (bool, int, str)):
        out[prefix] = obj
    elif isinstance(obj, float):
        out[prefix] = obj if math.isfinite(obj) else None
    elif hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy scalar
        _flat(prefix, obj.item(), out)


def execute(command: str, args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """Run ``command`` with ``args`` writing into ``out``; return (figures, wall times in seconds)."""
    args = argparse.Namespace(**vars(args))
    figures: dict[str, Any] = {}
    wall: dict[str, float] = {}
    if command == "replay":
        from moesim.cli.cmd_replay import execute as replay

        args.out = str(out)
        _flat("", replay(args), figures)
        schedule = json.loads((out / "report.json").read_text())["inputs"].get("rebalance_schedule")
        if schedule is not None:  # the report's rebalances: count, bytes moved, copy seconds (stalls if blocking)
            figures["rebalances"] = len(schedule)
            figures["rebalance_moved_bytes"] = float(sum(e["moved_bytes"] for e in schedule))
            figures["rebalance_seconds"] = float(sum(e["seconds"] for e in schedule))
    elif command == "place":
        from moesim.cli.cmd_place import execute as place

        args.out = str(out / "mapping.json")
        res = place(args)
        wall["algo_s"] = float(res.pop("seconds"))
        _flat("", res, figures)
    elif command == "compare":
        from moesim.cli.cmd_compare import execute as compare

        args.out = str(out)
        res, _text = compare(args)
        for prefix, rows in (("", res["rows"]), ("holdout.", res["holdout_rows"])):
            for row in rows:
                algo = row["algo"]
                for k, v in row.items():
                    if k == "seconds":
                        wall[f"algo_s.{algo}"] = float(v)
                    elif k != "algo":
                        _flat(f"{prefix}{algo}.{k}", v, figures)
        for k in ("fit_steps", "holdout_steps"):
            figures[k] = f"{res[k][0]}:{res[k][1]}" if res.get(k) else None
    else:
        raise MoesimError(f"command {command!r} cannot be swept")
    return figures, wall


def run(task: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run one cell into the folder ``out`` (created) and return its record; a failure is recorded, not raised."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    record: dict[str, Any] = {"format": CELL_FORMAT, "version": 1, "moesim": __version__, "key": task["key"],
                              "command": task["command"], "options": task["options"]}
    try:
        figures, wall = execute(task["command"], task["args"], out)
        record.update(status="ok", error=None, figures=figures)
    except Exception as exc:  # a failed cell is recorded with its error and never stops the sweep
        msg = str(exc) if isinstance(exc, MoesimError) else f"{type(exc).__name__}: {exc}"
        record.update(status="failed", error=" ".join(msg.split()), figures={})
        wall = {}
        (out / "error.txt").write_text(traceback.format_exc())
    record["wall"] = {"cell_s": time.perf_counter() - t0, **wall}
    return record


def folder(key: str) -> str:
    """A cell's folder name under ``cells/``: its key's first 16 hex digits (the table's ``cell`` column)."""
    return key[:16]


def commit(cells_dir: Path, key: str, tmp: Path, record: dict[str, Any]) -> Path:
    """Write the record into ``tmp`` and rename ``tmp`` to ``cells_dir/folder(key)`` (replacing an old one)."""
    (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    final = cells_dir / folder(key)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def local_cell(task: dict[str, Any]) -> dict[str, Any]:
    """A cell in a local worker process: run into a temporary folder beside the final one, then commit."""
    cells_dir = Path(task["cells_dir"])
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{task['key'][:16]}-", dir=cells_dir))
    try:
        record = run(task, tmp)
        commit(cells_dir, task["key"], tmp, record)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return record


def remote_cell(task: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A cell on a Ray worker (maybe another machine): run into a local temporary folder, return the record and
    the folder's files as bytes; the driver commits them into the sweep's folder."""
    with tempfile.TemporaryDirectory(prefix="moesim-cell-") as tmp:
        record = run(task, Path(tmp))
        files = {p.relative_to(tmp).as_posix(): p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
    return record, files


def commit_files(cells_dir: Path, key: str, files: dict[str, bytes], record: dict[str, Any]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{key[:16]}-", dir=cells_dir))
    try:
        for name, data in files.items():
            p = tmp / name
            if tmp.resolve() not in p.resolve().parents:
                continue  # never write outside the cell's folder
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        commit(cells_dir, key, tmp, record)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def failed_record(task: dict[str, Any], error: str) -> dict[str, Any]:
    """The record of a cell whose worker died (killed, out of memory) or whose Ray task failed."""
    return {"format": CELL_FORMAT, "version": 1, "moesim": __version__, "key": task["key"],
            "command": task["command"], "options": task["options"], "status": "failed",
            "error": " ".join(error.split()), "figures": {}, "wall": {}}


def read_record(cells_dir: Path, key: str) -> dict[str, Any] | None:
    """A finished cell's record, or None (not run, or its folder is not a complete cell)."""
    path = cells_dir / folder(key) / RECORD
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("format") != CELL_FORMAT or rec.get("key") != key:
        return None
    return rec
