"""A sweep spec: a TOML grid of options of ``moesim replay``, ``place`` or ``compare``, checked before any cell runs.

Why here: a study is a grid (traces × topologies × slots × algorithms × policies ...); the spec names the
command, its fixed options and the axes, and every cell's options are parsed by **the command's own parser**
(``add_arguments`` of ``moesim/cli/cmd_<command>.py``) and checked by the command's own input checks, so an
unknown option, a bad value or an unreadable file fails in one line before anything runs.

Format (keys are the command's long options without the dashes; ``-`` or ``_`` both work)::

    command = "replay"                      # replay | place | compare
    [options]                               # the same for every cell
    trace = "ds.mtrace"                     # relative paths are relative to the spec file
    engine = "analytic"
    no-plots = true                         # a flag: true sets it, false leaves it off
    [axes]                                  # the grid is the product of the axes, in this order
    topology = ["dgx-h100:2", "dgx-h100:4"]
    slots-per-gpu = [8, 9]
    case = [{trace = "a.mtrace", topology = "dgx-h100"},   # linked options: a list of tables varies
            {trace = "b.mtrace", topology = "dgx-h100:2"}] # the options of each table together (an option
                                                           # a table leaves out keeps its default; an optional
                                                           # `label = "..."` names the value in the table/plots)
    [[plots]]                               # summary plots of the results table
    kind = "heatmap"                        # heatmap: x × y; line: metric over x, one line per `series`
    x = "slots-per-gpu"
    y = "topology"
    metric = "step_latency_p50_s"           # any numeric column of results.csv

A cell's key is a hash of everything that determines its result: the command, every parsed option, the content
(not the name) of every input file (trace, load, mapping, topology or cost JSON) and moesim's version.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moesim import __version__
from moesim.errors import MoesimError

COMMANDS = ("replay", "place", "compare")
# options whose value may name an input file (by dest): their content enters the cell key
FILE_OPTIONS = ("trace", "load", "mapping", "topology", "cost")
# set by the sweep itself (outputs go to the cell's folder; no terminal output from a cell)
RESERVED = ("out", "sglang", "progress", "quiet")
TOP_KEYS = ("command", "description", "options", "axes", "plots")
PLOT_KINDS = ("heatmap", "line")
MAX_FACETS = 16


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are MoesimErrors (one line) instead of an exit."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise MoesimError(message)


def command_parser(command: str) -> argparse.ArgumentParser:
    """The parser of ``moesim COMMAND`` (its own ``add_arguments``), raising MoesimError on a bad argument."""
    if command not in COMMANDS:
        raise MoesimError(f"command {command!r} cannot be swept; use one of: {', '.join(COMMANDS)}")
    module = importlib.import_module(f"moesim.cli.cmd_{command}")
    p = _Parser(prog=f"moesim {command}", add_help=False)
    module.add_arguments(p)
    return p


@dataclass
class Axis:
    """One axis: its values as written, and for each value the options it sets (one, or several if linked)."""

    name: str
    values: list[Any]
    options: list[dict[str, Any]]  # per value: {option name (dashes): value}
    linked: bool = False
    shown: list[str] = field(default_factory=list)  # a linked value's `label`, if the spec gives one

    def label(self, i: int) -> str:
        if not self.linked:
            return str(self.values[i])
        if self.shown and self.shown[i]:
            return self.shown[i]
        return ", ".join(f"{k}={v}" for k, v in self.options[i].items())


@dataclass
class Plot:
    kind: str
    x: str
    metric: str
    y: str | None = None  # heatmap rows / line series

    @property
    def filename(self) -> str:
        parts = [self.kind, self.metric, self.x] + ([self.y] if self.y else [])
        return "-".join("".join(c if c.isalnum() or c in "._" else "_" for c in p) for p in parts) + ".png"


@dataclass
class Cell:
    index: int  # position in the grid (axes in spec order, last axis fastest)
    axes: dict[str, Any]  # table columns of the axis values (option name -> value as written)
    labels: dict[str, str]  # axis name -> label of its value
    options: dict[str, Any]  # every option of the cell as written (name -> value)
    args: argparse.Namespace  # parsed by the command's parser, file paths resolved
    key: str = ""


@dataclass
class Spec:
    path: Path
    command: str
    description: str
    options: dict[str, Any]
    axes: list[Axis]
    plots: list[Plot]
    cells: list[Cell] = field(default_factory=list)
    text: str = ""

    @property
    def axis_columns(self) -> list[str]:
        cols: list[str] = []
        for ax in self.axes:
            if ax.linked:
                cols.append(ax.name)
            for opt in (dict.fromkeys(k for o in ax.options for k in o) if ax.linked else [ax.name]):
                if opt not in cols:
                    cols.append(opt)
        return cols


def _toml() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ImportError:
        raise MoesimError("reading a sweep spec on Python 3.10 needs tomli: pip install tomli") from None
    return tomli


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; one-line MoesimError if it is missing or malformed."""
    from moesim.io import check_file

    path = check_file(path, "sweep spec")
    try:
        return _toml().loads(path.read_text())
    except UnicodeDecodeError:
        raise MoesimError(f"sweep spec {path} is not a text (TOML) file") from None
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise MoesimError(f"sweep spec {path} is not valid TOML: {exc}") from None


