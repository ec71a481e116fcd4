"""``moesim sweep``: a grid of ``replay`` / ``place`` / ``compare`` runs from a TOML spec, resumable.

Layout of ``--out DIR``::

    DIR/spec.toml               the spec as given
    DIR/results.csv             one row per cell (moesim.sweep.table)
    DIR/results.parquet         the same (with pyarrow)
    DIR/plots/*.png             the spec's [[plots]]
    DIR/cells/<key>/            each cell's report files and cell.json (moesim.sweep.cells)

A cell whose ``cells/<key>/cell.json`` exists is finished and is not run again (a failed one neither, unless
``retry_failed``); the key hashes the cell's inputs (moesim.sweep.spec.cell_key), so a changed trace, option or
moesim version runs anew while the rest is reused.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moesim.errors import MoesimError
from moesim.io import atomic_write_text
from moesim.sweep import cells, executors, table
from moesim.sweep.spec import Spec, load_spec

__all__ = ["Spec", "SweepResult", "load_spec", "run_sweep"]


@dataclass
class SweepResult:
    spec: Spec
    columns: list[str]
    rows: list[dict[str, Any]]
    ran: int  # cells run by this call
    cached: int  # cells found finished
    failed: int  # cells whose status is not ok (this call's and cached ones)
    notes: list[str]  # one-line notes (parquet skipped, ...)
    plot_errors: list[str]


def run_sweep(spec: Spec | str | Path, out: str | Path, *, workers: int | None = None, ray: str | bool | None = None,
              retry_failed: bool = False, progress: bool = False) -> SweepResult:
    """Run every unfinished cell of ``spec`` and write the table and plots into ``out``.

    ``workers``: local processes (default: all cores; 1 runs the cells in this process). ``ray``: None/False
    for local execution, True for a new local Ray cluster, or the address of an existing one. Local workers are
    spawned processes: a script that calls this with ``workers != 1`` needs the ``if __name__ == "__main__":``
    guard (as every multiprocessing program does).
    """
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MoesimError(f"--out {out} exists and is not a directory")
    if workers is not None and workers < 1:
        raise MoesimError(f"--workers must be >= 1, got {workers}")
    if ray:
        executors._import_ray()  # fail in one line before anything runs
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    for leftover in cells_dir.glob(f"{cells.TMP_PREFIX}*"):  # cells a killed sweep was writing
        shutil.rmtree(leftover, ignore_errors=True)
    atomic_write_text(out / "spec.toml", spec.text)
    records: dict[str, dict[str, Any]] = {}
    todo: list[dict[str, Any]] = []
    seen: set[str] = set()
    for cell in spec.cells:
        if cell.key in seen:  # two cells with identical inputs (e.g. a linked axis repeating a value) run once
            continue
        seen.add(cell.key)
        rec = cells.read_record(cells_dir, cell.key)
        if rec is not None and (rec.get("status") == "ok" or not retry_failed):
            records[cell.key] = rec
            continue
        todo.append({"key": cell.key, "command": spec.command, "args": cell.args, "cells_dir": str(cells_dir),
                     "options": {k: v for k, v in cell.options.items()}})
    cached = len(records)
    bar = executors.Progress(len(seen), cached, progress)
    bar.show(force=True)

    def done(record: dict[str, Any]) -> None:
        records[record["key"]] = record
        bar.finished(record)

    n = workers or os.cpu_count() or 1
    if not todo:
        pass
    elif ray:
        executors.run_ray(todo, None if ray is True else str(ray), done, bar.tick)
    elif n == 1 or len(todo) == 1:
        executors.run_serial(todo, done, bar.tick)
    else:
        executors.run_pool(todo, min(n, len(todo)), done, bar.tick)
    columns, rows = table.build_rows(spec, records)
    notes = []
    table.write_csv(out / "results.csv", columns, rows)
    skipped = table.write_parquet(out / "results.parquet", columns, rows)
    if skipped:
        notes.append(skipped)
    plot_errors = []
    if spec.plots:
        (out / "plots").mkdir(exist_ok=True)
    for i, p in enumerate(spec.plots):
        try:
            table.check_metric(p, i, columns, rows)
            table.plot(spec, p, rows, out / "plots" / p.filename)
        except MoesimError as exc:
            plot_errors.append(str(exc))
    failed = sum(r["status"] != "ok" for r in rows)
    return SweepResult(spec, columns, rows, len(todo), cached, failed, notes, plot_errors)
