"""Per-request sampling: greedy, temperature, top-k, top-p, each request with its own seeded generator."""

from __future__ import annotations

import torch

from kiln.engine.base import SamplingParams


def new_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator for a sampling request (None for greedy); unseeded requests draw a fresh random seed."""
    if params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token id per row of ``logits [B, vocab]``; greedy rows share one argmax."""
    tokens = torch.argmax(logits, dim=-1)
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.temperature == 0:
            continue
        scores = logits[row].float() / p.temperature
        if 0 < p.top_k < scores.shape[-1]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
            drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= p.top_p  # keep the token that crosses top_p
            scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = torch.softmax(scores, dim=-1)
        tokens[row] = torch.multinomial(probs, 1, generator=generator)[0]
    return tokens
