"""The per-rank entry point: ``python -m moesim.runtime.worker [options]`` under torchrun (or ``moesim run``).

Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the environment as torchrun sets them;
NCCL when CUDA is used, gloo on CPU. Multi-node: run the same command under torchrun on every node, e.g.

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK --rdzv-backend c10d \
        --rdzv-endpoint $HEAD:29500 -m moesim.runtime.worker --preset mixtral-8x7b --mapping m.json --record out/

Each rank owns ``--batch`` sequences (data-parallel attention); step 0 is their prefill, each later step
decodes one token per sequence (random token ids: no tokenizer). Experts are expert-parallel.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from moesim.runtime.config import RunConfig, add_arguments, config_from_args, validate
from moesim.runtime.dispatch import make_backend
from moesim.runtime.graph import Engine, prefill_chunks
from moesim.runtime.model import build_decoder, make_tokens
from moesim.runtime.moe_layer import EPMoE, load_store
from moesim.runtime.recorder import Recorder, StepTimer
from moesim.runtime.remap import RemapError, apply_mapping, expert_checksums
from moesim.runtime.weights import weight_source

from moesim.errors import MoesimError
from moesim.mapping import ExpertMapping
from moesim.replica import ReplicaPolicy


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


def build_rank(cfg: RunConfig, rank: int, world: int, device: torch.device) -> tuple[Engine, list[EPMoE]]:
    """This rank's model (its experts only, expert-parallel layers) inside an :class:`Engine`; not warmed up."""
    spec, mapping, _ = validate(cfg)
    dtype = resolve_dtype(cfg, device)
    source = weight_source(spec, cfg.checkpoint, cfg.seed, device=device)  # drawn on the device: fast start
    backend = make_backend(cfg.backend)
    policy = ReplicaPolicy(cfg.policy, cfg.gpus_per_node)
    moes: list[EPMoE] = []
    impl = None if cfg.kernels == "auto" else cfg.kernels

    def experts(i: int) -> EPMoE:
        store = load_store(source, spec, mapping, i, rank, device, dtype)
        moes.append(EPMoE(spec, i, rank, store, mapping, backend, policy, impl))
        return moes[-1]

    model = build_decoder(spec, source, device, dtype, experts, impl)
    return Engine(model, cfg.batch, cfg.prompt_len + cfg.steps, rank, graphs=cfg.graphs), moes


def run(cfg: RunConfig, rank: int, world: int, device: torch.device, *, dump: str | None = None,
        log: bool = True) -> dict[str, Any]:
    """Run the configured steps on this rank (the process group is initialised). Returns run.json's content."""
    spec, mapping, remaps = validate(cfg)
    engine, moes = build_rank(cfg, rank, world, device)
    chunks = prefill_chunks(cfg.prompt_len, cfg.prefill_chunk)
    recorder = Recorder(cfg.record, spec, rank, world, cfg.to_dict(), mapping)
    remap_at = dict(remaps)
    dumps: dict[str, Any] = {"logits": {}, "checksums": {}}
    parent = os.getppid()
    status = "done"
    # warm-up: every kernel shape compiled and the decode graph captured before step 0; timed on its own
    dist.barrier()
    t0 = time.perf_counter()
    with torch.inference_mode():
        engine.warm_up([n for _, n in chunks])
    dist.barrier()
    warm = _max_over_ranks(time.perf_counter() - t0, device)
    graphed = engine.graph is not None
    recorder.note_warmup(warm, {
        "graphs": graphed, "decode_bucket": engine.bucket, "prefill_chunks": [n for _, n in chunks],
        "phase_timings": (f"prefill chunks and every {cfg.profile_every}-th decode step (from decode step 1), "
                          "run eagerly; replayed steps record their total time only") if graphed
                         else "every step"})
    if log and rank == 0:
        print(f"warm-up {warm:.2f} s (decode bucket {engine.bucket}, "
              f"{'CUDA graph' if graphed else 'eager'} decode)", flush=True)
    profiler = None
    if cfg.profile:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                        if device.type == "cuda" else [])
        profiler = torch.profiler.profile(activities=acts, record_shapes=False)
        profiler.__enter__()
    # A collection pause inside a step stalls every other rank at the next collective: freeze what start-up
    # allocated, collect between steps (outside the timed region) instead of whenever the allocator decides.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        with torch.inference_mode():
            for step in range(cfg.steps):
                if os.getppid() != parent:  # the launcher died
                    status = "launcher died"
                    break
                note: dict[str, Any] = {}
                if cfg.await_mapping is not None and step == cfg.await_mapping[0]:
                    awaited, note["awaited_s"] = _await_mapping(cfg, spec, world, moes[0].mapping.slots_per_gpu,
                                                                recorder, rank, device, log, parent)
                    if awaited is not None:
                        remap_at[step] = awaited
                if step in remap_at:
                    if dump:
                        dumps.setdefault("rows_before", {})[step] = [list(m.store.row_expert) for m in moes]
                    _remap(moes, remap_at[step], step, recorder, rank, log, cfg.remap_transport, note)
                    if dump:
                        dumps["checksums"][step] = expert_checksums(moes)
                if step == 0:
                    prompt = make_tokens(cfg.seed, rank, 0, (cfg.batch, cfg.prompt_len), spec.vocab_size).to(device)
                    outs = []
                    for i, (start, n) in enumerate(chunks):
                        extra = {"chunk": i} if len(chunks) > 1 else {}
                        outs.append(_step(engine, recorder, moes, cfg, step, "prefill", prompt[:, start:start + n],
                                          True, world, chunk_kv_positions(start, n, spec.sliding_window), log,
                                          extra))
                    logits = torch.cat(outs, dim=1)
                else:
                    tokens = make_tokens(cfg.seed, rank, step, (cfg.batch, 1), spec.vocab_size).to(device)
                    timed = not graphed or (step - 1) % cfg.profile_every == 0
                    logits = _step(engine, recorder, moes, cfg, step, "decode", tokens, timed, world,
                                   kv_positions(step, cfg.prompt_len, spec.sliding_window), log,
                                   {"graph": graphed and not timed})
                if dump:
                    dumps["logits"][step] = logits.cpu()
                gc.collect()
    except BaseException:
        status = "failed"
        raise
    finally:
        gc.enable()
        gc.unfreeze()
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


