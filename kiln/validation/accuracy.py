"""Accuracy of an engine against the unquantized baseline engine of the same target.

Everything is computed from what the :class:`~kiln.engine.base.Engine` protocol exposes (context
logits and greedy generation), so TensorRT-LLM and torch engines are judged by the same code.
Perplexity is token-weighted over rolling windows that fit the engine's sequence limit; KL and top-1
agreement compare the two engines' next-token distributions at every predicted position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from kiln.engine.base import Engine, GenerationRequest, SamplingParams
from kiln.errors import CalibrationDataError


@dataclass(frozen=True)
class AccuracyResult:
    """Accuracy of one engine vs its baseline; KL in nats, rates in [0, 1]."""

    perplexity: float
    baseline_perplexity: float
    ppl_increase_pct: float
    kl_divergence: float
    """Mean KL(baseline || engine) over predicted positions."""
    kl_divergence_p99: float
    top1_agreement: float
    greedy_exact_match: float
    """Fraction of prompts whose greedy continuation equals the baseline's token for token."""
    greedy_prefix_match: float
    """Mean fraction of the baseline's greedy tokens reproduced before the first divergence."""
    num_tokens: int
    num_windows: int
    window: int
    num_prompts: int
    max_new_tokens: int
    task_evals: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class _Totals:
    nll_engine: float = 0.0
    nll_baseline: float = 0.0
    tokens: int = 0
    agree: int = 0
    kl: list[torch.Tensor] = field(default_factory=list)


def rolling_windows(sequence: Sequence[int], window: int) -> list[list[int]]:
    """Windows of at most ``window`` tokens, each starting with the previous one's last token.

    Every token but the first is predicted exactly once (as lm-eval's rolling log-likelihood does), so
    perplexity is token-weighted and no window exceeds the engine's sequence limit.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens (one of context, one to predict), got {window}")
    tokens = list(sequence)
    windows, start = [], 0
    while start < len(tokens) - 1:
        windows.append(tokens[start : start + window])
        start += window - 1
    return windows


def window_stats(
    engine_logits: torch.Tensor, baseline_logits: torch.Tensor, token_ids: Sequence[int]
) -> tuple[float, float, torch.Tensor, int]:
    """Summed NLL (engine, baseline), per-position KL(baseline || engine) and top-1 agreements of one window.

    Position ``i`` predicts ``token_ids[i + 1]``; the last position predicts nothing inside the window
    and is left out so each token is counted once across rolling windows.
    """
    if engine_logits.shape != baseline_logits.shape or engine_logits.shape[0] != len(token_ids):
        raise ValueError(
            f"logits shapes {tuple(engine_logits.shape)} / {tuple(baseline_logits.shape)} do not "
            f"match {len(token_ids)} tokens: the engine and its baseline must share a vocabulary"
        )
    log_e = torch.log_softmax(engine_logits[:-1].float(), dim=-1)
    log_b = torch.log_softmax(baseline_logits[:-1].float(), dim=-1)
    targets = torch.tensor(token_ids[1:], dtype=torch.long).unsqueeze(1)
    nll_e = -log_e.gather(1, targets).sum().item()
    nll_b = -log_b.gather(1, targets).sum().item()
    kl = torch.nn.functional.kl_div(log_e, log_b, reduction="none", log_target=True).sum(-1)
    agree = int((log_e.argmax(-1) == log_b.argmax(-1)).sum().item())
    return nll_e, nll_b, kl, agree


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the shared prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def greedy_match(
    engine: Engine, baseline: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int
) -> tuple[float, float]:
    """(exact match rate, mean prefix match) of the engine's greedy continuations vs the baseline's."""
    if not prompts:
        return math.nan, math.nan
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    requests = [GenerationRequest(list(p), sampling) for p in prompts]
    ours = _generate_batched(engine, requests, batch_size)
    theirs = ours if baseline is engine else _generate_batched(baseline, requests, batch_size)
    exact, prefix = 0, 0.0
    for mine, ref in zip(ours, theirs, strict=True):
        exact += mine.token_ids == ref.token_ids
        prefix += common_prefix(mine.token_ids, ref.token_ids) / max(len(ref.token_ids), 1)
    return exact / len(prompts), prefix / len(prompts)


def _generate_batched(engine: Engine, requests: list[GenerationRequest], batch_size: int) -> list:
    results = []
    for start in range(0, len(requests), batch_size):
        results.extend(engine.generate(requests[start : start + batch_size]))
    return results


def prompts_from(sequences: Sequence[Sequence[int]], count: int, prompt_len: int) -> list[list[int]]:
    """``count`` prompts of ``prompt_len`` tokens taken at evenly spaced offsets of the held-out tokens."""
    flat = [t for seq in sequences for t in seq]
    if len(flat) < prompt_len or count < 1:
        return []
    last_start = len(flat) - prompt_len
    starts = sorted({round(i * last_start / max(count - 1, 1)) for i in range(count)})
    return [flat[s : s + prompt_len] for s in starts]


def evaluate_accuracy(
    engine: Engine,
    baseline: Engine,
    heldout_token_ids: Sequence[Sequence[int]],
    *,
    window: int,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    task_evals: dict[str, object] | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> AccuracyResult:
    """Perplexity (engine and baseline), KL, top-1 agreement and greedy match of ``engine`` vs ``baseline``.

    ``window`` is the longest context either engine accepts (its ``max_seq_len``); ``prompts`` are the
    token-id prompts for the greedy comparison; ``on_window(done, total)`` reports progress.
    """
    windows = [w for seq in heldout_token_ids for w in rolling_windows(seq, window)]
    if not windows:
        raise CalibrationDataError(
            "held-out set has no sequence of 2+ tokens: raise evaluation.heldout_tokens "
            "or check the evaluation.heldout source"
        )
    totals = _Totals()
    for index, tokens in enumerate(windows):
        engine_logits = engine.logits(tokens)
        baseline_logits = engine_logits if baseline is engine else baseline.logits(tokens)
        nll_e, nll_b, kl, agree = window_stats(engine_logits, baseline_logits, tokens)
        totals.nll_engine += nll_e
        totals.nll_baseline += nll_b
        totals.kl.append(kl)
        totals.agree += agree
        totals.tokens += len(tokens) - 1
        if on_window:
            on_window(index + 1, len(windows))
    ppl = math.exp(totals.nll_engine / totals.tokens)
    ppl_base = math.exp(totals.nll_baseline / totals.tokens)
    kl_all = torch.cat(totals.kl).double()
    exact, prefix = greedy_match(engine, baseline, prompts, max_new_tokens, batch_size)
    return AccuracyResult(
        perplexity=ppl,
        baseline_perplexity=ppl_base,
        ppl_increase_pct=100.0 * (ppl - ppl_base) / ppl_base,
        kl_divergence=float(kl_all.mean()),
        kl_divergence_p99=float(torch.quantile(kl_all, 0.99)),
        top1_agreement=totals.agree / totals.tokens,
        greedy_exact_match=exact,
        greedy_prefix_match=prefix,
        num_tokens=totals.tokens,
        num_windows=len(windows),
        window=window,
        num_prompts=len(prompts),
        max_new_tokens=max_new_tokens,
        task_evals=dict(task_evals or {}),
    )
