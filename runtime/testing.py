"""Checking the runtime: spawn gloo ranks on this machine and compare them with the single-process reference.

Used by tests/runtime and handy when changing a backend: ``spawn_run`` + ``assert_matches_reference``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from moesim.runtime.config import RunConfig
from moesim.runtime.model import build_decoder, make_tokens
from moesim.runtime.weights import SeededWeights

from moesim.mapping import ExpertMapping
from moesim.models import get_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_run(cfg: RunConfig, dump: Path, env: dict[str, str] | None = None, timeout: float = 120,
              entry: Callable[..., None] | None = None) -> list[dict]:
    """Run ``cfg`` on cfg.nproc gloo ranks (torch.multiprocessing, spawn); return each rank's dump. ``entry``
    (default: the worker's ``spawn_entry``) is called as entry(rank, world, port, cfg_dict, dump, env)."""
    import torch.multiprocessing as mp
    from moesim.runtime.worker import spawn_entry

    dump.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(entry or spawn_entry, args=(cfg.nproc, free_port(), cfg.to_dict(), str(dump), env),
                             nprocs=cfg.nproc, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"EP run did not finish in {timeout} s")
    return [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(cfg.nproc)]


def reference_logits(cfg: RunConfig, rank: int) -> list[torch.Tensor]:
    """The single-process model (every expert local, no collectives) on the inputs rank ``rank`` fed."""
    torch.set_num_threads(1)
    spec = get_model(cfg.preset)
    model = build_decoder(spec, SeededWeights(spec, cfg.seed), "cpu", torch.float32)
    cache = model.new_cache(cfg.batch, cfg.prompt_len + cfg.steps)
    out = []
    with torch.inference_mode():
        for step in range(cfg.steps):
            shape = (cfg.batch, cfg.prompt_len) if step == 0 else (cfg.batch, 1)
            out.append(model.forward(make_tokens(cfg.seed, rank, step, shape, spec.vocab_size), cache))
    return out


def assert_matches_reference(cfg: RunConfig, dumps: list[dict], rtol: float = 1e-5) -> None:
    for rank, d in enumerate(dumps):
        for step, ref in enumerate(reference_logits(cfg, rank)):
            got = d["logits"][step]
            rel = float((got - ref).norm() / ref.norm())
            assert rel <= rtol, f"rank {rank} step {step}: relative error {rel:.2e} > {rtol:.0e}"
            assert float((got - ref).abs().max()) <= rtol * float(ref.abs().max()) * 10


def random_mapping(rng: np.random.Generator, layers: int, experts: int, gpus: int, extra: int) -> ExpertMapping:
    """Every expert at least once, ``extra`` slots per GPU beyond E/G hold random replicas, shuffled."""
    slots = -(-experts // gpus) * gpus + extra * gpus
    rows = [rng.permutation(np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)]))
            for _ in range(layers)]
    return ExpertMapping(np.stack(rows), gpus, experts)


def small_config(**kw: object) -> RunConfig:
    """A run small enough for tests: tiny model, 2 ranks, 3 steps, 2 sequences of 5 prompt tokens per rank."""
    base: dict[str, object] = {"preset": "tiny", "nproc": 2, "steps": 3, "batch": 2, "prompt_len": 5}
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


# -- proving that a step never asks the host ------------------------------------------------------------------

class HostSyncError(AssertionError):
    """Raised by :func:`forbid_host_sync` when code inside it reads device data on the host (an AssertionError, so
    no `except RuntimeError` fallback swallows it)."""


# Everything that copies device data to the host or sizes an output by data (a hidden synchronisation on CUDA)
HOST_SYNCS: list[tuple[Any, str]] = [
    (torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch.Tensor, "cpu"), (torch.Tensor, "numpy"),
    (torch.Tensor, "nonzero"), (torch, "nonzero"), (torch.Tensor, "bincount"), (torch, "bincount"),
    (torch.Tensor, "unique"), (torch, "unique"), (torch.Tensor, "masked_select"), (torch, "masked_select"),
    (torch.Tensor, "repeat_interleave"), (torch, "repeat_interleave"), (torch, "argwhere"),
    (torch.Tensor, "__bool__"), (torch.Tensor, "__int__"), (torch.Tensor, "__float__"), (torch.Tensor, "__index__"),
]