def _max_over_ranks(seconds: float, device: torch.device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _step(engine: Engine, recorder: Recorder, moes: list[EPMoE], cfg: RunConfig, step: int, phase: str,
          tokens: torch.Tensor, timed: bool, world: int, kv_len: float, log: bool,
          extra: dict[str, Any]) -> torch.Tensor:
    """Run and record one prefill chunk or decode step (tokens [B, T]); returns its logits."""
    spec = engine.model.spec
    timer = StepTimer(spec.num_layers, moes[0].mapping.slots_per_gpu, engine.model.device) if timed else None
    # every rank starts the timed step together: rank 0's recording of the previous step is not charged to the
    # others' first collective
    dist.barrier()
    t0 = time.perf_counter()
    if phase == "prefill":
        logits, ids, weights = engine.prefill(tokens, timer)
    else:
        logits, ids, weights = engine.decode(tokens, timer)
        logits = logits[:, None]
    if timer is not None:
        timer.finish()
    elif engine.model.device.type == "cuda":
        torch.cuda.synchronize()
    sec = _max_over_ranks(time.perf_counter() - t0, engine.model.device)
    n_tokens = tokens.numel() * world
    recorder.record_step(step, phase, ids, weights, timer, [m.local_experts for m in moes], sec, n_tokens, kv_len,
                         **extra)
    if log and engine.rank == 0:
        what = phase + (f" {extra['chunk']}" if "chunk" in extra else "")
        print(f"step {step + 1}/{cfg.steps} {what:9s} {n_tokens:6d} tokens  {sec * 1e3:8.1f} ms"
              f"  {n_tokens / sec:10.1f} tokens/s{'' if timed else '  (graph)'}", flush=True)
    return logits


def chunk_kv_positions(start: int, n: int, window: int | None) -> float:
    """KV positions each token of a prefill chunk (positions start .. start+n-1) attends to, mean over them."""
    pos = np.arange(start + 1, start + n + 1, dtype=float)
    return float(np.minimum(pos, window).mean() if window else pos.mean())


def kv_positions(step: int, prompt_len: int, window: int | None) -> float:
    """KV positions each token of ``step`` attends to, mean over its tokens: the prefill's causal mask gives
    query i (0-based) i+1 positions; a decode token sees the prompt and every token decoded so far."""
    if step == 0:
        pos = np.arange(1, prompt_len + 1, dtype=float)
        return float(np.minimum(pos, window).mean() if window else pos.mean())
    n = prompt_len + step
    return float(min(n, window) if window else n)


def _await_mapping(cfg: RunConfig, spec: Any, world: int, slots: int, recorder: Recorder, rank: int,
                   device: torch.device, log: bool, parent: int) -> tuple[ExpertMapping | None, float]:
    """Wait (every rank polls: one node) until ``cfg.await_mapping``'s file exists, then load and check it.

    The ranks agree before anything moves: if any rank timed out or cannot read the mapping, all keep the old
    one and the failure is recorded as a remap that did not take effect."""
    step, path = cfg.await_mapping  # type: ignore[misc]
    recorder.note_awaiting(step, path)
    if log and rank == 0:
        print(f"waiting before step {step} for a mapping in {path}", flush=True)
    t0 = time.monotonic()
    while not Path(path).exists() and time.monotonic() - t0 < cfg.await_timeout_s and os.getppid() == parent:
        time.sleep(0.01)
    waited = time.monotonic() - t0
    new, error = None, ""
    if not Path(path).exists():
        error = f"no mapping appeared in {path} within {cfg.await_timeout_s:g} s"
    else:
        try:
            new = ExpertMapping.load(path, model=spec, num_gpus=world)
            if new.slots_per_gpu != slots:
                raise MoesimError(f"{path}: {new.slots_per_gpu} slots per GPU, but the run has {slots} "
                                  "(fixed for a run)")
        except MoesimError as exc:
            new, error = None, str(exc)
    ok = torch.tensor([0 if new is None else 1], dtype=torch.int64, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    recorder.note_awaiting(None)
    if int(ok.item()) == 1:
        return new, waited
    error = error or "another rank could not read the mapping"
    recorder.note_remap(step, None, {"ok": False, "awaited_s": waited, "error": error})
    if log and rank == 0:
        print(f"no remap before step {step}: {error}", file=sys.stderr, flush=True)
    return None, waited


def _remap(moes: list[EPMoE], new: Any, step: int, recorder: Recorder, rank: int, log: bool,
           transport: str, note: dict[str, Any] | None = None) -> None:
    try:
        info = {**apply_mapping(moes, new, transport=transport), **(note or {})}
    except RemapError as exc:
        recorder.note_remap(step, None, {"ok": False, "error": str(exc), **(note or {})})
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
    parser = argparse.ArgumentParser(prog="python -m moesim.runtime.worker",
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
