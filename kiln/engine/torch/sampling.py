"""Per-request sampling on the device: greedy, temperature, top-k, top-p, each seeded request with its own
generator, the whole batch in a fixed number of kernels.

A sampled row draws its token as ``argmax(probs / E)`` with ``E ~ Exp(1)`` per vocabulary entry (the
exponential race, equal in distribution to a categorical draw): the filtering and the race run batched
over every sampled row, and the only per-row work is filling a seeded row's noise from its generator, so a
request's tokens depend on its seed alone, never on the batch it shares (the engine gate's batched ==
single). Unseeded rows draw their noise in one call from the device's default generator.
"""

from __future__ import annotations

import torch

from kiln.engine.base import SamplingParams


def new_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The generator of a seeded sampling request; None for greedy and unseeded ones (they share the
    default)."""
    if params.temperature == 0 or params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """One token id per row of ``logits [B, vocab]``: greedy rows by argmax, sampled rows filtered by their
    own top-k / top-p at their own temperature."""
    tokens = torch.argmax(logits, dim=-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return tokens
    device, vocab = logits.device, logits.shape[-1]
    chosen = [params[i] for i in rows]
    index = torch.tensor(rows, device=device)
    temperature = torch.tensor([p.temperature for p in chosen], device=device)
    scores = logits.index_select(0, index).float() / temperature[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in chosen]
    # top_p 1 disables the filter outright: a cumulative sum can reach 1.0 before the last token in float32
    top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in chosen]
    if min(top_k) < vocab or min(top_p) < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        if min(top_k) < vocab:
            kth = sorted_scores.gather(1, torch.tensor(top_k, device=device)[:, None] - 1)
            sorted_scores = sorted_scores.masked_fill(
                sorted_scores < kth, float("-inf")
            )  # ties with the kth stay
        if min(top_p) < 1.0:
            probs = torch.softmax(sorted_scores, dim=-1)
            drop = (
                probs.cumsum(-1) - probs >= torch.tensor(top_p, device=device)[:, None]
            )  # keep the crossing token
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = scores.scatter(1, order, sorted_scores)
    noise = torch.empty_like(scores)
    unseeded = [j for j, i in enumerate(rows) if generators[i] is None]
    if unseeded:
        part = torch.empty(len(unseeded), vocab, device=device).exponential_()
        noise.index_copy_(0, torch.tensor(unseeded, device=device), part)
    for j, i in enumerate(rows):
        if generators[i] is not None:
            noise[j].exponential_(generator=generators[i])
    # exponential_ may return 0 on some builds; a tiny floor keeps p / E finite (p = 0 stays 0)
    race = torch.softmax(scores, dim=-1) / noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return tokens.index_copy(0, index, torch.argmax(race, dim=-1))
