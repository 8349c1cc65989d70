"""Bursts of streaming requests against ``kiln serve ENGINE_DIR``: where each request's time before its first
token went (the server's /metrics) and how many prefills a burst became (run by hand; not a test).

    python bench/serve_burst.py ENGINE_DIR --concurrency 32,64 --output-len 16 --rounds 3 [--text]
    python bench/serve_burst.py ENGINE_DIR --concurrency 1,64 --output-len 128 \
        --server-argv "python bench/serve_cpu.py front-end --step-ms 1.3 --prefill-ms 0.5"

Builds nothing: point it at an engine dir (``bench/serve_gpu.py --tiny`` leaves one in its temp dir). Each
level runs ``--rounds`` rounds of ``concurrency`` requests sent at once (``kiln bench --url``'s client), of
token ids or (``--text``) of text the server tokenizes. The second form serves the HTTP process over
``bench/serve_cpu.py``'s stand-in engine, a step every 1.3 ms and a prefill stalling 0.5 ms per request
(about the H200 run's Llama-3.2-1B): the GPU's pace, on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_cpu import KilnServe  # noqa: E402
from bench.serve_gpu import breakdown_table, first_token_breakdown  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--concurrency", default="32,64")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, help="client processes (default: kiln bench --url's)")
    parser.add_argument(
        "--text", action="store_true", help="text prompts (the server tokenizes them), not token ids"
    )
    parser.add_argument("--server-argv", help="the server command before ENGINE_DIR (default: kiln serve)")
    args = parser.parse_args()
    from kiln.serve.client import OpenAIRounds
    from kiln.validation.perf import BenchPrompt, seeded_prompts

    vocab = 32000  # seeded ids below any vocabulary kiln's test and bench engines have
    levels = [int(c) for c in args.concurrency.split(",")]
    ids = seeded_prompts(max(levels), args.input_len, vocab, seed=0)
    # text: about input_len tokens of ordinary words (4-5 characters a token), distinct per request
    words = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "river", "stone")
    texts = [f"#{i} " + " ".join(words[t % len(words)] for t in p) for i, p in enumerate(ids)]
    prompts = [BenchPrompt(p, args.output_len) for p in (texts if args.text else ids)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    log = Path(tempfile.mkdtemp(prefix="kiln-burst-")) / "serve.log"
    argv = args.server_argv.split() if args.server_argv else None
    server = KilnServe(args.engine_dir, env, log, argv=argv)
    rows = []
    print(f"server log: {log}", flush=True)
    try:
        rounds = OpenAIRounds(server.url, processes=args.processes)
        for level in levels:
            rounds(prompts[:level])  # warm-up
            before = server.metrics("kiln_")
            ttfts = []
            for _ in range(args.rounds):
                _, timings = rounds(prompts[:level])
                ttfts += sorted(t.ttft_s for t in timings)
            row = {"concurrency": level, **first_token_breakdown(before, server.metrics("kiln_"))}
            ttfts.sort()
            row["ttft_ms"] = {q: round(ttfts[int(q * (len(ttfts) - 1))] * 1e3, 1) for q in (0.5, 0.9)}
            row["prefills_per_round"] = round(row["prefills"] / args.rounds, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
        rounds.close()
    finally:
        server.stop()
    print("\n".join(breakdown_table(rows, counted="its timed rounds")))


if __name__ == "__main__":
    main()
