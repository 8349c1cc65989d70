"""kiln's Triton decode kernels equal the torch path they replace: on CPU by Triton's interpreter, and
on a CUDA GPU with ``-m gpu``.

Each case runs ``tests/fixtures/kernel_checks.py`` in a fresh process (with ``TRITON_INTERPRET=1``, or
``KILN_KERNEL_DEVICE=cuda``); see that module for what is compared and why fp16 on CPU. Without Triton
installed the kernels are never used (``kernels.available`` is false) and these cases skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed: the CUDA kernels are not used here")
ROOT = Path(__file__).resolve().parents[1]


ATTENTION_CASES = [
    (9, 3, 1, 0),  # SmolLM2's group of 3 (padded to the 16-row tile), split-KV + merge
    (9, 3, 3, 0),  # one split per program: no merge
    (8, 2, 5, 1),  # FP8 cache
    (4, 4, 1, 1),  # MHA, FP8 cache, split-KV
]
GEMV_CASES = [(0, 0), (1, 0), (1, 1)]
# kind, int4 group, rows, pre_quant_scale, design (gemv: CUDA-core, one row; qmm: tensor-core; both as the
# 5-element configs engines built before split-K recorded; _k<S>: S-way split-K, _m<B>: BLOCK_M B tiles
# over 17-64 rows; int_mm: SmoothQuant's torch._int_mm above 16 rows, see kernel_checks.quant_design)
QUANT_CASES = [
    ("int8_wo", 0, 1, 0, "gemv"),
    ("int8_wo", 0, 7, 1, "qmm"),
    ("int8_sq", 0, 1, 1, "gemv"),
    ("int8_sq", 0, 1, 0, "qmm"),
    ("int8_sq", 0, 16, 1, "qmm"),
    ("int8_sq", 0, 40, 1, "int_mm"),
    ("int4", 128, 1, 1, "gemv"),
    ("int4", 64, 1, 0, "gemv"),
    ("int4", 64, 1, 0, "qmm"),
    ("int4", 128, 9, 1, "qmm"),
    ("int8_wo", 0, 1, 1, "gemv_k2"),  # K = 384 in splits of 256 and 128
    ("int4", 64, 1, 0, "gemv_k3"),
    ("int8_sq", 0, 5, 1, "qmm_k2"),
    ("int4", 128, 9, 1, "qmm_k3"),
    ("int8_wo", 0, 40, 1, "qmm_m16"),  # three M tiles, the last one partial
    ("int8_sq", 0, 64, 0, "qmm_m32_k2"),
    ("int4", 64, 17, 1, "qmm_m32"),
    ("int4", 128, 33, 0, "qmm_m64_k2"),
]
# the named options of program.gemv: kind, int4 group, rows, pre_quant_scale, option
QUANT_OPTION_CASES = [
    ("int4", 128, 1, 1, "tinygemm"),
    ("int4", 64, 9, 0, "tinygemm"),
    ("int4", 128, 40, 1, "tinygemm"),
    ("int4", 128, 100, 1, "dequant"),
    ("int8_wo", 0, 40, 1, "dequant"),
    ("int8_wo", 0, 1, 1, "fused"),
    ("int8_sq", 0, 1, 1, "fused"),
    ("int4", 64, 1, 1, "fused"),
]


def run_check(*args: str, device: str = "cpu", module: str = "tests.fixtures.kernel_checks") -> str:
    # the repo first, then whatever the caller's PYTHONPATH holds (a GPU machine's carried wheels)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "KILN_KERNEL_DEVICE": device}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def joined(cases: list[tuple[str, ...]]) -> list[str]:
    """``cases`` as one check process's argv (``NAME ARGS... + NAME ARGS...``): a start costs ~10 s."""
    argv: list[str] = []
    for case in cases:
        argv += [*case, "+"]
    return argv[:-1]


# key blocks larger and smaller than the split chunk's unit (32 keys): the chunks' key masks, not the block
# shape, bound what each program reads, so every launch shape the GPU race picks gives the same answer
LAUNCH_CASES = [((9, 3, 1, 0), "64,4,3"), ((8, 2, 5, 1), "16,2,1")]


def test_decode_attention_matches_torch_path() -> None:
    cases = [("attention", *map(str, c)) for c in ATTENTION_CASES]
    cases += [("attention", *map(str, c), launch) for c, launch in LAUNCH_CASES]
    out = run_check(*joined(cases))
    for heads, kv_heads, batch, _ in ATTENTION_CASES:
        assert f"heads={heads}/{kv_heads} batch={batch}" in out
    for _, launch in LAUNCH_CASES:
        assert f"launch=({launch.replace(',', ', ')})" in out


def test_gemv_matches_torch_path() -> None:
    out = run_check(*joined([("gemv", *map(str, c)) for c in GEMV_CASES]))
    assert out.count("rel_err") == len(GEMV_CASES)


def test_integer_weight_kernels_match_torch_path() -> None:
    out = run_check(*joined([("quant", *map(str, c)) for c in QUANT_CASES]))
    for kind, group, rows, _, _ in QUANT_CASES:
        assert f"quant {kind} group={group} m={rows}" in out


QUANT_OPTIONS = "tests.fixtures.quant_option_checks"


def test_quant_options_match_torch_path() -> None:
    out = run_check(*joined([("option", *map(str, c)) for c in QUANT_OPTION_CASES]), module=QUANT_OPTIONS)
    for kind, group, rows, _, option in QUANT_OPTION_CASES:
        assert f"quant option {option} {kind} group={group} m={rows}" in out


