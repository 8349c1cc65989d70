"""Per-request sampling on the device: greedy, temperature, top-k, top-p, each seeded request with its own
random stream, the whole batch in a fixed number of kernels.

A sampled row draws its token as ``argmax(scores + G)`` with ``G`` Gumbel noise per vocabulary entry (the
Gumbel-max race, equal in distribution to a categorical draw from ``softmax(scores)``): the filtering and the
race run batched over every sampled row. On CUDA one Triton kernel runs the race for every row, its noise
from Philox keyed by the row's seed and its draw counter, so a seeded request's tokens depend on its seed
alone, never on the batch it shares (the engine gate's batched == single), and no per-row launch or host
work is left (with a ``torch.Generator`` draw per seeded row, a step of 256 sampled rows took 13.8 ms
against a greedy step's 7.6 ms on an H200, bench/results/engine_throughput_gpu_h200.md). Unseeded rows take
their Philox keys from the default generator. Elsewhere (CPU) a seeded row fills its noise from its own
``torch.Generator``.

The top-k / top-p filter gives the race a per-row threshold ``t`` (the kept set is ``score >= t``), so no
filtered copy of the scores is written. Where every filtered row has a top-k of at most ``TOPK_LIMIT``,
``torch.topk`` of the widest k gives it: the k-th score (its ties stay, as the sort keeps them), and top-p
decided over those k in order. Other rows (top-p alone, or a wide k) sort the whole row (``sort_filter``,
the CPU path too). A sort-free radix-select kernel over whole rows, tried before, measured slower than the
sort on an H200 at 1, 64 and 256 rows (bench/results/engine_gpu_sampler_h200_radix.md) and was removed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kiln.engine.base import SamplingParams
from kiln.engine.torch import kernels

log = logging.getLogger(__name__)
# the widest top-k the device filter takes by torch.topk (its cost grows with k; past it rows sort)
TOPK_LIMIT = 1024

if kernels.triton is not None:
    import triton.language as tl
    from triton.language.random import uint_to_uniform_float

    @kernels.triton.jit
    def _race_kernel(SCORES, THRESH, SEEDS, DRAWS, OUT, V, stride, BLOCK_V: tl.constexpr):
        """One row per program: the index of ``max(score + Gumbel)`` over the row's entries with score >= its
        threshold, the noise of entry ``v`` Philox(key = the row's seed, counter = (v, draw)), so no noise
        tensor (nor a filtered copy of the scores) is written or read."""
        row = tl.program_id(0)
        seed = tl.load(SEEDS + row)
        draw = tl.load(DRAWS + row).to(tl.uint32)
        thresh = tl.load(THRESH + row)
        best = tl.full([BLOCK_V], float("-inf"), tl.float32)
        where = tl.zeros([BLOCK_V], tl.int32)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            score = tl.load(SCORES + row * stride + offs, mask=offs < V, other=float("-inf"))
            score = tl.where(score < thresh, float("-inf"), score)
            c0 = offs.to(tl.uint32)
            zero = c0 * 0
            bits, _, _, _ = tl.philox(seed, c0, zero + draw, zero, zero)
            # u in [0, 1): u = 0 gives -inf (never drawn), as a zero-probability token
            value = score - tl.log(-tl.log(uint_to_uniform_float(bits)))
            better = value > best
            best = tl.where(better, value, best)
            where = tl.where(better, offs, where)
        top = tl.max(best, axis=0)
        tl.store(OUT + row, tl.min(tl.where(best == top, where, V), axis=0).to(tl.int64))


@dataclass
class PhiloxStream:
    """A seeded request's random stream for the device race: its seed and how many draws it has made."""

    seed: int
    draws: int = 0


def race_on_device(device: torch.device) -> bool:
    """Whether the race runs as one Triton kernel here (CUDA; CPU only under the interpreter, for tests)."""
    if kernels.triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and kernels.interpreting())


Stream = torch.Generator | PhiloxStream


