"""The batched device sampler (``kiln.engine.torch.sampling``): its draws follow the filtered softmax, its
filters keep what top-k / top-p define, and a seeded row's tokens do not depend on its batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln.engine.base import SamplingParams
from kiln.engine.torch.sampling import new_generator, sample

ROOT = Path(__file__).resolve().parents[1]
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0])


def _frequencies(params: SamplingParams, draws: int = 40_000) -> torch.Tensor:
    torch.manual_seed(0)
    rows = LOGITS.repeat(draws, 1)
    tokens = sample(rows, [params] * draws, [None] * draws)  # unseeded: one batched noise draw
    return torch.bincount(tokens, minlength=LOGITS.numel()).float() / draws


def test_draws_follow_the_tempered_softmax() -> None:
    freq = _frequencies(SamplingParams(temperature=0.7))
    expected = torch.softmax(LOGITS / 0.7, dim=-1)
    assert (freq - expected).abs().max() < 0.01, (freq, expected)


def test_top_k_and_top_p_keep_exactly_their_tokens_renormalized() -> None:
    freq = _frequencies(SamplingParams(temperature=1.0, top_k=3))
    expected = torch.zeros_like(LOGITS)
    expected[:3] = torch.softmax(LOGITS[:3], dim=-1)
    assert (freq[3:] == 0).all() and (freq - expected).abs().max() < 0.01
    probs = torch.softmax(LOGITS, dim=-1)  # 0.39, 0.24, 0.14, ...: the nucleus of 0.6 is the first two tokens
    freq = _frequencies(SamplingParams(temperature=1.0, top_p=0.6))
    nucleus = probs[:2] / probs[:2].sum()
    assert (freq[2:] == 0).all() and (freq[:2] - nucleus).abs().max() < 0.01


def test_greedy_rows_and_degenerate_filters_are_argmax() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    params = [
        SamplingParams(),
        SamplingParams(temperature=3.0, top_k=1, seed=1),
        SamplingParams(temperature=3.0, top_p=1e-6, seed=2),
        SamplingParams(),
        SamplingParams(temperature=3.0, top_k=1),
    ]
    generators = [new_generator(p, logits.device) for p in params]
    assert torch.equal(sample(logits, params, generators), logits.argmax(-1))


def test_seeded_row_is_independent_of_its_batch() -> None:
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(2))
    logits[5] = logits[0]
    mixed = [
        SamplingParams(temperature=1.3, top_p=0.9, seed=7),
        SamplingParams(),
        SamplingParams(temperature=0.8, top_k=20),
        SamplingParams(temperature=1.0, top_k=40, top_p=0.8, seed=8),
        SamplingParams(temperature=2.0),
        SamplingParams(temperature=1.3, top_p=0.9, seed=7),
    ]
    together = sample(logits, mixed, [new_generator(p, logits.device) for p in mixed])
    for row in (0, 3, 5):
        alone = sample(logits[row : row + 1], [mixed[row]], [new_generator(mixed[row], logits.device)])
        assert together[row] == alone[0]
    assert together[0] == together[5]  # same logits, same seed: same token
    draws = {
        int(sample(logits[:1], [p], [new_generator(p, logits.device)])[0])
        for p in (SamplingParams(temperature=5.0, seed=s) for s in range(12))
    }
    assert len(draws) > 1  # different seeds do sample different tokens


def _race_check(name: str, device: str) -> str:
    pytest.importorskip("triton", reason="Triton is not installed: the race kernel is not used here")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env["KILN_KERNEL_DEVICE"] = device
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fixtures.race_checks", name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("name", ["distribution", "seeded", "thresholds"])
def test_device_race_under_the_interpreter(name: str) -> None:
    assert "race" in _race_check(name, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["distribution", "seeded", "thresholds"])
def test_device_race_on_cuda(name: str) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    assert "race" in _race_check(name, "cuda")
