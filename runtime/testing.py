"""Checking the runtime: spawn gloo ranks on this machine and compare them with the single-process reference.

Used by tests/runtime and handy when changing a backend: ``spawn_run`` + ``assert_matches_reference``.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

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


def spawn_run(cfg: RunConfig, dump: Path, env: dict[str, str] | None = None, timeout: float = 120) -> list[dict]:
    """Run ``cfg`` on cfg.nproc gloo ranks (torch.multiprocessing, spawn); return each rank's dump."""
    import torch.multiprocessing as mp
    from moesim.runtime.worker import spawn_entry

    dump.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(spawn_entry, args=(cfg.nproc, free_port(), cfg.to_dict(), str(dump), env),
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
