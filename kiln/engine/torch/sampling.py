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

The top-k / top-p filter on the device is a sort-free threshold: one Triton kernel finds per row the score
``t`` whose kept set ``score >= t`` is the row's top-k then top-p, by radix selects over the order-preserving
uint32 image of the scores (a count a bucket for top-k, a mass ``exp(s - max)`` a bucket for top-p, the
most significant digit first), and the race treats scores below ``t`` as -inf, so no filtered copy is
written. The sort of every full row it replaces (then softmax, cumsum, masked_fill, scatter) made a step of
256 sampled rows at a 128,256 vocabulary take 12.35 ms against a greedy step's 7.21 ms on an H200. Where
equal scores straddle the top-p boundary the kernel keeps the whole tie (the sort an arbitrary part of it).
The CPU path still sorts (``sort_filter``), and so does a device where the kernel fails a one-time probe
against the sort (``thresholds_work``: a compiler that rejects or miscompiles it costs speed, not requests).
Its first H200 compile was rejected (a constexpr rebound in an unrolled loop, fixed since); its speed there
is not measured yet (``bench/engine_gpu_sampler.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kiln.engine.base import SamplingParams
from kiln.engine.torch import kernels

log = logging.getLogger(__name__)
_THRESHOLDS_OK: dict[str, bool] = {}  # device -> whether the threshold kernel passed its probe there

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

    @kernels.triton.jit
    def _ordered_key(score):
        """The uint32 image of a float32 that orders as the float does: sign bit flipped for positives, all
        bits for negatives (-inf is 0x007FFFFF, +inf 0xFF800000)."""
        bits = score.to(tl.uint32, bitcast=True)
        return tl.where(bits >= 0x80000000, ~bits, bits | 0x80000000)

    @kernels.triton.jit
    def _key_score(key):
        """The float32 of an ordered key; keys below that of -inf (negative NaNs, never a real threshold)
        read as -inf."""
        bits = tl.where(key >= 0x80000000, key & 0x7FFFFFFF, ~key)
        return tl.where(key <= 0x007FFFFF, float("-inf"), bits.to(tl.float32, bitcast=True))

    @kernels.triton.jit
    def _select(
        SCORES,
        row,
        stride,
        V,
        floor,
        top,
        target,
        MASS: tl.constexpr,
        BLOCK_V: tl.constexpr,
        RADIX: tl.constexpr,
    ):
        """The largest ordered key whose entries at or above it (among those with key >= ``floor``) weigh
        ``target`` or more, by radix select, the most significant digit first: each pass weighs the entries
        that match the prefix fixed so far in each bucket of the next digit and fixes the digit of the bucket
        where the weight from the top reaches ``target``. The weight of an entry is 1 (top-k: ``target`` = k
        gives the k-th largest score) or with ``MASS`` ``exp(s - top)`` (top-p's crossing score), float32
        sums either way (counts exact to 2^24 entries)."""
        BUCKETS: tl.constexpr = 1 << RADIX
        # bucket j holds digit BUCKETS - 1 - j, so a plain cumsum over j weighs from the top
        buckets = tl.arange(0, BUCKETS)
        prefix = tl.full([], 0, tl.uint32)
        above = tl.full([], 0.0, tl.float32)
        for i in tl.static_range(32 // RADIX):
            # a plain name: Triton's compiler refuses to rebind a constexpr in an unrolled loop (the
            # interpreter allows it; found on an H200)
            shift = 32 - RADIX * (i + 1)
            weights = tl.zeros([BUCKETS], tl.float32)
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                score = tl.load(SCORES + row * stride + offs, mask=offs < V, other=float("-inf"))
                key = _ordered_key(score)
                # the prefix has zeros in the digit at shift: a match leaves only that digit
                live = (offs < V) & (key >= floor) & (((key ^ prefix) >> shift) < BUCKETS)
                if MASS:
                    weight = tl.where(live, tl.exp(score - top), 0.0)
                else:
                    weight = tl.where(live, 1.0, 0.0)
                j = (BUCKETS - 1 - ((key >> shift) & (BUCKETS - 1))).to(tl.int32)
                hit = (j[:, None] == buckets[None, :]) & live[:, None]
                weights += tl.sum(tl.where(hit, weight[:, None], 0.0), axis=0)
            cum = above + tl.cumsum(weights, axis=0)
            # no bucket reaching the target (float32 rounding near the end) takes the lowest: keeps more
            pick = tl.minimum(tl.sum((cum < target).to(tl.int32), axis=0), BUCKETS - 1)
            above += tl.sum(tl.where(buckets < pick, weights, 0.0), axis=0)
            prefix = prefix | ((BUCKETS - 1 - pick).to(tl.uint32) << shift)
        return prefix

    @kernels.triton.jit
    def _threshold_kernel(SCORES, K, P, THRESH, V, stride, BLOCK_V: tl.constexpr, RADIX: tl.constexpr):
        """One row per program: the score ``t`` whose kept set ``score >= t`` is the row's top-k (ties with
        the k-th stay), then the top-p of those (the crossing token and every score equal to it stay);
        -inf where the row has no filter. No sort: radix selects over the row, a few passes each."""
        row = tl.program_id(0)
        k = tl.load(K + row)
        p = tl.load(P + row)
        floor = tl.full([], 0, tl.uint32)
        if k < V:
            floor = _select(SCORES, row, stride, V, floor, 0.0, k.to(tl.float32), False, BLOCK_V, RADIX)
        if p < 1.0:
            best = tl.full([BLOCK_V], float("-inf"), tl.float32)
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                best = tl.maximum(
                    best, tl.load(SCORES + row * stride + offs, mask=offs < V, other=float("-inf"))
                )
            top = tl.max(best, axis=0)
            total = tl.zeros([BLOCK_V], tl.float32)
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                score = tl.load(SCORES + row * stride + offs, mask=offs < V, other=float("-inf"))
                live = (offs < V) & (_ordered_key(score) >= floor)
                total += tl.where(live, tl.exp(score - top), 0.0)
            target = p * tl.sum(total, axis=0)
            floor = _select(SCORES, row, stride, V, floor, top, target, True, BLOCK_V, RADIX)
        tl.store(THRESH + row, _key_score(floor))


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
        if filtered and thresholds_work(device):
            thresholds = _thresholds(scores, top_k, top_p)
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


def thresholds_work(device: torch.device) -> bool:
    """Whether the threshold kernel compiles here and keeps exactly what ``sort_filter`` keeps on a probe
    (top-k, top-p and both over random rows); checked once per device. Where it does not, filtered rows
    take the sort (correct, slower) and a warning says why: the kernel is new, and a Triton compiler that
    rejects or miscompiles it must cost speed, never a request."""
    key = str(device)
    if key not in _THRESHOLDS_OK:
        g = torch.Generator().manual_seed(0)
        scores = (torch.randn(4, 3000, generator=g) * 3).to(device)
        top_k, top_p = [3000, 20, 3000, 50], [float("inf"), float("inf"), 0.9, 0.8]
        try:
            kept = scores >= _thresholds(scores, top_k, top_p)[:, None]
            ok = torch.equal(kept, sort_filter(scores, top_k, top_p) > float("-inf"))
            why = "its kept sets differ from the sort's on the probe"
        except Exception as exc:  # a compiler error names itself; the sort path still serves
            ok, why = False, f"{type(exc).__name__}: {str(exc)[:300]}"
        if not ok:
            log.warning("sampling on %s: top-k/top-p threshold kernel not used (%s); rows sort", key, why)
        _THRESHOLDS_OK[key] = ok
    return _THRESHOLDS_OK[key]


def _block(vocab: int, widest: int) -> int:
    """A kernel's vocabulary tile: ``widest``, or the power of two covering a smaller vocabulary (tests' tiny
    rows: the interpreter's time grows with the tile, not with the vocabulary)."""
    return min(widest, max(16, kernels.triton.next_power_of_2(vocab)))


def _thresholds(
    scores: torch.Tensor, top_k: list[int], top_p: list[float], radix: int | None = None
) -> torch.Tensor:
    """Per row of ``scores [n, vocab]`` (float32) the score ``t`` whose kept set ``score >= t`` is the row's
    top-k then top-p (-inf: no filter), by one Triton kernel (``_threshold_kernel``), no sort.

    It keeps what ``sort_filter`` keeps with two differences: where equal scores straddle the top-p
    boundary the sort keeps an arbitrary part of the tie and this the whole tie; and the crossing is decided
    on float32 mass sums in another order than the sort's float32 cumsum, so the two can differ where that
    rounding decides the crossing (a cumulative mass within float32 rounding of top_p).

    ``radix`` bits a pass: 4 on a GPU (16 buckets a pass keep the one-hot tile small), 8 under the
    interpreter (half the passes: a pass costs ~10 ms a row there, whatever its width)."""
    if radix is None:
        radix = 8 if kernels.interpreting() else 4
    n, vocab = scores.shape
    k = torch.tensor(top_k, dtype=torch.int32).to(scores.device, non_blocking=True)
    p = torch.tensor(top_p, dtype=torch.float32).to(scores.device, non_blocking=True)
    out = torch.empty(n, dtype=torch.float32, device=scores.device)
    scores = scores.contiguous()
    block = _block(vocab, 512)
    stride = scores.stride(0)
    _threshold_kernel[(n,)](scores, k, p, out, vocab, stride, BLOCK_V=block, RADIX=radix, num_warps=4)
    return out


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
