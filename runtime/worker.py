"""The per-rank entry point: ``python -m runtime.worker [options]`` under torchrun (or ``moesim run``).

Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the environment as torchrun sets them;
NCCL when CUDA is used, gloo on CPU. Multi-node: run the same command under torchrun on every node, e.g.

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK --rdzv-backend c10d \
        --rdzv-endpoint $HEAD:29500 -m runtime.worker --preset mixtral-8x7b --mapping m.json --record out/

Each rank owns ``--batch`` sequences (data-parallel attention); step 0 is their prefill, each later step
decodes one token per sequence (random token ids: no tokenizer). Experts are expert-parallel.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moesim.errors import MoesimError
from moesim.replica import ReplicaPolicy
from runtime.config import RunConfig, add_arguments, config_from_args, validate
from runtime.dispatch import make_backend
from runtime.model import StepContext, build_decoder, make_tokens
from runtime.moe_layer import EPMoE, load_store
from runtime.recorder import Recorder, StepTimer
from runtime.remap import RemapError, apply_mapping, expert_checksums
from runtime.weights import weight_source


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the launcher dies, so a killed ``moesim run`` leaves no orphan ranks."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def resolve_device(cfg: RunConfig, local_rank: int) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise MoesimError("--device cuda, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def run(cfg: RunConfig, rank: int, world: int, device: torch.device, *, dump: str | None = None,
        log: bool = True) -> dict[str, Any]:
    """Run the configured steps on this rank (the process group is initialised). Returns run.json's content."""
    spec, mapping, remaps = validate(cfg)
    dtype = resolve_dtype(cfg, device)
    source = weight_source(spec, cfg.checkpoint, cfg.seed)
    backend = make_backend(cfg.backend)
    policy = ReplicaPolicy(cfg.policy, cfg.gpus_per_node)
    moes: list[EPMoE] = []
    impl = None if cfg.kernels == "auto" else cfg.kernels

    def experts(i: int) -> EPMoE:
        store = load_store(source, spec, mapping, i, rank, device, dtype)
        moes.append(EPMoE(spec, i, rank, store, mapping, backend, policy, impl))
        return moes[-1]

    model = build_decoder(spec, source, device, dtype, experts, impl)
    cache = model.new_cache(cfg.batch, cfg.prompt_len + cfg.steps)
    recorder = Recorder(cfg.record, spec, rank, world, cfg.to_dict(), mapping)
    remap_at = dict(remaps)
    dumps: dict[str, Any] = {"logits": {}, "checksums": {}}
    profiler = None
    if cfg.profile:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                        if device.type == "cuda" else [])
        profiler = torch.profiler.profile(activities=acts, record_shapes=False)
        profiler.__enter__()
    parent = os.getppid()
    status = "done"
    try:
        with torch.inference_mode():
            for step in range(cfg.steps):
                if os.getppid() != parent:  # the launcher died
                    status = "launcher died"
                    break
                if step in remap_at:
                    if dump:
                        dumps.setdefault("rows_before", {})[step] = [list(m.store.row_expert) for m in moes]
                    _remap(moes, remap_at[step], step, recorder, rank, log, cfg.remap_transport)
                    if dump:
                        dumps["checksums"][step] = expert_checksums(moes)
                phase = "prefill" if step == 0 else "decode"
                shape = (cfg.batch, cfg.prompt_len) if step == 0 else (cfg.batch, 1)
                tokens = make_tokens(cfg.seed, rank, step, shape, spec.vocab_size).to(device)
                timer = StepTimer(spec.num_layers, mapping.slots_per_gpu, device)
                ctx = StepContext(timer=timer, key_offset=rank * tokens.numel())
                t0 = time.perf_counter()
                logits = model.forward(tokens, cache, ctx)
                timer.finish()
                wall = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
                dist.all_reduce(wall, op=dist.ReduceOp.MAX)
                n_tokens = tokens.numel() * world
                recorder.record_step(step, phase, torch.stack(ctx.routing), torch.stack(ctx.router_weights), timer,
                                     [m.local_experts for m in moes], float(wall.item()), n_tokens)
                if dump:
                    dumps["logits"][step] = logits.cpu()
                if log and rank == 0:
                    sec = float(wall.item())
                    print(f"step {step + 1}/{cfg.steps} {phase:7s} {n_tokens:6d} tokens  {sec * 1e3:8.1f} ms"
                          f"  {n_tokens / sec:10.1f} tokens/s", flush=True)
    except BaseException:
        status = "failed"
        raise
    finally:
        if profiler is not None:
            profiler.__exit__(None, None, None)
            if cfg.record:
                profiler.export_chrome_trace(str(Path(cfg.record) / f"profile-rank{rank}.json"))
        doc = recorder.close(status)
    if dump:
        dumps["checksums"]["final"] = expert_checksums(moes)
        dumps["rows"] = [list(m.store.row_expert) for m in moes]
        dumps["mapping"] = moes[0].mapping.phy2log.tolist()
        torch.save(dumps, Path(dump) / f"rank{rank}.pt")
    if log and rank == 0:
        s = doc["summary"]
        print(f"done: {s['steps']} steps, {s['tokens']} tokens in {s['wall_s']:.3f} s: "
              f"{s['tokens_per_s'] or 0:.1f} tokens/s (decode {s['decode_tokens_per_s'] or 0:.1f} tokens/s)"
              + (f"; recorded in {cfg.record}" if cfg.record else ""), flush=True)
    return doc


def _remap(moes: list[EPMoE], new: Any, step: int, recorder: Recorder, rank: int, log: bool,
           transport: str) -> None:
    try:
        info = apply_mapping(moes, new, transport=transport)
    except RemapError as exc:
        recorder.note_remap(step, None, {"ok": False, "error": str(exc)})
        if log and rank == 0:
            print(f"remap before step {step} FAILED: {exc}", file=sys.stderr, flush=True)
        return
    recorder.note_remap(step, new, info)
    if log and rank == 0:
        print(f"remapped before step {step}: {info['moved_experts']} experts ({info['moved_bytes'] / 2**20:.1f} MiB) "
              f"moved in {info['seconds'] * 1e3:.1f} ms", flush=True)


def spawn_entry(rank: int, world: int, port: int, cfg_dict: dict[str, Any], dump: str | None,
                env: dict[str, str] | None = None) -> None:
    """``torch.multiprocessing.spawn`` target (tests): one rank on 127.0.0.1:port — gloo on CPU, NCCL when the
    config asks for CUDA."""
    os.environ.update(env or {})
    torch.set_num_threads(1)
    cfg = RunConfig.from_dict(cfg_dict)
    device = resolve_device(cfg, rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    try:
        run(cfg, rank, world, device, dump=dump, log=False)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.worker",
                                     description="One rank of a moesim live EP run (start it under torchrun).")
    add_arguments(parser)
    parser.add_argument("--dump", help=argparse.SUPPRESS)  # tests: logits and expert checksums per rank
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per rank (default: torch's)")
    args = parser.parse_args(argv)
    _die_with_parent()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = config_from_args(args, world)
        validate(cfg)
        device = resolve_device(cfg, local_rank)
    except MoesimError as exc:
        if rank == 0:
            print(f"moesim: error: {exc}", file=sys.stderr)
        return 2
    if "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        run(cfg, rank, world, device, dump=args.dump)
    except MoesimError as exc:
        print(f"moesim: error (rank {rank}): {exc}", file=sys.stderr)
        return 2
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
