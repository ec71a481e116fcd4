"""Shared helpers of the studies: command line, tables, results files, plots.

Why: each study is one ``run.py`` that a reader reruns with one command; they all parse ``--quick``/``--out``,
print a plain-text table, and write CSV/JSON/PNG results the same way, so that code lives here once.
Import it from a study's ``run.py`` after putting ``studies/`` on ``sys.path`` (see any run.py).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moesim.io import atomic_write_text

STUDIES = Path(__file__).resolve().parent
ROOT = STUDIES.parent
ROUTING_DATA = ROOT.parent / "shared" / "data" / "routing"  # ../shared/data/routing (see its README.md)


def parse_args(name: str, doc: str, argv: Sequence[str] | None = None,
               extra: Any = None) -> argparse.Namespace:
    """``--quick`` (reduced sizes, seconds: the smoke tests) and ``--out`` (default studies/<name>/results)."""
    p = argparse.ArgumentParser(prog=f"studies/{name}/run.py", description=doc)
    p.add_argument("--quick", action="store_true", help="reduced sizes (seconds); used by the smoke tests")
    p.add_argument("--out", type=Path, default=STUDIES / name / "results", help="results folder")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def fmt(v: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` significant figures, the rest as str."""
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "nan"
        if v == 0:
            return "0"
        if abs(v) >= 10 ** digits or abs(v) < 1e-3:
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(digits - 1 - int(math.log10(abs(v))), 0)}f}"
    if isinstance(v, (np.integer,)):
        return str(int(v))
    return str(v)


def table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown pipe table (also readable in a terminal)."""
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, width)) + " |",
           "|" + "|".join("-" * (w + 2) for w in width) + "|"]
    out += ["| " + " | ".join(x.ljust(w) for x, w in zip(row, width)) + " |" for row in cells]
    return "\n".join(out) + "\n"


def write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Rows as CSV (floats with 6 significant figures), written atomically."""
    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([f"{float(r[c]):.6g}" if isinstance(r.get(c), (float, np.floating)) else r.get(c, "")
                    for c in columns])
    atomic_write_text(path, buf.getvalue())


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return round(f, 6) if math.isfinite(f) else None
    return obj


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(_plain(data), indent=1) + "\n")


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_fig(fig: Any, path: Path) -> None:
    """Save a figure to PNG (via a temporary name, so no half-written plot is left) and close it."""
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    pyplot().close(fig)


class Clock:
    """Wall and CPU time since construction, for the 'finished in' line each study prints.

    CPU time (this process, all threads) is printed too: on a shared machine the wall time says little.
    """

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()

    def __str__(self) -> str:
        return f"wall {time.perf_counter() - self.t0:.1f} s, CPU {time.process_time() - self.c0:.1f} s"


BEGIN = "<!-- results:begin (written by run.py: the output of the last full run) -->"
END = "<!-- results:end -->"


def publish(args: argparse.Namespace, name: str, text: str, clock: Clock) -> None:
    """Print the study's output, save it as results/table.md and, for a full run into the default folder,
    put it into the README between the BEGIN/END markers (so the README always shows what the command printed).
    """
    where = args.out.resolve()
    try:
        shown = where.relative_to(ROOT)
    except ValueError:
        shown = where
    out = f"{text.rstrip()}\n\nresults in {shown} ({clock})\n"
    atomic_write_text(args.out / "table.md", out)
    print(out, end="")
    readme = STUDIES / name / "README.md"
    if args.quick or where != (STUDIES / name / "results").resolve() or not readme.is_file():
        return
    doc = readme.read_text()
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        atomic_write_text(readme, f"{head}{BEGIN}\n\n{out}\n{END}{tail}")
