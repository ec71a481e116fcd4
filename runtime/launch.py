"""Single-node launcher behind ``moesim run``: validate everything, then start torchrun (no torch imported here).

The launcher runs ``python -m torch.distributed.run --nproc-per-node N --master-addr 127.0.0.1 --master-port P
-m moesim.runtime.worker ...`` with a free port. torchrun is started with a parent-death signal, and every worker sets
one too, so killing ``moesim run`` (even with SIGKILL) takes the whole run down instead of leaving orphans.
Multi-node runs use torchrun directly with the same worker entry point (see ``moesim.runtime.worker``).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from moesim.runtime.config import RunConfig, validate
from moesim.runtime.lifeline import ENV as LAUNCHER_ENV
from moesim.runtime.lifeline import alive

from moesim.errors import MoesimError
from moesim.io import read_json, write_json


def weight_bytes_per_rank(cfg: RunConfig, slots_per_rank: int) -> int:
    """Weights one rank holds: its expert rows plus the replicated dense part (attention, router, embeddings)."""
    m = cfg.model
    elem = 4 if cfg.dtype == "float32" or (cfg.dtype is None and cfg.device == "cpu") else 2  # auto: GPU bf16
    q, kv = m.num_attention_heads * m.head_dim, m.num_kv_heads * m.head_dim
    dense = m.num_layers * (2 * q * m.hidden_size + 2 * kv * m.hidden_size + m.num_experts * m.hidden_size)
    dense += 2 * m.vocab_size * m.hidden_size
    return (dense + m.num_layers * slots_per_rank * m.expert_params) * elem


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_args(cfg: RunConfig) -> list[str]:
    """The worker's command-line options for ``cfg`` (everything but ``--nproc``)."""
    args = ["--backend", cfg.backend, "--steps", str(cfg.steps), "--batch", str(cfg.batch),
            "--prompt-len", str(cfg.prompt_len), "--seed", str(cfg.seed), "--device", cfg.device,
            "--policy", cfg.policy, "--gpus-per-node", str(cfg.gpus_per_node), "--kernels", cfg.kernels,
            "--remap-transport", cfg.remap_transport, "--prefill-chunk", str(cfg.prefill_chunk),
            "--profile-every", str(cfg.profile_every)]
    if not cfg.graphs:
        args.append("--no-graphs")
    for flag, value in (("--preset", cfg.preset), ("--mapping", cfg.mapping), ("--record", cfg.record),
                        ("--checkpoint", cfg.checkpoint), ("--dtype", cfg.dtype)):
        if value is not None:
            args += [flag, str(value)]
    for step, path in cfg.remap_at:
        args += ["--remap-at", f"{step}:{path}"]
    if cfg.await_mapping is not None:
        args += ["--await-mapping", f"{cfg.await_mapping[0]}:{cfg.await_mapping[1]}",
                 "--await-timeout", str(cfg.await_timeout_s)]
    if cfg.profile:
        args.append("--profile")
    return args


