"""Elementwise steps of the eager passes (the admission prefill, perplexity) as one Inductor kernel each on
CUDA.

Eager, an RMSNorm, a RoPE rotation, a SiLU gate or an FP8 activation quantization is several passes over a
``[tokens, hidden]`` tensor; at thousands of prompt tokens those passes cost more than the GEMMs between
them (bench/results/engine_throughput_gpu_h200.md). The compiled decode step traces the plain functions
itself, and the CPU keeps them eager (Inductor's C++ compile costs minutes on small hosts).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable[..., torch.Tensor])


def on_cuda(fn: F) -> F:
    """``fn`` compiled when called eagerly on CUDA tensors, one graph for every token count: dim 0 of each
    tensor argument of rank >= 2 (the token-major ones: activations, RoPE rows) is dynamic, every other
    dim static. Static inner dims keep the kernels vectorized; ``dynamic=True`` made every dim symbolic,
    and the prefill's elementwise kernels moved 0.5-1.7 TB/s on an H200
    (bench/results/engine_throughput_gpu_h200.md, profile at concurrency 256)."""
    compiled = torch.compile(fn, dynamic=False)

    @functools.wraps(fn)
    def call(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.is_cuda and not torch.compiler.is_compiling():
            for t in (x, *args, *kwargs.values()):
                if isinstance(t, torch.Tensor) and t.dim() >= 2:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            return compiled(x, *args, **kwargs)
        return fn(x, *args, **kwargs)

    return call  # type: ignore[return-value]
