"""Launch-config lookup, calibration files, the tuner and the benchmark script (CPU smoke modes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moesim.kernels import calibrate, launch, tune
from moesim.kernels.launch import ConfigError, GemmConfig, MoEConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("tokens,block_m", [(1, 16), (64, 16), (128, 32), (256, 64), (16384, 128)])
def test_heuristic_block_m_follows_slots_per_expert(tokens: int, block_m: int) -> None:
    cfg = launch.heuristic_config(tokens, 8, 4096, 14336, 2)
    assert block_m == cfg.BLOCK_M


def test_heuristic_splits_k_for_decode_only() -> None:
    decode = launch.heuristic_config(1, 8, 4096, 14336, 2)
    prefill = launch.heuristic_config(16384, 8, 4096, 14336, 2)
    assert decode.w2.SPLIT_K > 1 and prefill.w2.SPLIT_K == 1
    # the down GEMM of one token has 2 experts × 64 tiles: split until ≥ 2 programs per SM
    assert 2 * 64 * decode.w2.SPLIT_K >= 2 * 132


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="BLOCK_N"):
        GemmConfig(BLOCK_N=48)
    with pytest.raises(ConfigError, match="SPLIT_K must be 1"):
        MoEConfig(16, GemmConfig(SPLIT_K=2), GemmConfig())
    with pytest.raises(ConfigError, match="unknown keys"):
        MoEConfig.from_dict({"BLOCK_M": 16, "w13": {"BLOCK_X": 1}})


def test_config_file_round_trip_and_nearest_lookup(tmp_path: Path) -> None:
    small = MoEConfig(16, GemmConfig(32, 128), GemmConfig(32, 128, SPLIT_K=4))
    big = MoEConfig(128, GemmConfig(128, 64, 8, 8, 3), GemmConfig(128, 64, 8, 8, 4))
    launch.write_table(tmp_path / launch.config_filename(8, 64, 96, "interpreter", torch.float16),
                       device="interpreter", dtype=torch.float16, num_experts=8, hidden=64, ffn=96, top_k=2,
                       configs={1: (small, 1e-5), 4096: (big, None)}, tuned_with={"triton": "x"})
    get = lambda t, k=2: launch.get_config(t, 8, 64, 96, k, torch.float16, config_dir=tmp_path)  # noqa: E731
    assert get(1) == small and get(50) == small and get(3000) == big
    assert get(1000, k=8) == big  # 8000 slots ≈ 4000 tokens at the file's top-2
    # another dtype or shape has no file → heuristic
    assert launch.get_config(1, 8, 64, 96, 2, torch.float32, config_dir=tmp_path) == \
        launch.heuristic_config(1, 8, 64, 96, 2)


def test_bad_config_file_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / launch.config_filename(8, 64, 96, "interpreter", torch.float16)
    path.write_text('{"format": "something-else"}')
    with pytest.raises(ConfigError, match=r"is not a moesim\.fused-moe-configs"):
        launch.get_config(1, 8, 64, 96, 2, torch.float16, config_dir=tmp_path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        launch.get_config(1, 8, 64, 96, 2, torch.float16, config_dir=tmp_path)


def test_calibration_round_trip_and_validation(tmp_path: Path) -> None:
    entry = {"hidden_size": 8, "ffn_size": 16, "num_experts": 2, "top_k": 1, "tokens": 4, "seconds": 1e-4,
             "reference_seconds": 2e-4}
    calibrate.write_calibration(tmp_path / "c.json", "NVIDIA H100 80GB HBM3", torch.bfloat16, [entry])
    doc = calibrate.read_calibration(tmp_path / "c.json")
    assert doc["dtype"] == "bfloat16" and doc["entries"] == [entry]
    with pytest.raises(ValueError, match="lacks"):
        calibrate.write_calibration(tmp_path / "d.json", "x", torch.bfloat16, [{"tokens": 1}])
    (tmp_path / "e.json").write_text(json.dumps({**doc, "entries": [{**entry, "seconds": 0}]}))
    with pytest.raises(ValueError, match=r"seconds > 0"):
        calibrate.read_calibration(tmp_path / "e.json")
    assert calibrate.device_peaks("NVIDIA H200") == (989e12, 4.8e12)
    assert calibrate.device_peaks("Tesla T4") is None


def test_metrics_formulas() -> None:
    # Mixtral decode, 1 token top-2: two experts' weights dominate (3·4096·14336 bf16 each ≈ 352 MB)
    assert calibrate.moe_min_bytes(2, 1, 4096, 14336, 2) == pytest.approx(2 * 3 * 4096 * 14336 * 2 + 2 * 4096 * 2)
    assert calibrate.moe_flops(2, 4096, 14336) == 2 * 2 * 3 * 4096 * 14336


def test_tune_search_space_respects_hardware_limits() -> None:
    for bm in (16, 64, 128):
        for gemm in ("w13", "w2"):
            space = tune.search_space(bm, gemm, "full", 4096)
            assert space
            b_tiles = 2 if gemm == "w13" else 1
            assert all(tune._fits(bm, c.BLOCK_N, c.BLOCK_K, c.num_warps, c.num_stages, b_tiles) for c in space)
    assert all(c.SPLIT_K == 1 for c in tune.search_space(16, "w13", "full", 4096))


def test_tune_descent_finds_the_optimum_of_a_separable_cost() -> None:
    """Coordinate descent from the heuristic reaches the best config of a cost that is a sum over parameters, in a
    few dozen timings, never proposing a config that cannot fit the GPU."""
    target = {"BLOCK_N": 128, "BLOCK_K": 64, "num_stages": 4, "num_warps": 8, "GROUP_M": 16, "SPLIT_K": 1}
    calls = []

    def cost(c: GemmConfig) -> float:
        calls.append(c)
        assert tune._fits(128, c.BLOCK_N, c.BLOCK_K, c.num_warps, c.num_stages, 1)
        return 1.0 + sum(abs(__import__("math").log2(getattr(c, k) / v)) for k, v in target.items())

    start = tune._start(128, "w2", 14336, launch.heuristic_config(16384, 8, 4096, 14336, 2))
    best, t = tune.descend(start, 128, "w2", 14336, cost, deadline=float("inf"))
    assert best == GemmConfig(**target) and t == 1.0
    assert len(calls) <= 40 and len(set(calls)) == len(calls)
    stopped, _ = tune.descend(start, 128, "w2", 14336, cost, deadline=0.0)  # budget spent: the start stands
    assert stopped == start


def test_tune_interpret_smoke_writes_a_config_get_config_uses(tmp_path: Path) -> None:
    # a subprocess: --interpret-smoke switches the interpreter on, which must not leak into a GPU test process
    run = lambda *extra: subprocess.run([sys.executable, "-m", "moesim.kernels.tune", "--interpret-smoke", "--out-dir",  # noqa: E731
                                         str(tmp_path), *extra], capture_output=True, text=True, timeout=300, cwd=REPO)
    proc = run("--tokens", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "T=5" in proc.stdout
    shape = calibrate.SHAPES["tiny"]
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == [launch.config_filename(shape.num_experts, shape.hidden, shape.ffn,
                                                              "interpreter", torch.float16)]
    top_k, table = launch.load_table(files[0])
    assert top_k == shape.top_k and list(table) == [5]
    got = launch.get_config(5, shape.num_experts, shape.hidden, shape.ffn, shape.top_k, torch.float16,
                            config_dir=tmp_path)
    assert got == table[5]
    bad = run("--tokens", "x")
    assert bad.returncode == 2 and "--tokens must be positive integers" in bad.stderr


def test_bench_interpret_smoke_subprocess(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_kernels.py"), "--interpret-smoke",
                           "--tokens", "2", "--out-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    cal = calibrate.read_calibration(tmp_path / "kernel_calibration_interpreter.json")
    (entry,) = cal["entries"]
    assert entry["tokens"] == 2 and entry["seconds"] > 0 and entry["reference_seconds"] > 0
    md = (tmp_path / "bench_kernels_interpreter.md").read_text()
    assert "| tiny | 2 |" in md
    assert "tiny" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_bench_refuses_without_gpu(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_kernels.py"), "--out-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.gpu
def test_bench_on_gpu_small(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_kernels.py"), "--shapes",
                           "qwen3-30b-a3b", "--tokens", "1,64", "--out-dir", str(tmp_path), "--rep-ms", "20"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert len(calibrate.read_calibration(next(tmp_path.glob("kernel_calibration_*.json")))["entries"]) == 2


def test_aot_compiles_every_kernel_for_hopper_without_spills() -> None:
    """Compile for sm_90 on this CPU machine (Triton ships ptxas): catches GPU-only compile errors the interpreter
    cannot, and register spills / shared-memory overflow of the heuristic configs."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "moesim.kernels.aot", "--shape", "mixtral-8x7b", "--tokens", "1,4096",
                           "--check"], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("this Triton build has no bundled ptxas")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    w13_prefill = next(line for line in lines if line.split()[:1] == ["4096"] and "_w13_kernel" in line)
    assert w13_prefill.split()[-2:] == ["yes", "yes"]  # wgmma tensor cores, pipelined K loop
    assert sum("_scatter_kernel" in line for line in lines) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback to the interpreter")
def test_triton_path_on_cpu_without_env_uses_interpreter() -> None:
    """A fresh process that never heard of TRITON_INTERPRET can still run impl="triton" on CPU tensors."""
    code = ("import torch, kernels; from kernels import reference as R; g = torch.Generator().manual_seed(0);"
            "x = torch.randn(6, 20, generator=g); w13 = torch.randn(3, 32, 20, generator=g) / 5;"
            "w2 = torch.randn(3, 20, 16, generator=g) / 4; tw, ids = kernels.topk_softmax(x[:, :3], 2, impl='triton');"
            "out = kernels.fused_moe(x, w13, w2, tw, ids, impl='triton');"
            "assert torch.allclose(out, R.fused_moe_ref(x, w13, w2, tw, ids), atol=1e-5); print('ok')")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