def new_generator(params: SamplingParams, device: torch.device) -> Stream | None:
    """The random stream of a seeded sampling request; None for greedy and unseeded ones (they share the
    default generator)."""
    if params.temperature == 0 or params.seed is None:
        return None
    if race_on_device(device):
        seed = params.seed & (2**64 - 1)  # any int: its low 64 bits, as a signed int64 for the kernel
        return PhiloxStream(seed - 2**64 if seed >= 2**63 else seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[Stream | None]
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
    top_k, top_p = filter_bounds(chosen, vocab)
    filtered = min(top_k) < vocab or min(top_p) < 1.0
    if race_on_device(device):
        thresholds = None
        if filtered and max(top_k) <= TOPK_LIMIT:
            thresholds = topk_thresholds(scores, top_k, top_p)
        elif filtered:
            scores = sort_filter(scores, top_k, top_p)
        return tokens.index_copy(0, index, _race(scores, [generators[i] for i in rows], thresholds))
    if filtered:
        scores = sort_filter(scores, top_k, top_p)
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


def filter_bounds(params: list[SamplingParams], vocab: int) -> tuple[list[int], list[float]]:
    """Each row's top-k and top-p as the filters take them: top_k ``vocab`` and top_p ``inf`` where a row
    has none (top_p 1 disables the filter outright: a cumulative sum can reach 1.0 before the last token in
    float32)."""
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in params]
    return top_k, top_p


def sort_filter(scores: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """``scores [n, vocab]`` with the entries outside each row's top-k, then top-p, set to -inf, by a sort of
    every row (the CPU path; top_k ``vocab`` and top_p ``inf`` leave a row alone)."""
    device, vocab = scores.device, scores.shape[-1]
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
    return scores.scatter(1, order, sorted_scores)


def topk_thresholds(scores: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Per row of ``scores [n, vocab]`` the score ``t`` whose kept set ``score >= t`` is the row's top-k, then
    top-p, from ``torch.topk`` of the widest k (every ``top_k`` a real one, at most the vocabulary).

    It keeps what ``sort_filter`` keeps but for ties: where equal scores straddle the top-p boundary the sort
    keeps an arbitrary part of the tie and this the whole tie; and where the k-th score's ties make the kept
    set larger than k, top-p weighs the k best (the sort all of them)."""
    device = scores.device
    values = torch.topk(scores, max(top_k), dim=-1).values  # descending
    k = torch.tensor(top_k, device=device)[:, None]
    floor = values.gather(1, k - 1)[:, 0]
    if min(top_p) < 1.0:
        ranked = values.masked_fill(torch.arange(values.shape[1], device=device)[None, :] >= k, float("-inf"))
        probs = torch.softmax(ranked, dim=-1)
        keep = probs.cumsum(-1) - probs < torch.tensor(top_p, device=device)[:, None]  # a prefix of each row
        last = keep.sum(-1, keepdim=True).clamp_min(1) - 1  # the crossing token's rank
        floor = torch.maximum(floor, values.gather(1, last)[:, 0])
    return floor


def _block(vocab: int, widest: int) -> int:
    """A kernel's vocabulary tile: ``widest``, or the power of two covering a smaller vocabulary (tests' tiny
    rows: the interpreter's time grows with the tile, not with the vocabulary)."""
    return min(widest, max(16, kernels.triton.next_power_of_2(vocab)))


def _race(
    scores: torch.Tensor, streams: list[Stream | None], thresholds: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row of ``scores [n, vocab]`` (float32) by the Triton race over the entries at or above
    the row's threshold (all where None); each seeded stream advances by one draw."""
    n, vocab = scores.shape
    seeds = [0] * n
    draws = [0] * n
    unseeded = []
    for j, stream in enumerate(streams):
        if isinstance(stream, PhiloxStream):
            seeds[j], draws[j] = stream.seed, stream.draws
            stream.draws += 1
        else:
            unseeded.append(j)
    keys = torch.tensor([seeds, draws], dtype=torch.long).to(scores.device, non_blocking=True)
    if unseeded:
        fresh = torch.randint(-(2**63), 2**63 - 1, (len(unseeded),), device=scores.device)
        keys[0].index_copy_(0, torch.tensor(unseeded, device=scores.device), fresh)
    if thresholds is None:
        thresholds = torch.full((n,), float("-inf"), device=scores.device)
    out = torch.empty(n, dtype=torch.long, device=scores.device)
    scores = scores.contiguous()
    _race_kernel[(n,)](
        scores,
        thresholds,
        keys[0],
        keys[1],
        out,
        vocab,
        scores.stride(0),
        BLOCK_V=_block(vocab, 1024),
        num_warps=4,
    )
    return out