def _norm(name: str) -> str:
    return str(name).strip().replace("_", "-")


def load_spec(path: str | Path) -> Spec:
    """Read, check and expand a spec into its cells (each parsed and keyed); every input checked first."""
    path = Path(path)
    data = read_toml(path)
    text = path.read_text()
    where = path.name
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise MoesimError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(TOP_KEYS)}")
    command = data.get("command")
    if command not in COMMANDS:
        raise MoesimError(f"{where}: command must be one of {', '.join(COMMANDS)}, got {command!r}")
    parser = command_parser(command)
    options = _table(data.get("options", {}), f"{where}: [options]")
    options = {_norm(k): v for k, v in options.items()}
    axes = _axes(_table(data.get("axes", {}), f"{where}: [axes]"), where)
    owner = {k: "options" for k in options}
    for ax in axes:
        for opt in dict.fromkeys(k for o in ax.options for k in o):
            if opt in owner:
                raise MoesimError(f"{where}: option {opt!r} is set by both {owner[opt]} and axes.{ax.name}")
            owner[opt] = f"axes.{ax.name}"
    actions = {a.dest: a for a in parser._actions}
    for opt, src in owner.items():
        values = [options[opt]] if src == "options" else [
            o[opt] for ax in axes if f"axes.{ax.name}" == src for o in ax.options if opt in o]
        for v in values:
            _check_value(parser, actions, command, opt, v, f"{where}: {src}")
    plots = _plots(data.get("plots", []), axes, where)
    spec = Spec(path, command, str(data.get("description", "")), options, axes, plots, text=text)
    spec.cells = _expand(spec, parser)
    check_inputs(spec)
    digests: dict[str, str] = {}
    for cell in spec.cells:
        cell.key = cell_key(command, cell.args, digests)
    return spec


