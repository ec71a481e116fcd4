"""``moesim trace``: make, inspect, check, import and export routing traces."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from moesim.limits import bounded_int
from moesim.trace.reader import add_allow_truncated

ORDER = 10

IMPORT_FORMATS = ("sglang", "vllm-eplb", "vllm", "megatron", "counts", "parquet", "mixtral-csv", "olmoe", "switch")
EXPORT_FORMATS = ("parquet",)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "trace", help="make, inspect, validate, import and export routing traces (.mtrace)",
        description="Routing traces record, per step and MoE layer, the top-k experts of every token (or, for "
                    "imported statistics, the tokens per expert). Everything else in moesim reads them.")
    tsub = p.add_subparsers(dest="trace_command", metavar="SUBCOMMAND")
    tsub.required = True

    s = tsub.add_parser(
        "synth", help="write a synthetic trace of a model preset",
        description="Synthesise a seeded, reproducible routing trace: skewed per-layer popularity (a different "
                    "hot set per layer), drift over steps, token domains, cross-layer correlation, group-limited "
                    "routing for DeepSeek-style models; prefill steps then decode steps; tokens spread over ranks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--model", required=True, help="model preset or Hugging Face config.json ('list' prints the "
                                                   "presets with their default skew)")
    s.add_argument("--steps", type=bounded_int(1, 10**7), default=16, help="steps to generate")
    s.add_argument("--tokens", "--tokens-per-step", dest="tokens", type=bounded_int(1), default=4096,
                   help="tokens of each prefill step")
    s.add_argument("--decode-tokens", type=bounded_int(1), help="tokens per decode step (default: same as --tokens)")
    s.add_argument("--prefill-steps", type=int, default=1, help="prefill steps before the decode steps")
    s.add_argument("--routing", choices=("model", "uniform"), default="model",
                   help="model: skewed, drifting, domain- and layer-correlated routing (the knobs below); uniform: "
                        "every expert equally likely (group limits kept)")
    s.add_argument("--skew", type=float, help="popularity skew: 0 uniform, ~0.3 Mixtral-like, ~1 DeepSeek/Qwen3-like "
                                              "(default: the preset's calibrated value)")
    s.add_argument("--drift", type=float, default=0.02, help="fraction of the popularity renewed per step")
    s.add_argument("--layer-corr", type=float, default=1.0, help="cross-layer correlation strength (0: none)")
    s.add_argument("--ranks", type=bounded_int(1, 65535), default=8,
                   help="origin (attention) ranks the tokens are spread over")
    s.add_argument("--seed", type=bounded_int(0, 2**63 - 1), default=0)
    s.add_argument("--no-weights", action="store_true", help="omit router weights (smaller file)")
    s.add_argument("--out", help="output trace file (.mtrace); required unless --model list")
    s.set_defaults(func=_synth)

    for name, aliases in (("show", ["info"]),):
        sh = tsub.add_parser(
            name, aliases=aliases, help="summarise a trace: shape, steps, tokens, per-layer load imbalance",
            description="Print a trace's header, size and per-layer load statistics: busiest/mean expert load over "
                        "the window and per step, normalised entropy, idle experts, hottest experts, drift between "
                        "windows and (token traces) cross-layer correlation.")
        sh.add_argument("trace", help="trace file")
        add_allow_truncated(sh)
        sh.add_argument("--json", action="store_true", help="print JSON instead of a table")
        sh.add_argument("--full", action="store_true", help="with --json: include the [layers, experts] load")
        sh.add_argument("--start", type=int, default=0, help="first step of the window")
        sh.add_argument("--stop", type=int, help="step after the window's last (default: the end)")
        sh.set_defaults(func=_show)

    v = tsub.add_parser("validate", help="check a trace's checksums and contents",
                        description="Read every chunk, verify checksums, shapes and id ranges. Exit 0 when sound; "
                                    "otherwise one line naming every problem found, exit 2.")
    v.add_argument("trace", help="trace file")
    v.set_defaults(func=_validate)

    im = tsub.add_parser(
        "import", help="convert routing statistics from SGLang, vLLM, Megatron-Core or published data sets",
        description="Formats: sglang (expert-distribution recorder dump: stat / per_pass / per_token, .pt or .json; "
                    "several per-rank files may be given), vllm-eplb (alias vllm: expert_load_window + "
                    "physical_to_logical_map, .pt/.json/.npz, or a bare .npy with --mapping), megatron "
                    "(Megatron-Core's --moe-routing-trace-path directory or its router_trace_rank*.jsonl files; all "
                    "ranks merged; --select mtp for the MTP heads), counts (a [layers, experts] or [steps, "
                    "layers, experts] table: .json/.csv/.npy), parquet (from 'trace export'), mixtral-csv, olmoe, "
                    "switch (the real statistics in shared/data/routing). Token-level inputs give token traces; "
                    "the rest give load-only traces.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    im.add_argument("--format", required=True, choices=IMPORT_FORMATS)
    im.add_argument("files", nargs="+", metavar="FILE", help="input file(s) (megatron: or the trace directory)")
    im.add_argument("--model", help="model preset the data belongs to (default: inferred where the format says)")
    im.add_argument("--mapping", help="phy2log for physical-expert counts (moesim or SGLang mapping JSON)")
    im.add_argument("--select", help="olmoe: which entry, e.g. 'olmoe/expert_counts/arxiv' (default: the first "
                                     "'<model>/expert_counts/*' entry); megatron: 'decoder' (default), 'mtp' or "
                                     "'mtp:I' (one MTP head)")
    im.add_argument("--buffer-start", type=int, help="sglang stat dump with a full circular buffer: the row of "
                                                     "the oldest pass (passes recorded modulo the buffer size)")
    im.add_argument("--out", required=True, help="output trace file (.mtrace)")
    im.set_defaults(func=_import)

    ex = tsub.add_parser(
        "export", help="write a trace as a Parquet table (polars, DuckDB, pandas open it)",
        description="Parquet: token traces one row per (step, layer, token) with columns step, layer, token, "
                    "expert_ids (list), weights (list), origin, phase, kv_len; load-only traces one row per (step, "
                    "layer, expert) with count. 'moesim trace import --format parquet' reads it back. Needs pyarrow "
                    "(pip install 'moesim[parquet]').")
    ex.add_argument("trace", help="trace file")
    ex.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    ex.add_argument("--out", required=True, help="output file (.parquet)")
    ex.add_argument("--start", type=int, default=0, help="first step of the window")
    ex.add_argument("--stop", type=int, help="step after the window's last (default: the end)")
    ex.set_defaults(func=_export)

    ld = tsub.add_parser(
        "load", help="export the [layers, experts] load of a trace (for placement)",
        description="Sum token-choices per logical expert over a window of steps and write them as JSON "
                    "({format: moesim.load, load: [[...]]}), CSV (one row per layer) or .npy.")
    ld.add_argument("trace", help="trace file")
    ld.add_argument("--out", required=True, help="output file: .json, .csv or .npy")
    add_allow_truncated(ld)
    ld.add_argument("--start", type=int, default=0, help="first step of the window")
    ld.add_argument("--stop", type=int, help="step after the window's last (default: the end)")
    ld.add_argument("--per-step", action="store_true", help=".npy/.json: keep steps, [steps, layers, experts]")
    ld.set_defaults(func=_load)


# -- handlers -----------------------------------------------------------------------------------------
def _model(name: str) -> Any:
    from moesim.errors import MoesimError
    from moesim.models import PRESETS, get_model

    if name == "list":
        raise MoesimError(f"'list' is not a model; the presets are {', '.join(PRESETS)}")
    return get_model(name)


def _window(trace: Any, start: int, stop: int | None) -> tuple[int, int]:
    from moesim.errors import MoesimError

    stop = trace.num_steps if stop is None else stop
    if start < 0 or stop > trace.num_steps or start >= stop:
        raise MoesimError(f"step window [{start}, {stop}) is empty or outside the trace's {trace.num_steps} steps")
    return start, stop


def _synth(args: argparse.Namespace) -> int:
    from moesim.trace.synth import SynthConfig, routing_defaults, synthesize

    if args.model == "list":
        from moesim.models import PRESETS

        print(f"{'preset':18} {'layers':>6} {'experts':>7} {'top-k':>5} {'groups':>6} {'skew':>5}")
        for m in PRESETS.values():
            groups = f"{m.topk_groups}/{m.num_groups}" if m.num_groups > 1 else "-"
            print(f"{m.name:18} {m.num_layers:>6} {m.num_experts:>7} {m.top_k:>5} {groups:>6} "
                  f"{routing_defaults(m)[0]:>5.2f}")
        return 0
    from moesim.errors import MoesimError

    if not args.out:
        raise MoesimError("trace synth needs --out FILE.mtrace (only --model list runs without it)")
    model = _model(args.model)
    if args.routing == "uniform" and args.skew:
        raise MoesimError("--routing uniform has no skew; drop --skew")
    _check_synth_request(args, model)
    cfg = SynthConfig(steps=args.steps, tokens=args.tokens, decode_tokens=args.decode_tokens,
                      prefill_steps=args.prefill_steps, skew=args.skew, drift=args.drift,
                      layer_corr=args.layer_corr, num_ranks=args.ranks, seed=args.seed, weights=not args.no_weights,
                      routing=args.routing)
    t0 = time.perf_counter()
    tty = sys.stderr.isatty()

    def progress(i: int, n: int) -> None:
        if tty:
            print(f"\r  step {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)

    path = synthesize(model, cfg, args.out, progress=progress)
    size = path.stat().st_size
    print(f"wrote {path}: {model.name}, {cfg.steps} steps, {_human(size)} in {time.perf_counter() - t0:.1f} s")
    return 0


def _check_synth_request(args: argparse.Namespace, model: Any) -> None:
    """One line before anything is allocated: an empty --out, or a step too big for the memory budget."""
    from moesim.errors import MoesimError
    from moesim.limits import check_memory

    if not str(args.out).strip():
        raise MoesimError("--out is empty; give the output trace file (.mtrace)")
    tokens = max(args.tokens, args.decode_tokens or 0)
    # one step's ids (uint16) and weights (float16) as generated, again in the writer's buffer, plus the chunks in
    # flight (numpy path: ~16 float64 [chunk, experts] temporaries per worker, moesim.trace.synth.CHUNK_TOKENS)
    from moesim.trace.synth import CHUNK_TOKENS

    per_step = tokens * model.num_layers * model.top_k * 4 * 2
    check_memory(per_step + 8 * 16 * min(tokens, CHUNK_TOKENS) * model.num_experts * 8, f"--tokens {tokens}")


def _show(args: argparse.Namespace) -> int:
    import json

    from moesim.trace import open_trace
    from moesim.trace.stats import jsonable, trace_stats

    with open_trace(args.trace, args) as trace:
        start, stop = _window(trace, args.start, args.stop)
        stats = trace_stats(trace, start, stop)
        if args.json:
            out = {"path": str(trace.path), "bytes": trace.nbytes, "format_version": trace.header["version"],
                   "chunks": trace.num_chunks, "total_steps": trace.num_steps, "has_weights": trace.has_weights,
                   "has_origin": trace.has_origin, "num_ranks": trace.num_ranks,
                   "model_spec": trace.model.to_dict(), "meta": trace.meta, **jsonable(stats, full=args.full)}
            print(json.dumps(out, indent=2))
            return 0
        print(format_stats(trace, stats))
    return 0


def format_stats(trace: Any, stats: dict[str, Any]) -> str:
    """The terminal summary of ``moesim trace show``."""
    m = trace.model
    lines = [f"trace      {trace.path} ({_human(trace.nbytes)}, format v{trace.header['version']}, "
             f"{trace.num_chunks} chunks, {trace.kind})",
             f"model      {m.name}: {m.num_layers} MoE layers x {m.num_experts} experts, top-{m.top_k}, "
             f"hidden {m.hidden_size}, expert FFN {m.ffn_size}"]
    tps = stats["tokens_per_step"]
    phases = ", ".join(f"{v} {k}" for k, v in stats["phases"].items())
    lines.append(f"steps      {stats['steps']} of {trace.num_steps} (window {stats['start']}..{stats['stop'] - 1}; "
                 f"{phases})")
    lines.append(f"tokens     {stats['tokens']:,} ({tps['min']:,}..{tps['max']:,} per step, mean {tps['mean']:,.0f})")
    extras = []
    if trace.has_weights:
        extras.append("router weights")
    if trace.has_origin:
        extras.append(f"origin ranks ({trace.num_ranks})")
    if len(trace.timings()):
        extras.append(f"{len(trace.timings())} timing records")
    if extras:
        lines.append(f"records    {', '.join(extras)}")
    source = trace.meta.get("source")
    if source:
        lines.append(f"source     {source}")
    note = trace.meta.get("note")
    if note:
        lines.append(f"note       {note}")
    lines.append(f"truncated  {trace.truncated or 'no'}")
    imb, step_imb = stats["imbalance"], stats["step_imbalance"]
    lines.append(f"imbalance  busiest/mean expert load: min {imb.min():.2f}, median {float(_median(imb)):.2f}, "
                 f"max {imb.max():.2f} (per step, mean over steps: {step_imb.mean():.2f})")
    drift = stats.get("drift") or {}
    if drift.get("tv"):
        lines.append(f"drift      load-share change between {drift['windows']} windows (TV distance): "
                     f"{drift['tv_mean']:.3f}; hot-set overlap {min(drift['hot_overlap']):.2f}..."
                     f"{max(drift['hot_overlap']):.2f}")
    if "cross_layer_nmi" in stats and len(stats["cross_layer_nmi"]):
        lines.append(f"cross-layer  normalised mutual information of consecutive layers' experts: "
                     f"mean {stats['cross_layer_nmi'].mean():.3f}")
    layer_names = trace.meta.get("layers")
    lines.append("")
    lines.append(f"{'layer':>5} {'busiest/mean':>12} {'per step':>9} {'entropy':>8} {'idle':>5}  hottest experts "
                 f"(share of load)")
    for layer in range(m.num_layers):
        hot = ", ".join(f"{e}:{100 * s:.1f}%" for e, s in zip(stats["hot_experts"][layer][:4],
                                                              stats["hot_share"][layer][:4]))
        label = str(layer_names[layer]) if isinstance(layer_names, list) and layer < len(layer_names) else str(layer)
        lines.append(f"{label:>5} {imb[layer]:>12.2f} {step_imb[layer]:>9.2f} {stats['entropy'][layer]:>8.3f} "
                     f"{int(stats['idle'][layer]):>5}  {hot}")
    return "\n".join(lines)


def _median(x: Any) -> float:
    import numpy as np

    return float(np.median(x))


def _validate(args: argparse.Namespace) -> int:
    from moesim.errors import TraceError
    from moesim.trace import Trace

    with Trace.open(args.trace, require_steps=False, allow_truncated=True) as trace:
        problems = trace.validate()
        if trace.num_steps == 0 and not problems:
            problems = ["the trace holds no complete step"]
        if problems:  # one line, exit 2, as for every bad input; all problems are named on it
            more = f" ({len(problems)} problems)" if len(problems) > 1 else ""
            raise TraceError(f"{args.trace} is not a valid trace{more}: " + "; ".join(problems))
        print(f"{args.trace}: valid ({trace.kind}, {trace.model.name}, {trace.num_steps} steps, "
              f"{trace.num_tokens:,} tokens, {trace.num_chunks} chunks)")
    return 0


def _import(args: argparse.Namespace) -> int:
    from moesim.trace.importers import import_trace

    model = _model(args.model) if args.model else None
    t0 = time.perf_counter()
    path, info = import_trace(args.format, [Path(f) for f in args.files], args.out, model=model,
                              mapping=args.mapping, select=args.select, buffer_start=args.buffer_start)
    print(f"wrote {path}: {info['kind']} trace of {info['model']}, {info['steps']} steps, {info['tokens']:,} tokens "
          f"({time.perf_counter() - t0:.1f} s)")
    for note in info.get("notes", []):
        print(f"  note: {note}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from moesim.trace import Trace
    from moesim.trace.parquet import export_parquet

    with Trace.open(args.trace) as trace:
        start, stop = _window(trace, args.start, args.stop)
        info = export_parquet(trace, args.out, start, stop)
        kind = trace.kind
    print(f"wrote {args.out}: {info['rows']:,} rows ({kind} trace, steps {start}..{stop - 1})")
    return 0


def _load(args: argparse.Namespace) -> int:
    import numpy as np

    from moesim.errors import MoesimError
    from moesim.io import atomic_path, atomic_write_text, write_json
    from moesim.trace import open_trace

    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in (".json", ".csv", ".npy"):
        raise MoesimError(f"--out must end in .json, .csv or .npy, got {out.name!r}")
    if args.per_step and suffix == ".csv":
        raise MoesimError("--per-step needs a .json or .npy output (CSV holds one [layers, experts] table)")
    with open_trace(args.trace, args) as trace:
        start, stop = _window(trace, args.start, args.stop)
        per_step = trace.load(start, stop)
        load = per_step if args.per_step else per_step.sum(axis=0)
        model = trace.model
    if suffix == ".npy":
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, load, allow_pickle=False)
    elif suffix == ".csv":
        atomic_write_text(out, "\n".join(",".join(str(int(v)) for v in row) for row in load) + "\n")
    else:
        write_json(out, {"format": "moesim.load", "version": 1, "model": model.name, "layers": model.num_layers,
                         "experts": model.num_experts, "top_k": model.top_k, "steps": [start, stop],
                         "per_step": bool(args.per_step), "load": load.tolist()})
    shape = "x".join(str(s) for s in load.shape)
    print(f"wrote {out}: load [{shape}] of steps {start}..{stop - 1}, {int(load.sum()):,} token-choices")
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