@pytest.mark.parametrize("check", ["tinygemm_only", "compiled", "race"])
def test_quant_options_packing_and_compile(check: str) -> None:
    assert "quant option" in run_check(check, module=QUANT_OPTIONS)


def test_quant_configs_candidates_and_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded configs of any age parse; split-K is raced where the row tiles leave SMs idle; every
    bucket races the Triton kernels next to the whole-weight options; old programs still dispatch."""
    import torch

    from kiln.engine.torch import kernels, linear

    assert kernels.quant_config([1, 32, 256, 4, 3]) == (1, 32, 256, 4, 3, 1, 16)  # a pre-split-K engine's
    assert kernels.quant_config([0, 16, 512, 8, 3, 4]) == (0, 16, 512, 8, 3, 4, 16)
    assert kernels.quant_config([1, 64, 128, 4, 3, 2, 64]) == (1, 64, 128, 4, 3, 2, 64)
    with pytest.raises(ValueError):
        kernels.quant_config([1, 32, 256, 4])
    # Llama-3.1-8B on an H200 (132 SMs) at 8 rows: 4096 outputs are 64-256 row tiles, 28672 are enough
    small = kernels.quant_candidates("int8_wo", 4096, 0, 16, 4096, 132)
    assert {c[5] for c in small} == {1, 2, 4, 8} and all(len(c) == 6 for c in small)
    assert {c[5] for c in kernels.quant_candidates("int8_wo", 4096, 0, 16, 28672, 132)} == {1}
    assert {c[5] for c in kernels.quant_candidates("int8_wo", 4096, 0, 16)} == {1}  # no shape: no split
    int4 = kernels.quant_candidates("int4", 4096, 128, 64, 4096, 132)
    assert int4 and all(c[2] % 128 == 0 and len(c) == 7 and c[6] in (16, 32, 64) for c in int4)
    assert {c[6] for c in kernels.quant_candidates("int8_sq", 4096, 0, 17)} == {16, 32}
    assert all(c[0] == kernels.GEMV for c in kernels.quant_candidates("int4", 4096, 128, 1)[:5])
    cpu = torch.device("cpu")
    for kind, whole in (("int8_wo", ["dequant"]), ("int8_sq", ["int_mm"]), ("int4", ["dequant"])):
        buckets = linear._buckets(kind, 4096, 4096, 128 if kind == "int4" else 0, cpu, torch.float16)
        assert set(buckets) == {"m1", "m16", "m64", "large"}
        for bucket in ("m64", "large"):
            assert buckets[bucket][: 1 + len(whole)] == [None, *whole]
            assert all(isinstance(o, list) and len(o) == 7 for o in buckets[bucket][1 + len(whole) :])
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # kernels.available: a CPU layer may take kernel choices
    tensors = {"weight": torch.ones(64, 128, dtype=torch.int8), "weight_scale": torch.ones(64)}
    old = {"m1": [0, 16, 128, 4, 3], "m16": [1, 32, 128, 4, 3], "large": "dequant"}
    new = {**old, "m64": [1, 32, 128, 4, 3, 2, 32], "large": [1, 32, 128, 4, 3, 1, 64]}
    for program, at40 in ((old, "dequant"), (new, new["m64"])):
        gemv = {"int8_wo:64x128": program}
        layer = linear.QuantLinear(
            "int8_wo", tensors, dtype=torch.float16, device=cpu, scaled_mm=False, gemv=gemv
        )
        want = [program["m1"], program["m16"], at40, program["large"]]
        assert [layer._option(m) for m in (1, 16, 40, 65)] == want


@pytest.mark.parametrize("quantization", ["none", "int4_awq", "int8_sq"])
def test_engine_greedy_tokens_identical_with_kernels(tmp_path: Path, quantization: str) -> None:
    from kiln.engine.torch import TorchBackend
    from kiln.profiles import Target
    from tests.fixtures.engine import export_checkpoint
    from tests.fixtures.models import make_tiny_llama

    checkpoint, _ = export_checkpoint(make_tiny_llama(tmp_path / "hf"), tmp_path / "ckpt", quantization)
    target = Target(
        name="cpu-fp16", dtype="float16", limits={"max_batch_size": 4, "max_input_len": 32, "max_seq_len": 64}
    )
    engine_dir = TorchBackend().compile(checkpoint, target, tmp_path / "engine", {"model_sha": "test"})
    assert "identical" in run_check("engine", str(engine_dir))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [("attention", *map(str, c)) for c in ATTENTION_CASES]
    + [("gemv", *map(str, c)) for c in GEMV_CASES]
    + [("quant", *map(str, c)) for c in QUANT_CASES],
    ids=lambda c: "-".join(c),
)
def test_kernels_match_torch_path_on_cuda(case: tuple[str, ...]) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    out = run_check(*case, device="cuda")
    assert "attention" in out or "gemv" in out or "quant" in out


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [("option", *map(str, c)) for c in QUANT_OPTION_CASES]
    + [("tinygemm_only",), ("compiled",), ("race",), ("race", "1")],
    ids=lambda c: "quant-" + "-".join(c),
)
def test_quant_options_match_torch_path_on_cuda(case: tuple[str, ...]) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    assert "quant option" in run_check(*case, device="cuda", module=QUANT_OPTIONS)