@contextlib.contextmanager
def forbid_host_sync() -> Iterator[None]:
    """Make every function of :data:`HOST_SYNCS` raise :class:`HostSyncError` inside the block."""
    saved = [(owner, name, name in vars(owner), vars(owner).get(name)) for owner, name in HOST_SYNCS]

    def boom(what: str) -> Callable[..., Any]:
        def raiser(*args: Any, **kwargs: Any) -> Any:
            raise HostSyncError(f"{what} asks the host inside a step")
        return raiser

    for owner, name in HOST_SYNCS:
        setattr(owner, name, boom(f"{getattr(owner, '__name__', owner)}.{name}"))
    try:
        yield
    finally:
        for owner, name, had, value in saved:
            if had:
                setattr(owner, name, value)
            else:
                delattr(owner, name)


def dense_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None, impl: str | None = None) -> torch.Tensor:
    """``kernels.fused_moe``'s contract computed densely (every local expert on every row, weights masked): no host
    read, so a CPU test can forbid host syncs around a whole step. The torch reference kernel sizes its per-expert
    groups on the host; on CUDA the Triton kernel does not (the GPU tests check it under sync debug mode).
    hidden [T, H] → [T, H]."""
    local = expert_map[topk_ids] if expert_map is not None else topk_ids  # [T, k]
    f = w13.shape[1] // 2
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for e in range(w13.shape[0]):
        w = (topk_weights.float() * (local == e)).sum(dim=1)  # [T]
        gate_up = hidden @ w13[e].t()
        act = (torch.nn.functional.silu(gate_up[:, :f].float()) * gate_up[:, f:].float()).to(hidden.dtype)
        out += (act @ w2[e].t()).float() * w[:, None]
    return out.to(hidden.dtype)


def probe_entry(rank: int, world: int, port: int, cfg_dict: dict[str, Any], dump: str,
                env: dict[str, str] | None = None) -> None:
    """Spawn target: the worker's model and engine on gloo, every prefill chunk and decode step run with host
    syncs forbidden (the expert kernel replaced by :func:`dense_moe`); logits dumped like the worker's ``--dump``."""
    import torch.distributed as dist
    from moesim.runtime import moe_layer
    from moesim.runtime.graph import prefill_chunks
    from moesim.runtime.recorder import StepTimer
    from moesim.runtime.worker import build_rank

    os.environ.update(env or {})
    torch.set_num_threads(1)
    cfg = RunConfig.from_dict(cfg_dict)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        spec = get_model(cfg.preset)
        engine, moes = build_rank(cfg, rank, world, torch.device("cpu"))
        moe_layer.kernels = SimpleNamespace(fused_moe=dense_moe)  # type: ignore[assignment]
        chunks = prefill_chunks(cfg.prompt_len, cfg.prefill_chunk)
        prompt = make_tokens(cfg.seed, rank, 0, (cfg.batch, cfg.prompt_len), spec.vocab_size)
        decode = [make_tokens(cfg.seed, rank, s, (cfg.batch, 1), spec.vocab_size) for s in range(1, cfg.steps)]
        logits: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            engine.warm_up([n for _, n in chunks])
            outs, timers = [], []
            for start, n in chunks:
                timers.append(StepTimer(spec.num_layers, moes[0].mapping.slots_per_gpu, torch.device("cpu")))
                with forbid_host_sync():
                    outs.append(engine.prefill(prompt[:, start:start + n], timers[-1])[0])
            logits[0] = torch.cat(outs, dim=1)
            for step, tokens in enumerate(decode, start=1):
                with forbid_host_sync():
                    out = engine.decode(tokens)[0]
                logits[step] = out[:, None].clone()
            for t in timers:
                t.finish()
        slot_tokens = [torch.from_numpy(t.slot_tokens) for t in timers]
        torch.save({"logits": logits, "slot_tokens": slot_tokens}, Path(dump) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
