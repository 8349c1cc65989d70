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


def _cases(device: str) -> list[tuple]:
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    out = []
    for tokens in (7, 300, 4096):  # one graph must serve every token count
        x = rand(tokens, 256)
        angle = rand(tokens, 1, 64, dtype=torch.float32)
        out += [
            (_rms_norm, (x, rand(256), 1e-5)),
            (_rms_norm, (x, rand(256, dtype=torch.float32), 1e-6)),
            (_rotate, (rand(tokens, 4, 64), angle.cos(), angle.sin())),
            (_gate, (x, rand(tokens, 256), "silu")),
            (_gate, (x, rand(tokens, 256), "gelu_tanh")),
            (_fp8_quantize, (x * 40, torch.tensor(0.5, device=device))),
            (_fp8_quantize, (rand(tokens, 512) * 40, torch.tensor(0.5, device=device))),  # its own graph
            (_to_fp8_cache, (x * 40, torch.tensor(0.25, device=device))),
            (_rms_norm_fp8, (x, rand(256), 1e-5, torch.tensor(20.0, device=device))),
            (_gate_fp8, (x, rand(tokens, 256), "silu", torch.tensor(20.0, device=device))),
            (
                _from_fp8_cache,
                ((x * 40).to(torch.float8_e4m3fn), torch.tensor(0.25, device=device), torch.bfloat16),
            ),
        ]
    return out


def test_cpu_calls_stay_eager() -> None:
    """No Inductor compile on CPU: small hosts would pay minutes for it."""
    torch._dynamo.reset()
    counters.clear()
    for fn, args in _cases("cpu"):
        fn(*args)
    assert counters["stats"]["unique_graphs"] == 0


@pytest.mark.gpu
def test_cuda_fused_steps_match_eager_and_compile_once_per_variant() -> None:
    """Each fused step against its eager function (``__wrapped__``) on CUDA: within one bf16 ulp where
    Inductor keeps a float32 intermediate the eager code rounds; FP8 rounding exact but for ties at that
    ulp; and token counts 7..4096 reuse one graph per (function, dtype/inner shape) variant: eleven."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch._dynamo.reset()
    counters.clear()
    for fn, args in _cases("cuda"):
        got, want = fn(*args), fn.__wrapped__(*args)
        assert got.dtype == want.dtype and got.shape == want.shape
        if got.dtype == torch.float8_e4m3fn:
            mismatch = (got.float() != want.float()).float().mean().item()
            assert mismatch < 1e-3, f"{fn.__name__}: {mismatch:.2%} of FP8 values differ"
        else:
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=1e-2)
    assert 0 < counters["stats"]["unique_graphs"] <= 11
