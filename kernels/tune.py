"""Search the fused-MoE launch configuration per token count on a GPU and write kernels/configs/<shape>.json.

    python -m moesim.kernels.tune --shape mixtral-8x7b --tokens 1,16,64,256,1024,4096,16384
    python -m moesim.kernels.tune --shape deepseek-v3 --budget-s 500          # stops searching when the budget is spent
    python -m moesim.kernels.tune --interpret-smoke --out-dir /tmp/cfg  # CPU: tiny shape, proves the script works

For each token count and each candidate BLOCK_M (shared by both GEMMs, since one alignment feeds both), the
gate/up GEMM and the down GEMM (+ the combine that sums its split-K partials) are tuned separately over BLOCK_N,
BLOCK_K, GROUP_M, num_warps, num_stages (and SPLIT_K for the down GEMM): by coordinate descent from the heuristic
(``--space quick``, the default: fits the 10-minute windows of a borrowed GPU) or over the whole grid
(``--space full``); the BLOCK_M with the smallest total wins. Candidates that cannot fit in shared memory or
registers are pruned before compiling.
The winner is checked against the torch reference, then the whole call is timed. Results are merged into any
existing file for the same (E, H, F, device, dtype), written atomically after every token count, so a run cut short
keeps what it finished. This is a plain grid search launched by hand, not ``@triton.autotune`` (which fails
under the interpreter and would re-tune in every process).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

DEFAULT_TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
SMEM_BYTES = 227 * 1024  # Hopper: 227 KB of shared memory per block (H100 tuning guide)


def _fits(bm: int, bn: int, bk: int, warps: int, stages: int, b_tiles: int, elem: int = 2) -> bool:
    """Shared memory for `stages` copies of the A tile and `b_tiles` B tiles, and fp32 accumulators ≤ 128
    registers a thread: beyond either the kernel spills or fails to launch."""
    smem = stages * (bm * bk + b_tiles * bk * bn) * elem
    acc_regs = b_tiles * bm * bn // (32 * warps)
    return smem <= SMEM_BYTES and acc_regs <= 128


def _ok(c, bm: int, gemm: str, k_dim: int, smoke: bool) -> bool:
    if c.SPLIT_K > 1 and (k_dim < c.SPLIT_K * c.BLOCK_K or (bm > 32 and not smoke)):
        # some splits would have nothing to do; or a prefill-sized problem, where the output tiles already fill
        # the GPU and fp32 partials would cost gigabytes (DeepSeek-V3, 16384 tokens, split 8: 30 GB)
        return False
    return smoke or _fits(bm, c.BLOCK_N, c.BLOCK_K, c.num_warps, c.num_stages, 2 if gemm == "w13" else 1)


def search_space(bm: int, gemm: str, space: str, k_dim: int) -> list:
    """The exhaustive candidate grid of one GEMM ("w13" has two B tiles: gate and up) for ``space`` "full" or
    "smoke"; "quick" searches ``AXES`` by coordinate descent instead (see ``descend``)."""
    from moesim.kernels.launch import GemmConfig

    if space == "smoke":
        grid = {"BLOCK_N": [16, 32], "BLOCK_K": [32], "GROUP_M": [1], "num_warps": [4], "num_stages": [2],
                "SPLIT_K": [1, 2] if gemm == "w2" else [1]}
    else:
        grid = {k: v for k, v in AXES.items() if k != "SPLIT_K" or gemm == "w2"}
        if bm <= 32:
            grid["GROUP_M"] = [1]  # decode: one row block per expert, nothing to group
    out = []
    for vals in itertools.product(*grid.values()):
        c = GemmConfig(**dict(zip(grid.keys(), vals)))
        if _ok(c, bm, gemm, k_dim, space == "smoke"):
            out.append(c)
    return out


# Values tried per parameter. "quick" walks them one parameter at a time from the heuristic start (coordinate
# descent, two passes: ~20–40 timings per GEMM instead of the ~500 of the full grid).
AXES = {
    "BLOCK_N": [32, 64, 128, 256],
    "BLOCK_K": [32, 64, 128, 256],
    "num_stages": [2, 3, 4, 5],
    "num_warps": [4, 8],
    "GROUP_M": [1, 8, 16, 32],
    "SPLIT_K": [1, 2, 4, 8],
}


def descend(start, bm: int, gemm: str, k_dim: int, measure, deadline: float, passes: int = 2):
    """Coordinate descent over AXES from ``start``; ``measure(config) -> seconds`` (inf when it fails)."""
    import dataclasses

    seen = {start: measure(start)}
    best = start
    for _ in range(passes):
        improved = False
        for axis, values in AXES.items():
            if axis == "SPLIT_K" and gemm == "w13":
                continue
            for v in values:
                c = dataclasses.replace(best, **{axis: v})
                if c in seen or not _ok(c, bm, gemm, k_dim, False):
                    continue
                if time.monotonic() > deadline:
                    return best, seen[best]
                seen[c] = measure(c)
                if seen[c] < seen[best] * 0.995:  # ignore noise-level wins
                    best, improved = c, True
        if not improved:
            break
    return best, seen[best]


def _start(bm: int, gemm: str, k_dim: int, heuristic):
    """The heuristic's GemmConfig, shrunk (stages, then BLOCK_N) until it fits this BLOCK_M."""
    import dataclasses

    c = getattr(heuristic, gemm)
    while not _ok(c, bm, gemm, k_dim, False):
        if c.num_stages > 2:
            c = dataclasses.replace(c, num_stages=c.num_stages - 1)
        elif c.SPLIT_K > 1:
            c = dataclasses.replace(c, SPLIT_K=c.SPLIT_K // 2)
        elif c.BLOCK_N > 32:
            c = dataclasses.replace(c, BLOCK_N=c.BLOCK_N // 2)
        else:
            break
    return c


def block_m_candidates(tokens: int, top_k: int, experts: int, space: str) -> list[int]:
    from moesim.kernels.launch import heuristic_config

    if space == "smoke":
        return [16, 32]
    base = heuristic_config(tokens, experts, 1, 1, top_k).BLOCK_M
    cands = {base, max(16, base // 2), min(128, base * 2)}
    if space == "full":
        cands |= {16, 32, 64, 128}
    return sorted(cands)


def tune_one(shape, tokens: int, dtype: torch.dtype, device: torch.device, space: str, deadline: float,
             log=print):
    """Best (MoEConfig, seconds of the whole call) for one token count."""
    from moesim.kernels import fused_moe, reference
    from moesim.kernels.calibrate import make_inputs, time_call
    from moesim.kernels.fused import plan, run_combine, run_w2, run_w13
    from moesim.kernels.launch import MoEConfig, heuristic_config

    hidden, w13, w2, tw, ids = make_inputs(shape, tokens, dtype, device, seed=tokens)
    heur = heuristic_config(tokens, shape.num_experts, shape.hidden, shape.ffn, shape.top_k,
                            torch.cuda.get_device_properties(device).multi_processor_count
                            if device.type == "cuda" else 132)
    best = None
    for bm in block_m_candidates(tokens, shape.top_k, shape.num_experts, space):
        base = MoEConfig(bm)
        p = plan(hidden, w13, w2, tw, ids, None, base)
        t_align = time_call(lambda bm=bm: plan(hidden, w13, w2, tw, ids, None, MoEConfig(bm)), device, cpu_reps=1)
        t13, c13 = _search(bm, "w13", space, shape.hidden, heur, lambda c, p=p: run_w13(p, c), device, deadline,
                           log, f"T={tokens} BLOCK_M={bm} w13")
        ys: dict[int, torch.Tensor] = {}

        def w2_and_combine(c, p=p, ys=ys):
            y = ys.get(c.SPLIT_K)
            if y is None:
                y = ys[c.SPLIT_K] = torch.empty(c.SPLIT_K, *p.y.shape[1:], device=device,
                                                dtype=torch.float32 if c.SPLIT_K > 1 else dtype)
            run_w2(p, c, y)
            run_combine(p, y)

        run_w13(p, c13)  # the down GEMM reads a real intermediate
        t2, c2 = _search(bm, "w2", space, shape.ffn, heur, w2_and_combine, device, deadline, log,
                         f"T={tokens} BLOCK_M={bm} w2")
        total = t_align + t13 + t2
        log(f"T={tokens} BLOCK_M={bm}: align {t_align * 1e6:.1f} us + w13 {t13 * 1e6:.1f} us + w2/combine "
            f"{t2 * 1e6:.1f} us = {total * 1e6:.1f} us")
        if best is None or total < best[1]:
            best = (MoEConfig(bm, c13, c2), total)
        del ys
    cfg = best[0]
    got = fused_moe(hidden, w13, w2, tw, ids, impl="triton", config=cfg)
    ref = reference.fused_moe_ref(hidden, w13, w2, tw, ids)
    err = float((got.double() - ref.double()).norm() / ref.double().norm())
    if not err < (2e-2 if dtype == torch.bfloat16 else 5e-3):
        raise RuntimeError(f"tuned config {cfg.to_dict()} is wrong at T={tokens}: relative error {err:.2e}")
    seconds = time_call(lambda: fused_moe(hidden, w13, w2, tw, ids, impl="triton", config=cfg), device)
    return cfg, seconds


def _search(bm: int, gemm: str, space: str, k_dim: int, heur, run, device: torch.device, deadline: float, log,
            what: str):
    """(seconds, GemmConfig) of the best candidate: coordinate descent for "quick", the whole grid otherwise."""
    from moesim.kernels.calibrate import time_call

    def measure(c) -> float:
        try:
            return time_call(lambda: run(c), device, rep_ms=25, cpu_reps=1)
        except Exception as err:  # a candidate the compiler rejects (resources) is skipped, not fatal
            log(f"{what}: skip {c} ({type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''})")
            return float("inf")

    if space == "quick":
        best, t = descend(_start(bm, gemm, k_dim, heur), bm, gemm, k_dim, measure, deadline)
    else:
        best, t = None, float("inf")
        cands = search_space(bm, gemm, space, k_dim)
        for i, c in enumerate(cands):
            if i and time.monotonic() > deadline:
                log(f"{what}: budget spent after {i}/{len(cands)} candidates")
                break
            tc = measure(c)
            if tc < t:
                best, t = c, tc
    if best is None or t == float("inf"):
        raise RuntimeError(f"{what}: no candidate ran")
    return t, best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moesim.kernels.tune", description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="mixtral-8x7b", help="mixtral-8x7b | deepseek-v3 | qwen3-30b-a3b | tiny")
    ap.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)), help="comma-separated token counts")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--space", default="quick", choices=["quick", "full"],
                    help="quick: coordinate descent from the heuristic (minutes); full: the whole grid (hours)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop searching after this many seconds")
    ap.add_argument("--out-dir", default=None, help="default: kernels/configs")
    ap.add_argument("--interpret-smoke", action="store_true",
                    help="no GPU needed: tiny shape, float16, tiny search space, under TRITON_INTERPRET=1")
    args = ap.parse_args(argv)

    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("moesim.kernels.tune: needs a CUDA GPU (none found); use --interpret-smoke to check the script on CPU",
              file=sys.stderr)
        return 2
    from moesim.kernels.calibrate import SHAPES
    from moesim.kernels.launch import CONFIG_DIR, config_filename, device_name, load_table, write_table

    if args.shape not in SHAPES:
        print(f"moesim.kernels.tune: unknown shape {args.shape!r}; known: {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    try:
        tokens = [int(x) for x in args.tokens.split(",") if x.strip()]
        if not tokens or min(tokens) < 1:
            raise ValueError
    except ValueError:
        print(f"moesim.kernels.tune: --tokens must be positive integers, got {args.tokens!r}", file=sys.stderr)
        return 2
    shape = SHAPES["tiny" if args.interpret_smoke else args.shape]
    dtype = torch.float16 if args.interpret_smoke else getattr(torch, args.dtype)
    device = torch.device("cpu" if args.interpret_smoke else "cuda")
    space = "smoke" if args.interpret_smoke else args.space
    out_dir = Path(args.out_dir) if args.out_dir else CONFIG_DIR
    if not out_dir.is_dir():
        print(f"moesim.kernels.tune: output directory {out_dir} does not exist", file=sys.stderr)
        return 2
    dev_name = device_name(device)
    path = out_dir / config_filename(shape.num_experts, shape.hidden, shape.ffn, dev_name, dtype)
    results = {}
    if path.is_file():  # merge: keep entries for token counts this run does not redo
        file_k, table = load_table(path)
        raw = json.loads(path.read_text())["configs"]
        if file_k == shape.top_k:
            results = {m: (cfg, raw[str(m)].get("seconds")) for m, cfg in table.items()}
    deadline = time.monotonic() + args.budget_s
    versions = {"torch": torch.__version__, "triton": __import__("triton").__version__}
    for t in tokens:
        cfg, sec = tune_one(shape, t, dtype, device, space, deadline, log=lambda s: print(s, flush=True))
        results[t] = (cfg, sec)
        write_table(path, device=dev_name, dtype=dtype, num_experts=shape.num_experts, hidden=shape.hidden,
                    ffn=shape.ffn, top_k=shape.top_k, configs=results, tuned_with=versions)
        print(f"T={t}: {cfg.to_dict()}  {sec * 1e6:.1f} us  → {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