def _table(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise MoesimError(f"{where} must be a table")
    return obj


def _axes(table: dict[str, Any], where: str) -> list[Axis]:
    axes = []
    for name, values in table.items():
        if not isinstance(values, list) or not values:
            raise MoesimError(f"{where}: axes.{name} must be a non-empty list of values, got {values!r}")
        linked = all(isinstance(v, dict) for v in values)
        if not linked and any(isinstance(v, (dict, list)) for v in values):
            raise MoesimError(f"{where}: axes.{name}: values must all be plain values, or all tables "
                              "(linked options)")
        if linked:
            shown = [str(val.get("label", "")) for val in values]  # `label`: how the value is shown, no option
            opts = [{_norm(k): v for k, v in val.items() if k != "label"} for val in values]
            if not all(opts):
                raise MoesimError(f"{where}: axes.{name}: every table of a linked axis must set an option")
            if len({json.dumps(o, sort_keys=True) for o in opts}) != len(opts):
                raise MoesimError(f"{where}: axes.{name} repeats a value")
            if any(_norm(name) in o for o in opts):
                raise MoesimError(f"{where}: axes.{name}: a linked axis must not be named like one of its options")
            axes.append(Axis(_norm(name), values, opts, linked=True, shown=shown))
        else:
            if len({json.dumps(v) for v in values}) != len(values):
                raise MoesimError(f"{where}: axes.{name} repeats a value")
            axes.append(Axis(_norm(name), values, [{_norm(name): v} for v in values]))
    return axes


def _check_value(parser: argparse.ArgumentParser, actions: dict[str, argparse.Action], command: str, opt: str,
                 value: Any, where: str) -> None:
    """One option value against the command's own argument definition (flag, type, choices)."""
    dest = opt.replace("-", "_")
    action = actions.get(dest)
    if action is None or not action.option_strings or dest == "help":
        known = sorted(a.option_strings[-1].lstrip("-") for a in parser._actions
                       if a.option_strings and a.dest not in RESERVED and a.dest != "help")
        raise MoesimError(f"{where}: unknown option {opt!r} for moesim {command}; known: {', '.join(known)}")
    if dest in RESERVED:
        raise MoesimError(f"{where}: option {opt!r} is set by the sweep (each cell writes into its own folder)")
    flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
    if flag:
        if not isinstance(value, bool):
            raise MoesimError(f"{where}: {opt} is a flag: give true or false, not {value!r}")
        return
    if isinstance(value, (bool, dict, list)):
        raise MoesimError(f"{where}: {opt} takes one value (a number or a string), not {value!r}")
    conv = value
    if action.type is not None:
        try:
            conv = action.type(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            tname = getattr(action.type, "__name__", "value")
            raise MoesimError(f"{where}: {opt} = {value!r} is not a valid {tname}") from None
    if action.choices is not None and conv not in action.choices:
        raise MoesimError(f"{where}: {opt} = {value!r} is not one of: {', '.join(map(str, action.choices))}")


def _argv(options: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for k, v in options.items():
        if isinstance(v, bool):
            if v:
                argv.append(f"--{k}")
        else:
            argv.append(f"--{k}={v}")  # one token: a value like "-8:" is not taken for an option
    return argv


def _resolve(args: argparse.Namespace, base: Path) -> None:
    """Input paths relative to the spec's folder; presets (topology names, roofline/fit costs) as they are."""
    def rel(v: str) -> str:
        p = Path(v).expanduser()
        return str(p if p.is_absolute() else (base / p))

    for dest in ("trace", "load", "mapping"):
        if getattr(args, dest, None):
            setattr(args, dest, rel(getattr(args, dest)))
    topo = getattr(args, "topology", None)
    if topo and ((base / topo).exists() or topo.endswith(".json")):
        args.topology = rel(topo)
    cost = getattr(args, "cost", None)
    if cost and cost not in ("roofline", "fit"):
        args.cost = rel(cost)


def _expand(spec: Spec, parser: argparse.ArgumentParser) -> list[Cell]:
    cells = []
    where = spec.path.name
    base = spec.path.resolve().parent
    for index, combo in enumerate(itertools.product(*[range(len(ax.values)) for ax in spec.axes])):
        opts = dict(spec.options)
        cols: dict[str, Any] = {}
        labels: dict[str, str] = {}
        for ax, i in zip(spec.axes, combo):
            opts.update(ax.options[i])
            labels[ax.name] = ax.label(i)
            if ax.linked:
                cols[ax.name] = labels[ax.name]
            cols.update(ax.options[i])
        try:
            args = parser.parse_args(_argv(opts) + ["--out", "."])
        except MoesimError as exc:
            at = ", ".join(f"{k}={v}" for k, v in labels.items())
            raise MoesimError(f"{where}: cell {index}" + (f" ({at})" if at else "") + f": {exc}") from None
        _resolve(args, base)
        cells.append(Cell(index, cols, labels, opts, args))
    return cells


def _plots(items: Any, axes: list[Axis], where: str) -> list[Plot]:
    if not isinstance(items, list) or not all(isinstance(p, dict) for p in items):
        raise MoesimError(f"{where}: plots must be an array of tables ([[plots]])")
    names = [ax.name for ax in axes]
    out = []
    for i, p in enumerate(items):
        at = f"{where}: plots[{i}]"
        unknown = [k for k in p if k not in ("kind", "x", "y", "series", "metric")]
        if unknown:
            raise MoesimError(f"{at}: unknown key(s) {', '.join(unknown)}; known: kind, x, y, series, metric")
        kind = p.get("kind", "heatmap" if "y" in p else "line")
        if kind not in PLOT_KINDS:
            raise MoesimError(f"{at}: kind must be one of {', '.join(PLOT_KINDS)}, got {kind!r}")
        if not isinstance(p.get("metric"), str) or not p["metric"]:
            raise MoesimError(f"{at}: metric (a column of results.csv) is required")
        other = p.get("y") if kind == "heatmap" else p.get("series")
        if kind == "heatmap" and other is None:
            raise MoesimError(f"{at}: a heatmap needs y (an axis)")
        for k, v in (("x", p.get("x")), ("y" if kind == "heatmap" else "series", other)):
            if v is None and k != "series":
                raise MoesimError(f"{at}: {k} (an axis) is required")
            if v is not None and _norm(v) not in names:
                raise MoesimError(f"{at}: {k} = {v!r} is not an axis; axes: {', '.join(names) or '(none)'}")
        x, y = _norm(p["x"]), (_norm(other) if other is not None else None)
        if x == y:
            raise MoesimError(f"{at}: x and {'y' if kind == 'heatmap' else 'series'} must be different axes")
        facets = 1
        for ax in axes:
            if ax.name not in (x, y):
                facets *= len(ax.values)
        if facets > MAX_FACETS:
            raise MoesimError(f"{at}: the other axes make {facets} panels (at most {MAX_FACETS}); plot fewer axes")
        out.append(Plot(kind, x, p["metric"], y))
    return out


# -- checks before any cell runs -----------------------------------------------------------------------------
def check_inputs(spec: Spec) -> None:
    """Run the command's own input checks for every distinct input combination of the grid (one line on error)."""
    done: set[str] = set()
    cache: dict[str, Any] = {}
    for cell in spec.cells:
        sig = json.dumps(sorted((k, str(v)) for k, v in vars(cell.args).items()))
        if sig in done:
            continue
        done.add(sig)
        try:
            CHECKS[spec.command](cell.args, cache)
        except MoesimError as exc:
            at = ", ".join(f"{k}={v}" for k, v in cell.labels.items())
            raise MoesimError(f"{spec.path.name}: cell {cell.index}" + (f" ({at})" if at else "") + f": {exc}") \
                from None


def _topology(spec: str, cache: dict[str, Any]) -> Any:
    from moesim.topo import load_topology

    key = f"topo:{spec}"
    if key not in cache:
        cache[key] = load_topology(spec)
    return cache[key]


def _check_replay(args: argparse.Namespace, cache: dict[str, Any]) -> None:
    from moesim.cli.cmd_replay import prepare

    if args.engine == "des":
        try:
            import moesim.sim.des  # noqa: F401
        except ImportError as exc:
            raise MoesimError(f"the discrete-event engine is not available ({exc})") from None
    if args.rebalance:
        from moesim.placement.rebalance import parse_policy

        parse_policy(args.rebalance)
        from moesim.cli.cmd_place import check_algo

        check_algo(args.rebalance_algo)
        from moesim.cli.cmd_replay import rebalance_kwargs

        rebalance_kwargs(args)
    sig = json.dumps([args.trace, args.topology, args.mapping, args.slots_per_gpu, args.steps, args.cost,
                      args.context_len, args.layout, args.policy])
    if sig in cache:
        return
    prepare(args).trace.close()
    cache[sig] = True


def _check_source(args: argparse.Namespace, cache: dict[str, Any]) -> None:
    """What ``placement.inputs.open_source`` and ``resolve_slots`` check, without summing the trace's load."""
    from moesim.models import get_model
    from moesim.placement.base import read_load
    from moesim.placement.inputs import algo_kwargs, parse_window, resolve_slots

    topo = _topology(args.topology, cache)
    model = get_model(args.model) if args.model else None
    if args.trace:
        from moesim.trace import Trace

        with Trace.open(args.trace) as trace:
            if model is not None and (model.num_layers, model.num_experts) != (trace.model.num_layers,
                                                                              trace.model.num_experts):
                raise MoesimError(f"--model {model.name} does not match the trace's model {trace.model.name}")
            parse_window(args.window, trace.num_steps)
            model = model or trace.model
            E = trace.model.num_experts
    else:
        if args.window:
            raise MoesimError("--window applies to --trace only")
        E = read_load(args.load, model).shape[1]
    resolve_slots(args, E, topo.num_gpus)
    algo_kwargs(args, model)


def _check_place(args: argparse.Namespace, cache: dict[str, Any]) -> None:
    from moesim.cli.cmd_place import check_algo

    check_algo(args.algo)
    _check_source(args, cache)


def _check_compare(args: argparse.Namespace, cache: dict[str, Any]) -> None:
    from moesim.cli.cmd_compare import algo_list
    from moesim.cli.cmd_place import check_algo

    algos = algo_list(args.algos)
    if not algos:
        raise MoesimError("--algos is empty")
    for a in algos:
        check_algo(a)
    if not 0 <= args.holdout < 1:
        raise MoesimError(f"--holdout must be in [0, 1), got {args.holdout}")
    _check_source(args, cache)


CHECKS = {"replay": _check_replay, "place": _check_place, "compare": _check_compare}


# -- cell keys -----------------------------------------------------------------------------------------------
def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (read in 8 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def cell_key(command: str, args: argparse.Namespace, digests: dict[str, str] | None = None) -> str:
    """Hash of a cell's inputs: command, parsed options, input files' content, moesim version (hex, 64)."""
    digests = {} if digests is None else digests
    opts: dict[str, Any] = {}
    for dest, value in sorted(vars(args).items()):
        if dest in RESERVED:
            continue
        if dest in FILE_OPTIONS and isinstance(value, str) and Path(value).is_file():
            if value not in digests:
                digests[value] = file_digest(value)
            value = f"sha256:{digests[value]}"
        opts[dest] = value
    doc = {"moesim": __version__, "command": command, "options": opts}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