def torchrun_command(cfg: RunConfig, port: int | None = None, threads: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(cfg.nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(port or free_port()), "-m", "moesim.runtime.worker"]
    cmd += worker_args(cfg)
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def _pdeathsig() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def require_torch() -> None:
    """One line instead of torchrun's traceback when the simulator-only install meets a runtime command."""
    if importlib.util.find_spec("torch") is None:
        raise MoesimError("the live runtime needs torch, which is not installed: pip install torch (CPU: "
                          "torch==2.13.0), then pip install -e '.[torch]'")


def launch(cfg: RunConfig, *, threads: int = 0, check_only: bool = False, force: bool = False, **popen: Any) -> int:
    """Validate ``cfg`` (raising a one-line MoesimError), then run torchrun and return its exit code."""
    proc = start(cfg, threads=threads, check_only=check_only, force=force, **popen)
    if proc is None:
        return 0
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        settle_record(cfg.record, "interrupted")
        raise
    if rc != 0:
        settle_record(cfg.record, "failed")
    return rc


def settle_record(record: str | None, status: str, *, only_if_dead: bool = False) -> str | None:
    """Give a run.json still saying "running" its real end (``status``); return the status it now has.

    With ``only_if_dead`` it is changed only when the launcher that wrote it is gone (a run killed with SIGKILL,
    noticed by the next start)."""
    if record is None:
        return None
    path = Path(record) / "run.json"
    try:
        doc = read_json(path, "run record")
    except MoesimError:
        return None
    if not isinstance(doc, dict) or doc.get("status") != "running":
        return doc.get("status") if isinstance(doc, dict) else None
    pid = doc.get("launcher_pid")
    if only_if_dead and isinstance(pid, int) and alive(pid):
        return "running"
    doc["status"] = status
    write_json(path, doc)
    return status


def protect_record(cfg: RunConfig, force: bool) -> None:
    """Never let a new run destroy an existing recording: refuse a --record DIR that holds one, unless ``force``.

    A run.json left saying "running" by a killed run is first settled as "killed"."""
    if cfg.record is None:
        return
    out = Path(cfg.record)
    if (out / "run.json").exists():
        state = settle_record(cfg.record, "killed", only_if_dead=True)
        if state == "running":
            raise MoesimError(f"--record {out} belongs to a run that is still running")
    if not force and any((out / name).exists() for name in ("trace.mtrace", "run.json")):
        raise MoesimError(f"--record {out} already holds a recording; choose a new directory or pass --force to "
                          "replace it")


def check_resources(cfg: RunConfig, threads: int, slots_per_rank: int) -> None:
    """What every rank would otherwise find out alone: threads, and host memory for weights, KV cache and
    activations of the whole batch (CPU runs; a GPU's memory is checked by the ranks themselves)."""
    if threads < 0 or threads > (os.cpu_count() or 1) * 4:
        raise MoesimError(f"--threads must be 0 (torch's default) or 1..{(os.cpu_count() or 1) * 4}, got {threads}")
    if cfg.device == "cuda":
        return
    m = cfg.model
    elem = 4 if cfg.dtype in (None, "float32") else 2
    tokens = cfg.batch * (cfg.prompt_len + cfg.steps)
    kv = 2 * m.num_layers * tokens * m.num_kv_heads * m.head_dim * elem
    prefill = cfg.batch * cfg.prompt_len
    act = prefill * (m.hidden_size * 8 + m.top_k * m.ffn_size * 3 + m.vocab_size) * elem
    attn = cfg.batch * m.num_attention_heads * cfg.prompt_len * cfg.prompt_len * elem  # prefill scores
    need = cfg.nproc * (weight_bytes_per_rank(cfg, slots_per_rank) + kv + act + attn)
    avail = _available_memory()
    if avail is not None and need > avail:
        raise MoesimError(f"this run needs about {_size(need)} of host memory ({cfg.nproc} rank(s): weights, KV cache "
                          f"of {cfg.batch} x {cfg.prompt_len + cfg.steps} tokens, activations), more than the "
                          f"{_size(avail)} available; lower --batch, --prompt-len or --steps")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def start(cfg: RunConfig, *, threads: int = 0, check_only: bool = False, force: bool = False,
          **popen: Any) -> subprocess.Popen[Any] | None:
    """Validate ``cfg``, then start torchrun without waiting (a controller talks to the run meanwhile: see
    ``--await-mapping``). None with ``check_only``. The caller waits for (or stops) the process."""
    require_torch()
    model, mapping, remaps = validate(cfg)
    check_resources(cfg, threads, mapping.slots_per_gpu)
    protect_record(cfg, force)
    print(f"moesim run: {model.name} on {cfg.nproc} rank(s), {mapping.slots_per_gpu} expert slots per rank "
          f"({mapping.num_redundant} redundant), backend {cfg.backend}, {cfg.steps} steps"
          + (f", {len(remaps)} live remap(s)" if remaps else "")
          + (f", awaiting a mapping before step {cfg.await_mapping[0]}" if cfg.await_mapping else "")
          + f"; ~{_size(weight_bytes_per_rank(cfg, mapping.slots_per_gpu))} of weights per rank", flush=True)
    if check_only:
        return None
    cmd = torchrun_command(cfg, threads=threads)
    env = dict(popen.pop("env", None) or os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads or 1))  # torchrun's default, without its warning banner
    env[LAUNCHER_ENV] = str(os.getpid())  # every worker dies with this process (moesim.runtime.lifeline)
    try:
        return subprocess.Popen(cmd, preexec_fn=_pdeathsig, env=env, **popen)
    except OSError as exc:
        raise MoesimError(f"cannot start torchrun: {exc}") from None
