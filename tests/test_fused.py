"""The eager passes' elementwise steps fused by Inductor on CUDA (``kiln.engine.torch.fused``)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from kiln.engine.torch.linear import _fp8_quantize
from kiln.engine.torch.model import (
    _from_fp8_cache,
    _gate,
    _gate_fp8,
    _rms_norm,
    _rms_norm_fp8,
    _rotate,
    _to_fp8_cache,
)


def _cases(device: str, token_counts: tuple[int, ...] = (4096, 5000, 8192)) -> list[tuple]:
    """Every fused step at each token count; 1,024 elements a token, so the default counts are all over
    ``FUSE_MIN_ELEMENTS`` (compiled on CUDA)."""
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    out = []
    for tokens in token_counts:  # one graph must serve every token count
        x = rand(tokens, 1024)
        angle = rand(tokens, 1, 64, dtype=torch.float32)
        out += [
            (_rms_norm, (x, rand(1024), 1e-5)),
            (_rms_norm, (x, rand(1024, dtype=torch.float32), 1e-6)),
            (_rotate, (rand(tokens, 16, 64), angle.cos(), angle.sin())),
            (_gate, (x, rand(tokens, 1024), "silu")),
            (_gate, (x, rand(tokens, 1024), "gelu_tanh")),
            (_fp8_quantize, (x * 40, torch.tensor(0.5, device=device))),
            (_fp8_quantize, (rand(tokens, 2048) * 40, torch.tensor(0.5, device=device))),  # its own graph
            (_to_fp8_cache, (x * 40, torch.tensor(0.25, device=device))),
            (_rms_norm_fp8, (x, rand(1024), 1e-5, torch.tensor(20.0, device=device))),
            (_gate_fp8, (x, rand(tokens, 1024), "silu", torch.tensor(20.0, device=device))),
            (
                _from_fp8_cache,
                ((x * 40).to(torch.float8_e4m3fn), torch.tensor(0.25, device=device), torch.bfloat16),
            ),
        ]
    return out


def _fp8_steps_off(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference of two e4m3 tensors in units of e4m3 spacing at the reference's magnitude."""
    want = want.float()
    spacing = 2.0 ** (torch.floor(torch.log2(want.abs().clamp_min(2.0**-6))) - 3)  # 2^-9 subnormal
    return ((got.float() - want).abs() / spacing).max().item()


def test_cpu_calls_stay_eager() -> None:
    """No Inductor compile on CPU, at any size: small hosts would pay minutes for it."""
    torch._dynamo.reset()
    counters.clear()
    for fn, args in _cases("cpu", token_counts=(7, 4096)):
        fn(*args)
    assert counters["stats"]["unique_graphs"] == 0


@pytest.mark.gpu
def test_cuda_fused_steps_match_eager_and_compile_once_per_variant() -> None:
    """Each fused step against its eager function (``__wrapped__``) on CUDA: within one bf16 ulp where
    Inductor keeps a float32 intermediate the eager code rounds; FP8 rounding exact but for ties at that
    ulp, and for the norm and gate fused with the quantization (their bf16 result is never rounded before
    the FP8 one: ~1.5% of values one e4m3 step apart, measured on an H200); token counts 4096..8192 reuse
    one graph per (function, dtype/inner shape) variant: eleven. Calls under ``FUSE_MIN_ELEMENTS`` stay
    eager: they are bound by the host, which a compiled call costs more."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch._dynamo.reset()
    counters.clear()
    for fn, args in _cases("cuda", token_counts=(7, 300)):
        fn(*args)
    assert counters["stats"]["unique_graphs"] == 0
    for fn, args in _cases("cuda"):
        got, want = fn(*args), fn.__wrapped__(*args)
        assert got.dtype == want.dtype and got.shape == want.shape
        if got.dtype == torch.float8_e4m3fn:
            mismatch = (got.float() != want.float()).float().mean().item()
            fused_rounding = fn in (_rms_norm_fp8, _gate_fp8)
            assert mismatch < (0.05 if fused_rounding else 1e-3), f"{fn.__name__}: {mismatch:.2%} differ"
            assert _fp8_steps_off(got, want) <= 1, f"{fn.__name__}: off by more than one e4m3 step"
        else:
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=1e-2)
    assert 0 < counters["stats"]["unique_graphs"] <= 11
