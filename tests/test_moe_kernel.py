"""The MoE decode kernel (``kiln::expert_gemv``) against the torch path, under Triton's interpreter on CPU
(a fresh process per run: the interpreter is chosen when Triton is imported), and on CUDA with ``-m gpu``.

Tolerance: float32 accumulation in a different order than ``F.linear``/``bmm``, outputs rounded to fp16:
within 2e-3 of values of magnitude ~1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent("""
    import sys, torch
    from kiln.engine.torch import moe
    device = torch.device(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    experts, hidden, ffn = 8, 96, 80   # 80 rows: the last 16-row block is partial; 96 < one 256-wide K block
    # dense fp16 experts through the MoE's gather path (decode, 2 tokens x top-2 < 8 experts)
    def stacked(out, inp):
        return moe.StackedExperts("dense", {"weight": torch.randn(experts, out, inp, generator=g) * 0.2},
                                  dtype=torch.float16, device=device)
    layer = moe.MoE((torch.randn(experts, hidden, generator=g) * 0.5).to(device, torch.float16),
                    {"fc": stacked(ffn, hidden), "gate": stacked(ffn, hidden), "proj": stacked(hidden, ffn)},
                    top_k=2, normalize=True, activation=torch.nn.functional.silu)
    assert layer.fc.kernel, "the kernel path must be on"
    x = (torch.randn(2, hidden, generator=g)).to(device, torch.float16)
    got = layer(x, decode=True)
    layer.fc.kernel = layer.gate.kernel = layer.proj.kernel = False
    want = layer(x, decode=True)
    assert (got.float() - want.float()).abs().max().item() < 2e-3, (got - want).abs().max()
    # 8-bit weights dequantized in the kernel: INT8 per-row scales and FP8-style per-expert scales
    w8 = torch.randint(-127, 128, (experts, ffn, hidden), generator=g, dtype=torch.int8).to(device)
    rows = (torch.rand(experts, ffn, generator=g) * 0.01).to(device)
    per_expert = (torch.rand(experts, generator=g) * 0.01).to(device)
    ids = torch.tensor([5, 1, 5], device=device)
    xs = torch.randn(3, hidden, generator=g).to(device, torch.float16)
    for scale, expand in ((rows, lambda s: s[ids][:, :, None]), (per_expert, lambda s: s[ids][:, None, None])):
        ref = torch.bmm((w8[ids].float() * expand(scale)).half().float(), xs.float()[:, :, None])[:, :, 0]
        out = moe.expert_gemv(xs, w8, ids, scale)
        assert (out.float() - ref).abs().max().item() < 2e-3 * max(1.0, ref.abs().max().item())
    print("ok")
""")  # noqa: E501 (the script run in a subprocess, kept as it is)


def _run(device: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, device], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


def test_expert_gemv_matches_the_torch_path_under_the_interpreter() -> None:
    _run("cpu")


@pytest.mark.gpu
def test_expert_gemv_matches_the_torch_path_on_cuda() -> None:
    _run("cuda")
