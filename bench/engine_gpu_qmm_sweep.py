"""Where the integer-weight kernels' split-K / M-tiled configs go wrong on a GPU (run by hand; not a test).

On the H200 (2026-12-03) ``tests/fixtures/quant_option_checks.py race 1`` found configs of the tensor-core
``_qmm_kernel`` off the torch path (by 9% to 8x the output range) that pass under the interpreter; the
build's race drops such configs, so no engine uses them, but the cause is open. This sweep runs one
Llama-3.1-8B 4096 x 4096 weight per kind through ``kernels.qmatmul`` over rows x SPLIT_K x BLOCK_M x
num_stages and records each config's error against ``QuantLinear``'s torch path, so the pattern shows
which parameter breaks it. Writes ``qmm_sweep.json`` into ``--out``.

    python bench/engine_gpu_qmm_sweep.py --out $OUT
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kiln.engine.torch import kernels  # noqa: E402
from kiln.engine.torch.linear import QuantLinear, _random_quant  # noqa: E402


def sweep(device: torch.device, n: int = 4096, k: int = 4096) -> list[dict]:
    out = []
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False  # as the checks' reference
    g = torch.Generator(device=device).manual_seed(0)
    for kind, group in (("int8_wo", 0), ("int4", 128)):
        tensors = _random_quant(kind, n, k, group or 128, device)
        key = kernels.quant_key(*kernels.quant_shape(kind, tensors["weight"], tensors["weight_scale"]))
        reference = QuantLinear(kind, tensors, dtype=torch.bfloat16, device=device, scaled_mm=False)
        for m, split, block_m, stages in itertools.product((1, 64, 512), (1, 4), (16, 64), (1, 3)):
            if block_m > max(m, 16):
                continue
            x = torch.randn(m, k, generator=g, device=device).to(torch.bfloat16)
            config = [kernels.QMM, 64, 128, 4, stages, split, block_m]
            choice = dict.fromkeys(("m1", "m16", "m64", "large"), config)
            try:
                fast = QuantLinear(
                    kind, tensors, dtype=torch.bfloat16, device=device, scaled_mm=False, gemv={key: choice}
                )
                got, want = fast(x).float(), reference(x).float()
                err = round(((got - want).abs().max() / want.abs().max()).item(), 5)
            except Exception as exc:  # a config that does not compile here
                err = f"{type(exc).__name__}: {exc}"[:200]
            out.append(
                {"kind": kind, "m": m, "split_k": split, "block_m": block_m, "stages": stages, "err": err}
            )
            print(out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    rows = sweep(torch.device("cuda"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qmm_sweep.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
