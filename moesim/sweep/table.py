"""The results of a sweep: one table (``results.csv``, ``results.parquet``) and the spec's summary plots.

One row per cell in grid order (the axes in spec order, the last fastest): ``cell`` (its key's first 16 hex
digits: the folder ``cells/<key>``), the axis values, ``status`` and ``error``, every scalar figure of the
command's report, then ``wall.*`` columns (seconds: the only columns that differ between identical runs;
:data:`WALL_PREFIX` marks them). Floats are written shortest-exact (``repr``), so equal results give equal files.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import MoesimError
from moesim.io import atomic_path, atomic_write_text
from moesim.sweep.cells import folder

WALL_PREFIX = "wall."


def build_rows(spec: Any, records: dict[str, dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of the spec's cells from their records (``records[key]``)."""
    axis_cols = spec.axis_columns
    fig_cols: dict[str, None] = {}
    wall_cols: dict[str, None] = {}
    rows = []
    for cell in spec.cells:
        rec = records.get(cell.key) or {"status": "missing", "error": "not run", "figures": {}, "wall": {}}
        row: dict[str, Any] = {"cell": folder(cell.key), **{c: cell.axes.get(c) for c in axis_cols},
                               "status": rec.get("status"), "error": rec.get("error")}
        for k, v in (rec.get("figures") or {}).items():
            fig_cols.setdefault(k, None)
            row[k] = v
        for k, v in (rec.get("wall") or {}).items():
            wall_cols.setdefault(WALL_PREFIX + k, None)
            row[WALL_PREFIX + k] = v
        rows.append(row)
    fixed = ["cell", *axis_cols, "status", "error"]
    figs = [c for c in fig_cols if c not in fixed]
    return fixed + figs + list(wall_cols), rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ""
    return str(v)


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in columns])
    atomic_write_text(path, buf.getvalue())


def read_csv(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """A results.csv back as (columns, rows of strings)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        columns = next(reader)
        return columns, [dict(zip(columns, r)) for r in reader]


def deterministic(columns: list[str], rows: list[dict[str, Any]]) -> list[list[Any]]:
    """The table without its wall-time columns: what two runs of one spec must agree on."""
    keep = [c for c in columns if not c.startswith(WALL_PREFIX)]
    return [keep] + [[r.get(c) for c in keep] for r in rows]


def write_parquet(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> str | None:
    """Write the table with pyarrow; return None, or why it was skipped (pyarrow missing: the ``parquet`` extra)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return "results.parquet skipped: pyarrow is not installed (pip install 'moesim[parquet]')"
    arrays = {}
    for c in columns:
        vals = [r.get(c) for r in rows]
        present = [v for v in vals if v is not None]
        if present and all(isinstance(v, bool) for v in present):
            arrays[c] = pa.array(vals, type=pa.bool_())
        elif present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
            arrays[c] = pa.array(vals, type=pa.int64())
        elif present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            arrays[c] = pa.array([None if v is None else float(v) for v in vals], type=pa.float64())
        else:
            arrays[c] = pa.array([None if v is None else str(v) for v in vals], type=pa.string())
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(arrays), tmp)
    return None


# -- plots -----------------------------------------------------------------------------------------------------
def _number(v: Any) -> float:
    if isinstance(v, bool) or v is None:
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def plot(spec: Any, p: Any, rows: list[dict[str, Any]], path: Path) -> None:
    """One summary plot of the spec (heat map x × y, or metric over x per series); a panel per value of the
    other axes. Missing or failed cells are blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = {ax.name: ax for ax in spec.axes}
    ax_x = axes[p.x]
    ax_y = axes[p.y] if p.y else None
    others = [ax for ax in spec.axes if ax.name not in (p.x, p.y)]
    facets: list[dict[str, str]] = [{}]
    for ax in others:
        facets = [{**f, ax.name: ax.label(i)} for f in facets for i in range(len(ax.values))]
    xl = [ax_x.label(i) for i in range(len(ax_x.values))]
    yl = [ax_y.label(i) for i in range(len(ax_y.values))] if ax_y else [""]

    def grid(facet: dict[str, str]) -> np.ndarray:
        g = np.full((len(yl), len(xl)), np.nan)
        for cell, row in zip(spec.cells, rows):
            if any(cell.labels[k] != v for k, v in facet.items()) or row.get("status") != "ok":
                continue
            j = xl.index(cell.labels[p.x])
            i = yl.index(cell.labels[p.y]) if ax_y else 0
            g[i, j] = _number(row.get(p.metric))
        return g

    n = len(facets)
    grids = [grid(f) for f in facets]
    if p.kind == "heatmap":
        cols = min(n, 3 if len(xl) <= 4 else 2)
        w, h = 0.75 * len(xl) + 2.2, 0.4 * len(yl) + 2.6  # room for rotated tick labels below
    else:
        cols, w, h = min(n, 3), 4.6, 3.6
    nrows = -(-n // cols)
    fig, axs = plt.subplots(nrows, cols, figsize=(w * cols + (1.2 if p.kind == "heatmap" else 0), h * nrows),
                            squeeze=False, layout="constrained")
    numeric_x = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ax_x.values)
    xs = np.array([float(v) for v in ax_x.values]) if numeric_x else np.arange(len(xl))
    finite = np.concatenate([g[np.isfinite(g)] for g in grids]) if grids else np.zeros(0)
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = None
    for k, (facet, g) in enumerate(zip(facets, grids)):
        a = axs[k // cols, k % cols]
        if p.kind == "heatmap":  # one colour scale for every panel, so panels compare at a glance
            im = a.imshow(g, aspect="auto", cmap="viridis", origin="lower", vmin=lo, vmax=hi)
            a.set_xticks(range(len(xl)), xl, rotation=30, ha="right", fontsize=8)
            a.set_yticks(range(len(yl)), yl, fontsize=8)
            a.set_ylabel(p.y)
            if g.size <= 144:
                for (i, j), v in np.ndenumerate(g):
                    if np.isfinite(v):
                        bright = (v - lo) / (hi - lo) > 0.6 if hi > lo else False
                        a.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7,
                               color="k" if bright else "w")
        else:
            for i, label in enumerate(yl):
                a.plot(xs, g[i], "o-", label=f"{p.y}={label}" if ax_y else p.metric)
            a.set_xticks(xs, xl, rotation=0 if numeric_x else 30, ha="center" if numeric_x else "right", fontsize=8)
            a.set_ylabel(p.metric, fontsize=8)
            a.grid(alpha=0.3)
            if ax_y:
                a.legend(fontsize=7)
        a.set_xlabel(p.x)
        a.set_title(", ".join(f"{k}={v}" for k, v in facet.items()) or p.metric, fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axs.ravel().tolist(), label=p.metric, shrink=0.9)
    for k in range(n, nrows * cols):
        axs[k // cols, k % cols].axis("off")
    fig.suptitle(f"{p.metric} ({spec.path.name})", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def check_metric(p: Any, index: int, columns: list[str], rows: list[dict[str, Any]]) -> None:
    if p.metric in columns and any(np.isfinite(_number(r.get(p.metric))) for r in rows):
        return
    numeric = [c for c in columns if any(np.isfinite(_number(r.get(c))) for r in rows)
               and c not in ("cell", "status", "error")]
    raise MoesimError(f"plots[{index}]: metric {p.metric!r} is not a numeric column of results.csv; numeric "
                      f"columns: {', '.join(numeric[:40])}{' ...' if len(numeric) > 40 else ''}")
