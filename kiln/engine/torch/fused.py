"""Elementwise steps of the eager passes (the admission prefill, perplexity) as one Inductor kernel each on
CUDA.

Eager, an RMSNorm, a RoPE rotation, a SiLU gate or an FP8 activation quantization is several passes over a
``[tokens, hidden]`` tensor; at thousands of prompt tokens those passes cost more than the GEMMs between
them (bench/results/engine_throughput_gpu_h200.md). But a compiled call costs ~60-130 us of host time
(dynamo's guards and wrappers) where its eager ops cost ~5-10 us a launch, and a small prefill is bound by
the host: one 128-token prompt on a 1B model took 10.4 ms of host time for 1.35 ms of device time, ~80
compiled calls of it (bench/results/engine_gpu_prefill_h200.md). So only calls over ``FUSE_MIN_ELEMENTS``
elements (where the device's time per layer outgrows the host's) take the compiled kernel. The compiled
decode step traces the plain functions itself, and the CPU keeps them eager (Inductor's C++ compile costs
minutes on small hosts).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable[..., torch.Tensor])

# 2048 tokens of a 2048-wide model, 1024 of a 4096-wide one: below it the eager ops' launches cost the host
# less than a compiled call, and the device is idle waiting for the host either way
FUSE_MIN_ELEMENTS = 1 << 22


def on_cuda(fn: F) -> F:
    """``fn`` compiled when called eagerly on CUDA tensors, one graph for every token count: dim 0 of each
    tensor argument of rank >= 2 (the token-major ones: activations, RoPE rows) is dynamic, every other
    dim static. Static inner dims keep the kernels vectorized; ``dynamic=True`` made every dim symbolic,
    and the prefill's elementwise kernels moved 0.5-1.7 TB/s on an H200
    (bench/results/engine_throughput_gpu_h200.md, profile at concurrency 256). Below
    ``FUSE_MIN_ELEMENTS`` elements of ``x`` the call stays eager."""
    compiled = torch.compile(fn, dynamic=False)

    @functools.wraps(fn)
    def call(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.is_cuda and x.numel() >= FUSE_MIN_ELEMENTS and not torch.compiler.is_compiling():
            for t in (x, *args, *kwargs.values()):
                if isinstance(t, torch.Tensor) and t.dim() >= 2:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            return compiled(x, *args, **kwargs)
        return fn(x, *args, **kwargs)

    return call  # type: ignore[return-value]
