"""Run configuration and every check that can fail before a process starts (no torch imported here).

The launcher validates a :class:`RunConfig` with :func:`validate` *before* spawning workers, so a bad mapping,
an nproc that does not divide the slots, or a checkpoint of the wrong shape is one line on stderr (exit 2)
instead of a hang inside a collective. Workers call the same function again (cheap) when started by a
hand-written torchrun command line.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moesim.errors import MappingError, MoesimError
from moesim.mapping import ExpertMapping
from moesim.models import ModelSpec, get_model
from moesim.replica import ReplicaPolicy

BACKENDS = ("all2all", "allgather")
DTYPES = ("float32", "bfloat16", "float16")
KERNELS = ("auto", "torch", "triton")


@dataclass
class RunConfig:
    preset: str | None = "tiny"  # None: the shape comes from the checkpoint's config.json
    nproc: int = 1
    backend: str = "all2all"
    mapping: str | None = None  # path of a moesim mapping JSON; None → linear placement
    steps: int = 8  # step 0 is the prefill, the rest decode one token per sequence
    batch: int = 2  # sequences per rank
    prompt_len: int = 16
    seed: int = 0
    record: str | None = None  # output directory for trace.mtrace + run.json
    remap_at: list[tuple[int, str]] = field(default_factory=list)  # (step, mapping path)
    profile: bool = False
    checkpoint: str | None = None  # local Hugging Face safetensors folder (classic or fused Mixtral tensor names)
    dtype: str | None = None  # None → float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    policy: str = "position"  # replica policy (moesim.replica): vllm | position (old name round_robin) | local
    gpus_per_node: int = 8
    kernels: str = "auto"  # "auto" (Triton on CUDA, torch reference on CPU) | "torch" | "triton"
    remap_transport: str = "p2p"  # how a live remap moves weights: "p2p" (batch_isend_irecv) | "all2all"
    # (step, path): pause before step until a controller (moesim validate) writes the mapping, then apply it live
    await_mapping: tuple[int, str] | None = None
    await_timeout_s: float = 300.0  # no mapping by then: record a failed remap, go on with the old mapping
    graphs: bool = True  # CUDA: capture the decode step as a CUDA graph and replay it (CPU always runs it eagerly)
    prefill_chunk: int = 0  # prompt tokens per sequence per prefill chunk (0: the whole prompt in one chunk)
    profile_every: int = 8  # under graphs, every N-th decode step runs eagerly with per-phase timings

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["remap_at"] = [[s, p] for s, p in self.remap_at]
        d["await_mapping"] = None if self.await_mapping is None else list(self.await_mapping)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        d["remap_at"] = [(int(s), str(p)) for s, p in d.get("remap_at", [])]
        if d.get("await_mapping") is not None:
            step, path = d["await_mapping"]
            d["await_mapping"] = (int(step), str(path))
        return cls(**d)

    @property
    def model(self) -> ModelSpec:
        if self.preset is None:
            if self.checkpoint is None:
                raise MoesimError("give --preset or a --checkpoint folder with a config.json")
            from moesim.runtime.checkpoint import spec_from_checkpoint

            return spec_from_checkpoint(self.checkpoint)
        return get_model(self.preset)


def parse_remap(spec: str, flag: str = "--remap-at") -> tuple[int, str]:
    """``STEP:PATH`` → (step, path)."""
    step, sep, path = spec.partition(":")
    if not sep or not path or not step.strip().isdigit():
        raise MoesimError(f"{flag} wants STEP:MAPPING.json, got {spec!r}")
    return int(step), path


def check_model_supported(model: ModelSpec) -> None:
    """The runtime builds Mixtral-architecture decoders (optionally with DeepSeek-V3's router)."""
    if model.num_dense_layers or model.num_shared_experts:
        raise MoesimError(f"model {model.name!r} has dense FFN layers or shared experts; the live runtime builds "
                          "Mixtral-architecture decoders (MoE in every layer, no shared expert)")
    if model.router == "sigmoid_grouped" and model.top_k > model.topk_groups * (model.num_experts // model.num_groups):
        raise MoesimError(f"model {model.name!r}: top_k exceeds the experts of the kept groups")


def initial_mapping(cfg: RunConfig) -> ExpertMapping:
    """The mapping in force at step 0: ``cfg.mapping`` checked against the model and nproc, else linear."""
    model = cfg.model
    if cfg.mapping is not None:
        return ExpertMapping.load(cfg.mapping, model=model, num_gpus=cfg.nproc)
    if model.num_experts % cfg.nproc:
        raise MappingError(f"--nproc {cfg.nproc} does not divide the {model.num_experts} experts of "
                           f"{model.name!r}; give a --mapping with redundant slots")
    return ExpertMapping.linear(model.num_layers, model.num_experts, cfg.nproc)


def validate(cfg: RunConfig) -> tuple[ModelSpec, ExpertMapping, list[tuple[int, ExpertMapping]]]:
    """Check everything a run needs; return (model, initial mapping, [(step, remap mapping)])."""
    model = cfg.model
    check_model_supported(model)
    if cfg.nproc < 1:
        raise MoesimError(f"--nproc must be positive, got {cfg.nproc}")
    if cfg.backend not in BACKENDS:
        raise MoesimError(f"--backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise MoesimError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.kernels not in KERNELS:
        raise MoesimError(f"--kernels must be one of {', '.join(KERNELS)}, got {cfg.kernels!r}")
    if cfg.remap_transport not in ("p2p", "all2all"):
        raise MoesimError(f"--remap-transport must be p2p or all2all, got {cfg.remap_transport!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise MoesimError(f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.prefill_chunk < 0:
        raise MoesimError(f"--prefill-chunk must be 0 (whole prompt) or positive, got {cfg.prefill_chunk}")
    if cfg.profile_every < 1:
        raise MoesimError(f"--profile-every must be positive, got {cfg.profile_every}")
    for name in ("steps", "batch", "prompt_len"):
        if getattr(cfg, name) < 1:
            raise MoesimError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if model.sliding_window is None and cfg.prompt_len + cfg.steps > 1 << 20:
        raise MoesimError("prompt length plus steps exceeds the runtime's 1M-token KV cache limit")
    if cfg.profile and not cfg.record:
        raise MoesimError("--profile writes its Chrome trace into the --record DIR; give --record too")
    if cfg.record is not None:
        out = Path(cfg.record)
        if out.exists() and not out.is_dir():
            raise MoesimError(f"--record {out} exists and is not a directory")
        if not out.parent.is_dir() and not out.exists():
            raise MoesimError(f"--record {out}: parent directory {out.parent} does not exist")
    ReplicaPolicy(cfg.policy, cfg.gpus_per_node)  # raises on an unknown policy
    mapping = initial_mapping(cfg)
    remaps = []
    for step, path in sorted(cfg.remap_at):
        if not 1 <= step < cfg.steps:
            raise MoesimError(f"--remap-at step {step} is outside the run's steps 1..{cfg.steps - 1}")
        new = ExpertMapping.load(path, model=model, num_gpus=cfg.nproc)
        if new.slots_per_gpu != mapping.slots_per_gpu:
            raise MappingError(f"{path}: {new.slots_per_gpu} slots per GPU, but the run started with "
                               f"{mapping.slots_per_gpu} (slots per GPU are fixed for a run)")
        remaps.append((step, new))
    check_await(cfg)
    if cfg.checkpoint is not None:
        check_checkpoint(cfg.checkpoint, model)
    return model, mapping, remaps


def check_await(cfg: RunConfig) -> None:
    """``--await-mapping``: a step inside the run, not also a ``--remap-at`` step, a folder that exists."""
    if cfg.await_mapping is None:
        return
    step, path = cfg.await_mapping
    if not 1 <= step < cfg.steps:
        raise MoesimError(f"--await-mapping step {step} is outside the run's steps 1..{cfg.steps - 1}")
    if step in dict(cfg.remap_at):
        raise MoesimError(f"--await-mapping step {step} is also a --remap-at step; one remap per step")
    folder = Path(path).parent
    if not folder.is_dir():
        raise MoesimError(f"--await-mapping {path}: folder {folder} does not exist")
    if not 0 < cfg.await_timeout_s <= 1200:
        raise MoesimError(f"--await-timeout must be in (0, 1200] seconds, got {cfg.await_timeout_s}")


# -- safetensors checkpoints (header-only checks: no torch) -----------------------------------------------

def expected_tensors(model: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Mixtral's Hugging Face tensor names → shapes (plus the DeepSeek-V3 router bias where it applies)."""
    H, F, E, V = model.hidden_size, model.ffn_size, model.num_experts, model.vocab_size
    q, kv = model.num_attention_heads * model.head_dim, model.num_kv_heads * model.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,),
                                       "lm_head.weight": (V, H)}
    for i in range(model.num_layers):
        p = f"model.layers.{i}"
        out.update({f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
                    f"{p}.self_attn.q_proj.weight": (q, H), f"{p}.self_attn.k_proj.weight": (kv, H),
                    f"{p}.self_attn.v_proj.weight": (kv, H), f"{p}.self_attn.o_proj.weight": (H, q),
                    f"{p}.block_sparse_moe.gate.weight": (E, H)})
        if model.router == "sigmoid_grouped":
            out[f"{p}.block_sparse_moe.gate.e_score_correction_bias"] = (E,)
        for j in range(E):
            e = f"{p}.block_sparse_moe.experts.{j}"
            out.update({f"{e}.w1.weight": (F, H), f"{e}.w3.weight": (F, H), f"{e}.w2.weight": (H, F)})
    return out


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (8-byte little-endian length, then JSON)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise MoesimError(f"checkpoint file {path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20:
                raise MoesimError(f"checkpoint file {path} has an implausible header size {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        raise MoesimError(f"checkpoint file {path} is not a readable safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise MoesimError(f"checkpoint file {path} has a malformed header")
    header.pop("__metadata__", None)
    return header


def checkpoint_index(folder: str | Path) -> dict[str, Path]:
    """Tensor name → the .safetensors file holding it, for every file in ``folder``."""
    folder = Path(folder)
    if not folder.exists():
        raise MoesimError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise MoesimError(f"checkpoint {folder} is not a folder (give the folder holding *.safetensors)")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MoesimError(f"checkpoint folder {folder} holds no *.safetensors file")
    where: dict[str, Path] = {}
    for path in files:
        for name in read_safetensors_header(path):
            where[name] = path
    return where


def check_checkpoint(folder: str | Path, model: ModelSpec) -> dict[str, Path]:
    """Every tensor the model needs is present with the right shape, under its classic Mixtral name or in the
    fused (transformers 5) layout (:mod:`moesim.runtime.checkpoint`); one line naming the first problem."""
    from moesim.runtime.checkpoint import fused_location, fused_shapes

    where = checkpoint_index(folder)
    headers: dict[Path, dict[str, Any]] = {}

    def shape_of(name: str) -> tuple[int, ...]:
        path = where[name]
        if path not in headers:
            headers[path] = read_safetensors_header(path)
        return tuple(headers[path][name].get("shape", ()))

    missing = []
    fused = fused_shapes(model)
    for name, shape in expected_tensors(model).items():
        if name not in where:
            loc = fused_location(name, model.ffn_size)
            if loc is not None and loc[0] in where:
                name, shape = loc[0], fused.get(loc[0], shape)
            else:
                missing.append(name)
                continue
        got = shape_of(name)
        if got != shape:
            raise MoesimError(f"checkpoint {folder}: tensor {name} has shape {list(got)}, model {model.name!r} "
                              f"needs {list(shape)}")
    if missing:
        raise MoesimError(f"checkpoint {folder} lacks {len(missing)} tensors of model {model.name!r}, "
                          f"e.g. {missing[0]}")
    return where


# -- command line (shared by ``moesim run`` and ``python -m moesim.runtime.worker``) -------------------------------

def add_arguments(p: Any) -> None:
    """Options common to the launcher and the worker (the launcher adds ``--nproc``)."""
    p.add_argument("--preset", help="model preset (moesim.models): tiny, small, tiny-deepseek, ..., mixtral-8x7b "
                   "(default: the --checkpoint folder's config.json where it has one, else tiny)")
    p.add_argument("--backend", default="all2all", choices=BACKENDS, help="dispatch/combine backend")
    p.add_argument("--mapping", help="expert mapping JSON (moesim or SGLang format); default: linear placement")
    p.add_argument("--steps", type=int, default=8, help="steps to run: one prefill, then decode (default 8)")
    p.add_argument("--batch", type=int, default=2, help="sequences per rank (default 2)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per sequence (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the random prompts")
    p.add_argument("--record", metavar="DIR", help="write DIR/trace.mtrace (routing + timings) and DIR/run.json")
    p.add_argument("--remap-at", action="append", default=[], metavar="STEP:MAPPING.json",
                   help="apply a new expert mapping live before STEP (repeatable)")
    p.add_argument("--profile", action="store_true", help="write a torch profiler Chrome trace per rank into --record")
    p.add_argument("--checkpoint", metavar="FOLDER", help="Hugging Face safetensors folder (Mixtral, classic or "
                   "transformers-5 fused expert tensors); its config.json gives the shape unless --preset is given")
    p.add_argument("--dtype", choices=DTYPES, help="dtype (default float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--policy", default="position", help="replica policy (moesim.replica): vllm (vLLM's hash of the "
                   "token index) | position (old name round_robin) | local")
    p.add_argument("--gpus-per-node", type=int, default=8, help="for the 'local' replica policy (default 8)")
    p.add_argument("--kernels", default="auto", choices=KERNELS,
                   help="MoE kernels: auto = Triton on CUDA, torch on CPU; triton on CPU runs the interpreter")
    p.add_argument("--remap-transport", default="p2p", choices=("p2p", "all2all"),
                   help="how --remap-at moves expert weights: batched point-to-point or all_to_all_single")
    p.add_argument("--await-mapping", metavar="STEP:MAPPING.json",
                   help="pause before STEP until a controller writes MAPPING.json (atomically: write, then rename), "
                        "then apply it live; moesim validate drives this")
    p.add_argument("--await-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="no mapping by then: record a failed remap and go on with the old mapping")
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="CUDA: run the decode step eagerly instead of replaying a captured CUDA graph")
    p.add_argument("--prefill-chunk", type=int, default=0, metavar="TOKENS",
                   help="prompt tokens per sequence per prefill chunk, one trace step each (0: whole prompt)")
    p.add_argument("--profile-every", type=int, default=8, metavar="N",
                   help="under CUDA graphs, every N-th decode step runs eagerly with per-phase timings (default 8)")


def config_from_args(args: Any, nproc: int) -> RunConfig:
    from_config = args.checkpoint is not None and (Path(args.checkpoint) / "config.json").is_file()
    preset = args.preset if args.preset is not None else (None if from_config else "tiny")
    return RunConfig(preset=preset, nproc=nproc, backend=args.backend, mapping=args.mapping, steps=args.steps,
                     batch=args.batch, prompt_len=args.prompt_len, seed=args.seed, record=args.record,
                     remap_at=[parse_remap(s) for s in args.remap_at], profile=args.profile,
                     checkpoint=args.checkpoint, dtype=args.dtype, device=args.device, policy=args.policy,
                     gpus_per_node=args.gpus_per_node, kernels=args.kernels,
                     remap_transport=args.remap_transport,
                     await_mapping=(None if args.await_mapping is None
                                    else parse_remap(args.await_mapping, "--await-mapping")),
                     await_timeout_s=args.await_timeout, graphs=args.graphs, prefill_chunk=args.prefill_chunk,
                     profile_every=args.profile_every)
