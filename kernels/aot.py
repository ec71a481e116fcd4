"""Compile the fused-MoE kernels for a GPU architecture *without a GPU* and report their resources.

    python -m moesim.kernels.aot --shape mixtral-8x7b --tokens 1,64,4096,16384          # table for sm_90 (Hopper)
    python -m moesim.kernels.aot --shape deepseek-v3 --check                             # exit 1 on spills / overflow

Triton ships ptxas, so the whole pipeline (TTIR → TTGIR → PTX → cubin) runs on a CPU-only machine when the target is
named explicitly. The report reads what the interpreter cannot show: registers per thread, bytes spilled to the
stack, shared memory, whether the tensor-core path is Hopper's warpgroup MMA (wgmma) and whether the K loop is
software-pipelined (cp.async or TMA copies). Arguments are meta tensors (shape, dtype and strides, no memory), so
DeepSeek-V3's 22 GB of expert weights cost nothing. Specialisation mimics the JIT's: pointers and integers divisible
by 16 are marked so, integers equal to 1 become constants.
Must run without TRITON_INTERPRET=1 (the kernels must be real JIT functions); ``main`` pins TRITON_INTERPRET=0 before
importing them, and the tests call it in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
           torch.int64: "i64"}


@dataclass
class KernelReport:
    name: str
    regs: int
    spill_bytes: int
    smem: int
    wgmma: bool
    pipelined: bool

    @property
    def ok(self) -> bool:
        return self.spill_bytes == 0 and self.smem <= SMEM_LIMIT


def _signature(fn: Any, args: tuple, meta: dict) -> tuple[dict, dict, dict, dict]:
    names = list(fn.arg_names)
    opts = {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}
    sig, constexprs, attrs = {}, {}, {}
    values = dict(zip(names, args))
    values.update({k: v for k, v in meta.items() if k not in opts})
    for i, name in enumerate(names):
        v = values[name]
        if fn.params[i].is_constexpr:
            sig[name], constexprs[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _DTYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name], constexprs[(i,)] = "constexpr", 1
                continue
            sig[name] = "i64" if abs(v) >= 2**31 else "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot type {type(v).__name__} for an offline compile")
    return sig, constexprs, attrs, opts


def compile_report(fn: Any, args: tuple, meta: dict, arch: int = 90) -> KernelReport:
    """Compile one launch for sm_<arch> and read its resource usage from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget

    sig, constexprs, attrs, opts = _signature(fn, args, meta)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(kernel.asm["cubin"])
        fh.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", fh.name], capture_output=True, text=True,
                               check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    ttgir = kernel.asm["ttgir"]
    return KernelReport(fn.__name__, regs, stack, int(kernel.metadata.shared), "warp_group_dot " in ttgir,
                        "async_copy_global_to_local" in ttgir or "async_tma_copy" in ttgir)


