"""The sampler's cost per decode step on one CUDA GPU: ``sample()`` (top-k thresholds by ``torch.topk``, or
the sort where a row has top-p alone) against the sort-based filter + the same race (run by hand; not a
test).

A sampled step of 256 rows at a 128,256 vocabulary took 12.35 ms against a greedy step's 7.21 ms on an H200
(Llama-3.1-8B shape, FP8; bench/results/engine_throughput_gpu_h200.md), the difference the filter's sort of
every full row. Here ``sample()`` alone is timed on random logits for 1, 64 and 256 rows: temperature only,
top-p 0.95, top-k 50 and both, each against ``sort_filter`` + the same race. CUDA events around 20 calls
after 3 of warm-up. Writes ``engine_gpu_sampler.json`` and ``.md``.

    python bench/engine_gpu_sampler.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kiln.engine.base import SamplingParams  # noqa: E402
from kiln.engine.torch import sampling  # noqa: E402

VOCAB = 128_256
FILTERS = {
    "temperature 0.8": {"temperature": 0.8},
    "top-p 0.95": {"temperature": 0.8, "top_p": 0.95},
    "top-k 50": {"temperature": 0.8, "top_k": 50},
    "top-k 50 + top-p 0.95": {"temperature": 0.8, "top_k": 50, "top_p": 0.95},
}


def _sorted_then_race(logits: torch.Tensor, params: list[SamplingParams], streams: list) -> torch.Tensor:
    """What the device path ran before: every row sorted to filter it, then the race."""
    vocab = logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], device=logits.device)
    scores = logits.float() / temperature[:, None]
    top_k, top_p = sampling.filter_bounds(params, vocab)
    if min(top_k) < vocab or min(top_p) < 1.0:
        scores = sampling.sort_filter(scores, top_k, top_p)
    return sampling._race(scores, streams)


def _time_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(begin.elapsed_time(end) / repeats, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("engine_gpu_sampler needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for batch in (1, 64, 256):
        # a language model's spread: a few likely tokens over a long tail
        logits = (torch.randn(batch, VOCAB, device="cuda", generator=g) * 3).to(torch.bfloat16)
        for name, fields in FILTERS.items():
            params = [SamplingParams(max_new_tokens=1, seed=i, **fields) for i in range(batch)]
            streams = [sampling.new_generator(p, logits.device) for p in params]
            now = _time_ms(lambda: sampling.sample(logits, params, streams))  # noqa: B023
            before = _time_ms(lambda: _sorted_then_race(logits, params, streams))  # noqa: B023
            rows.append({"rows": batch, "filter": name, "sample_ms": now, "sort_then_race_ms": before})
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    result = {"device": device, "torch": torch.__version__, "vocab": VOCAB, "rows": rows}
    (args.out / "engine_gpu_sampler.json").write_text(json.dumps(result, indent=2))
    table = [
        "| rows | filter | sample() ms (top-k thresholds or sort, + race) | sort filter + race ms (before) |",
        "| --- | --- | --- | --- |",
    ] + [f"| {r['rows']} | {r['filter']} | {r['sample_ms']} | {r['sort_then_race_ms']} |" for r in rows]
    (args.out / "engine_gpu_sampler.md").write_text(
        f"# the sampler per decode step ({result['device']}, torch {result['torch']})\n\n"
        f"Command: `python bench/engine_gpu_sampler.py --out $OUT`; random bf16 logits (scale 3), vocabulary "
        f"{VOCAB:,}, every row seeded; CUDA events over 20 calls after 3 of warm-up.\n\n"
        + "\n".join(table)
        + "\n"
    )
    print("\n".join(table))


if __name__ == "__main__":
    main()
