"""Where an admission prefill's time goes on one CUDA GPU: host (Python, launches) against device (run by
hand; not a test).

Over HTTP a prefill of 32 prompts of 128 tokens took 26-33 ms from step start to first token on an H200,
and a single one 20 ms, for a 1B model whose GEMMs at 4,096 tokens take a few ms
(bench/results/serve_gpu_h200.md). This bench separates the parts, on a RANDOM-WEIGHT Llama-3.2-1B-shaped
bf16 engine built as ``bench/engine_gpu.py`` builds it, for ``n`` prompts of 128 tokens
(n = 1, 8, 32, 64), each timed alone on an idle device:

- ``host_ms``: until ``DecoderModel.prefill`` returns (what Python and the launches cost; the device runs
  behind it);
- ``wall_ms``: until the device is done too;
- ``gpu_ms``: CUDA events around the call (the same as ``wall_ms`` when the device waits for the host);
- ``kernel_ms``: the kernels' own time, from a profile of one call (what the device needed);
- ``admit_ms``: the scheduler's whole admission (``Scheduler.step`` with n queued requests: prefill, the
  first tokens' sampling, their trip to the host), as a served request's TTFT sees it.

The profiles' tables (host's top ops by self CPU time) of n = 1 and n = 32 are kept. Writes
``engine_gpu_prefill.json`` and ``.md`` (and the profile tables) into ``--out``.

    python bench/engine_gpu_prefill.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import engine_gpu  # noqa: E402

LENGTH = 128


def _time_prefill(engine, n: int, repeats: int) -> dict:
    prompts = engine_gpu.prompts(n, LENGTH, seed=n)
    tokens = torch.tensor([t for p in prompts for t in p], device=engine.device)
    lengths = [LENGTH] * n
    host, wall, gpu = [], [], []
    for i in range(repeats + 2):
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        begin.record()
        with torch.inference_mode():
            engine.model.prefill(tokens, engine.cache, list(range(n)), last_only=True, lengths=lengths)
        end.record()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i >= 2:  # the first calls compile the fused steps for this shape
            host.append(1e3 * (t1 - t0))
            wall.append(1e3 * (t2 - t0))
            gpu.append(begin.elapsed_time(end))
    return {
        "host_ms": round(statistics.median(host), 2),
        "wall_ms": round(statistics.median(wall), 2),
        "gpu_ms": round(statistics.median(gpu), 2),
    }


def _time_admission(engine, n: int, repeats: int) -> float:
    from kiln.engine.base import GenerationRequest, SamplingParams

    prompts = engine_gpu.prompts(n, LENGTH, seed=100 + n)
    times = []
    for i in range(repeats + 1):
        scheduler = engine.scheduler()
        for p in prompts:
            scheduler.add(GenerationRequest(p, SamplingParams(max_new_tokens=1)))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        scheduler.step()  # admits all n (they fit max_num_tokens), each emits its first (and last) token
        if i:
            times.append(1e3 * (time.perf_counter() - t0))
        assert not scheduler.has_work
    return round(statistics.median(times), 2)


def _profile(engine, n: int, out: Path) -> float:
    """The kernels' time of one prefill of ``n`` prompts, ms (its table kept for n = 1 and 32)."""
    from torch.profiler import ProfilerActivity, profile

    prompts = engine_gpu.prompts(n, LENGTH, seed=7)
    tokens = torch.tensor([t for p in prompts for t in p], device=engine.device)
    with torch.inference_mode():
        engine.model.prefill(tokens, engine.cache, list(range(n)), last_only=True, lengths=[LENGTH] * n)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.model.prefill(tokens, engine.cache, list(range(n)), last_only=True, lengths=[LENGTH] * n)
            torch.cuda.synchronize()
    averages = prof.key_averages()
    if n in (1, 32):
        table = averages.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)
        (out / f"engine_gpu_prefill_profile_n{n}.txt").write_text(table)
    kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
    return round(sum(e.self_device_time_total for e in kernels) / 1e3, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench/results"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("engine_gpu_prefill needs a CUDA GPU")
    from kiln.engine.torch import TorchBackend

    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "levels": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, target = engine_gpu.build_hf(), engine_gpu.target()
        checkpoint = engine_gpu.write_checkpoint(model, work / "checkpoint", fp8=False)
        del model
        engine_dir = TorchBackend().compile(checkpoint, target, work / "engine", {"model_sha": "random"})
        engine = TorchBackend().load(engine_dir)
        for n in (1, 8, 32, 64):
            level = _time_prefill(engine, n, args.repeats)
            level["admit_ms"] = _time_admission(engine, n, args.repeats)
            level["kernel_ms"] = _profile(engine, n, args.out)
            result["levels"][n] = level
            print(n, level, flush=True)
        engine.close()
    (args.out / "engine_gpu_prefill.json").write_text(json.dumps(result, indent=2))
    rows = [
        "| prompts x 128 tokens | host ms (until prefill returns) | wall ms | GPU events ms | kernels ms "
        "| admission ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for n, v in result["levels"].items():
        rows.append(
            f"| {n} | {v['host_ms']} | {v['wall_ms']} | {v['gpu_ms']} | {v['kernel_ms']} | {v['admit_ms']} |"
        )
    (args.out / "engine_gpu_prefill.md").write_text(
        f"# admission prefill, host vs device ({result['device']}, torch {result['torch']})\n\n"
        "Command: `python bench/engine_gpu_prefill.py --out $OUT`; random-weight Llama-3.2-1B shape, "
        "bf16.\n\n" + "\n".join(rows) + "\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