def fused_reports(shape: Any, tokens: int, cfg: Any, dtype: torch.dtype, arch: int = 90) -> list[KernelReport]:
    """Reports of the three fused-MoE kernels for one (shape, tokens, config), built on meta tensors."""
    from moesim.kernels import fused
    from moesim.kernels.reference import max_padded_slots

    e, h, f, k = shape.num_experts, shape.hidden, shape.ffn, shape.top_k
    meta = torch.device("meta")
    padded = max_padded_slots(tokens * k, e, cfg.BLOCK_M)
    p = fused.plan_buffers(
        torch.empty(tokens, h, dtype=dtype, device=meta), torch.empty(e, 2 * f, h, dtype=dtype, device=meta),
        torch.empty(e, h, f, dtype=dtype, device=meta), torch.empty(tokens, k, device=meta),
        torch.empty(tokens, k, dtype=torch.int64, device=meta), None, cfg,
        torch.empty(padded, dtype=torch.int32, device=meta),
        torch.empty(padded // cfg.BLOCK_M, dtype=torch.int32, device=meta),
        torch.empty(1, dtype=torch.int32, device=meta))
    out = []
    for fn, (_, args, kw) in ((fused._w13_kernel, fused.w13_launch(p, cfg.w13)),
                              (fused._w2_kernel, fused.w2_launch(p, cfg.w2, p.y)),
                              (fused._combine_kernel, fused.combine_launch(p, p.y, interpret=False))):
        out.append(compile_report(fn, args, kw, arch))
    return out


def router_align_reports(arch: int = 90, tokens: int = 4096) -> list[KernelReport]:
    """Reports of the router and alignment kernels at DeepSeek-V3 / Mixtral router sizes (E=256 and E=8)."""
    from moesim.kernels import align, router
    from moesim.kernels._util import next_pow2
    from moesim.kernels.reference import max_padded_slots

    meta = torch.device("meta")
    t = tokens
    reps = []
    for e, k in ((8, 2), (256, 8)):
        logits = torch.empty(t, e, dtype=torch.bfloat16, device=meta)
        w = torch.empty(t, k, device=meta)
        ids = torch.empty(t, k, dtype=torch.int64, device=meta)
        block_e, block_t, _ = router._launch_shape(t, e)
        reps.append(compile_report(router._topk_softmax_kernel, (logits, w, ids, t, e, e), dict(
            K=k, BLOCK_K=next_pow2(k), BLOCK_T=block_t, BLOCK_E=block_e, RENORM=True, num_warps=4), arch))
        groups = 8 if e == 256 else 1
        reps.append(compile_report(router._grouped_topk_kernel, (
            logits, torch.empty(e, device=meta), w, ids, t, e, e, 2.5), dict(
            K=k, BLOCK_K=next_pow2(k), BLOCK_T=block_t, BLOCK_E=block_e, GROUPS=groups, BLOCK_G=next_pow2(groups),
            GROUP_SIZE=e // groups, KEEP_GROUPS=max(1, groups // 2), HAS_BIAS=True, TOP2=e // groups >= 2,
            RENORM=True, num_warps=4), arch))
        emap = torch.empty(e, dtype=torch.int32, device=meta)
        chunk = align._CHUNK_GPU
        counts = torch.empty(t * k // chunk, e, dtype=torch.int32, device=meta)
        reps.append(compile_report(align._count_kernel, (ids, emap, counts, t * k), dict(
            NUM_E=e, BINS=next_pow2(e + 1), CHUNK=chunk, HAS_MAP=True), arch))
        bm = 16
        padded = max_padded_slots(t * k, e, bm)
        i32 = lambda *shape: torch.empty(*shape, dtype=torch.int32, device=meta)  # noqa: E731
        nchunks, block_e = t * k // chunk, next_pow2(e + 1)
        reps.append(compile_report(align._finalize_kernel, (
            counts, i32(nchunks, e), i32(padded // bm), i32(1), i32(padded), nchunks, padded // bm, padded, t * k),
            dict(NUM_E=e, BLOCK_E=block_e, BLOCK_M=bm, ROWS=align._finalize_rows(block_e), FILL=1024, num_warps=8),
            arch))
        reps.append(compile_report(align._scatter_kernel, (ids, emap, counts, torch.empty(
            t * k, dtype=torch.int32, device=meta), t * k), dict(NUM_E=e, CHUNK=chunk, HAS_MAP=True), arch))
    return reps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moesim.kernels.aot", description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="mixtral-8x7b")
    ap.add_argument("--tokens", default="1,16,64,256,4096,16384")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    ap.add_argument("--device-name", default="NVIDIA H100 80GB HBM3",
                    help="device whose tuned config file (if any) to check; else the heuristic")
    ap.add_argument("--check", action="store_true", help="exit 1 when a kernel spills or overflows shared memory")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("moesim.kernels.aot: unset TRITON_INTERPRET to compile for a GPU target", file=sys.stderr)
        return 2
    os.environ["TRITON_INTERPRET"] = "0"  # keep moesim.kernels._util.interpret_without_gpu from switching it on
    from moesim.kernels.calibrate import SHAPES
    from moesim.kernels.launch import CONFIG_DIR, config_filename, heuristic_config, load_table

    if args.shape not in SHAPES:
        print(f"moesim.kernels.aot: unknown shape {args.shape!r}; known: {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    shape, dtype = SHAPES[args.shape], getattr(torch, args.dtype)
    path = CONFIG_DIR / config_filename(shape.num_experts, shape.hidden, shape.ffn, args.device_name, dtype)
    table = load_table(path)[1] if path.is_file() else None
    bad = 0
    print(f"{'tokens':>7} {'config':<8} {'kernel':<16} {'regs':>5} {'spill B':>8} {'smem KB':>8} {'wgmma':>6} "
          f"{'pipelined':>9}")
    for t in [int(x) for x in args.tokens.split(",")]:
        if table:
            cfg, src = table[min(table, key=lambda m: abs(m - t))], "tuned"
        else:
            cfg, src = heuristic_config(t, shape.num_experts, shape.hidden, shape.ffn, shape.top_k), "heur."
        for r in fused_reports(shape, t, cfg, dtype, args.arch):
            bad += not r.ok
            print(f"{t:>7} {src:<8} {r.name:<16} {r.regs:>5} {r.spill_bytes:>8} {r.smem / 1024:>8.1f} "
                  f"{'yes' if r.wgmma else 'no':>6} {'yes' if r.pipelined else 'no':>9}{'' if r.ok else '  <-- FAIL'}")
    print("router and alignment kernels (T=4096; E=8 top-2 and E=256 top-8):")
    for r in router_align_reports(args.arch):
        bad += not r.ok
        print(f"{'':>7} {'':<8} {r.name:<22} {r.regs:>5} {r.spill_bytes:>8} {r.smem / 1024:>8.1f}"
              f"{'' if r.ok else '  <-- FAIL'}")
    if args.check and bad:
        print(f"moesim.kernels.aot: {bad} kernel(s) spill registers or exceed {SMEM_LIMIT // 1024} KB shared memory",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
