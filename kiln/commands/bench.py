"""``kiln bench``: throughput and latency of an engine dir (in process) or of a server (``--url``).

Like trtllm-bench / vLLM's serving benchmark: a warm-up round, then per concurrency level request
throughput, output tokens/s, TTFT and inter-token latency p50/p90/p99 and, for engine dirs on GPUs, the
share of the HBM roofline. Both modes run validation's own sweep (``kiln.validation.perf.sweep``): rounds of
``concurrency`` requests sent at once, greedy to exactly the output length, so ``kiln bench ENGINE_DIR``
with validation's settings measures what the registry records.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from kiln.commands._common import cli_errors, console, err_console


def _levels(text: str) -> list[int]:
    from kiln.errors import KilnInputError

    try:
        levels = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise KilnInputError(
            f"--concurrency {text!r}: expected comma-separated integers, e.g. 1,8,32"
        ) from None
    if not levels or levels[0] < 1:
        raise KilnInputError(f"--concurrency {text!r}: levels must be >= 1")
    return levels


def _dataset(path: Path, output_len: int) -> list[tuple[str | list[int], int]]:
    """``{"prompt": "..."}`` or ``{"prompt_token_ids": [...]}`` per line, optional ``max_tokens``."""
    from kiln.commands._common import jsonl_rows
    from kiln.errors import KilnInputError

    rows: list[tuple[str | list[int], int]] = []
    for number, item in jsonl_rows(path, KilnInputError, "no such dataset file"):
        prompt = item.get("prompt_token_ids", item.get("prompt")) if isinstance(item, dict) else None
        if not (
            isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))
        ):
            raise KilnInputError(
                f'{path}:{number}: expected {{"prompt": "..."}} or {{"prompt_token_ids": [...]}}'
            )
        rows.append((prompt, int(item.get("max_tokens", output_len))))
    if not rows:
        raise KilnInputError(f"{path}: no prompts")
    return rows


def bench_command(
    engine_dir: Path = typer.Argument(None, help="engine dir to measure in process (or pass --url)"),
    url: str = typer.Option(None, "--url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000"),
    concurrency: str = typer.Option("1,8,32,64", "--concurrency", "-c", help="comma-separated levels"),
    input_len: int = typer.Option(128, "--input-len", min=1, help="prompt tokens (seeded random ids)"),
    output_len: int = typer.Option(128, "--output-len", min=1, help="tokens generated per request"),
    dataset: Path = typer.Option(
        None, "--dataset", help='JSONL prompts ({"prompt": ...} or {"prompt_token_ids": ...})'
    ),
    requests: int = typer.Option(
        8, "--requests", min=1, help="timed requests per level at least (whole rounds)"
    ),
    warmup_rounds: int = typer.Option(1, "--warmup-rounds", min=0, help="untimed rounds per level first"),
    seed: int = typer.Option(0, "--seed", help="seed of the random prompts"),
    model: str = typer.Option(
        None, "--model", help="model name to request (--url; default: the server's first)"
    ),
    api_key: str = typer.Option(
        None,
        "--api-key",
        envvar="KILN_API_KEY",
        show_default=False,
        help="bearer token for --url (or KILN_API_KEY)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    output: Path = typer.Option(None, "--output", "-o", help="also write the JSON result to this file"),
) -> None:
    """Benchmark an engine dir or a server: req/s, output tok/s, TTFT and ITL percentiles per concurrency."""
    with cli_errors():
        from kiln.errors import KilnInputError
        from kiln.validation.perf import BenchPrompt, seeded_prompts, sweep

        if (engine_dir is None) == (url is None):
            raise KilnInputError("pass an ENGINE_DIR or --url http://HOST:PORT (one of them)")
        levels = _levels(concurrency)
        rows = _dataset(dataset, output_len) if dataset else None
        count = max(max(levels), requests)
        settings: dict = {}
        if engine_dir is not None:
            from kiln.engine import manifest as engine_manifest
            from kiln.engine.base import get_backend
            from kiln.registry.fetch import verify_if_fetched
            from kiln.validation.perf import EngineRounds, decode_cost_from_dir

            verify_if_fetched(engine_dir)
            manifest = engine_manifest.read(engine_dir)
            engine = get_backend(manifest.backend).load(engine_dir)
            vocab = int(engine.logits([0]).shape[-1])
            if rows is not None:
                from kiln.serve.text import TextCodec

                codec = TextCodec(engine_dir)
                rows = [(codec.encode_prompt(p) if isinstance(p, str) else p, n) for p, n in rows]
            run_round, source = EngineRounds(engine), str(engine_dir)
            device = manifest.device
            settings = {
                "device": device,
                "max_batch_size": manifest.limits.max_batch_size,
                "decode_cost": decode_cost_from_dir(engine_dir),
                "peak_memory_bytes": engine.memory_bytes,
            }
        else:
            from kiln.serve.client import OpenAIRounds

            run_round = OpenAIRounds(url, model=model, api_key=api_key)
            source, device, vocab = f"{url} (model {run_round.model})", "remote", None
            settings = {"device": device}
        if rows is None:
            # a server's vocabulary is unknown: ids below every tokenizer's size (GPT-2's 50257)
            if vocab is None:
                vocab = 32000
            prompts = [BenchPrompt(p, output_len) for p in seeded_prompts(count, input_len, vocab, seed)]
            prompt_len, gen_len = input_len, output_len
        else:
            prompts = [BenchPrompt(p, n) for p, n in rows]
            sized = [len(p) for p, _ in rows if not isinstance(p, str)]
            prompt_len = round(sum(sized) / len(sized)) if sized else 0
            gen_len = round(sum(n for _, n in rows) / len(rows))
        err_console.print(
            f"bench {source}: concurrency {levels}, "
            f"{'dataset ' + str(dataset) if dataset else f'{input_len} in / {output_len} out'}, "
            f"{warmup_rounds} warm-up round(s) per level",
            highlight=False,
        )
        result = sweep(
            run_round,
            levels,
            prompts,
            prompt_len=prompt_len,
            gen_len=gen_len,
            seed=seed,
            warmup_rounds=warmup_rounds,
            min_requests=requests,
            on_level=lambda c: err_console.print(f"  concurrency {c} ...", highlight=False),
            **settings,
        )
        if engine_dir is not None:
            engine.close()
        document = {
            "source": source,
            "mode": "engine" if engine_dir is not None else "url",
            "dataset": str(dataset) if dataset else None,
            "command": ["kiln", *sys.argv[1:]],
            **result.to_dict(),
        }
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(document, indent=2, default=str) + "\n")
        if as_json:
            print(json.dumps(document, indent=2, default=str))
            return
        _print_table(document)


def _print_table(document: dict) -> None:
    table = Table(
        title=f"kiln bench {document['source']} ({document['prompt_len']} in / {document['gen_len']} out)"
    )
    for column in (
        "conc",
        "requests",
        "req/s",
        "out tok/s",
        "TTFT p50/p90/p99 ms",
        "ITL p50/p90/p99 ms",
        "% roofline",
    ):
        table.add_column(column, justify="right")
    for point in document["points"]:
        ttft, itl = point["ttft_ms"], point["itl_ms"]
        table.add_row(
            str(point["concurrency"]),
            str(point["requests"]),
            f"{point['requests_per_s']:.2f}",
            f"{point['output_tokens_per_s']:.1f}",
            f"{ttft['p50']:.1f} / {ttft['p90']:.1f} / {ttft['p99']:.1f}",
            f"{itl['p50']:.1f} / {itl['p90']:.1f} / {itl['p99']:.1f}" if itl else "-",
            f"{point['roofline_pct']:.0f}%" if point.get("roofline_pct") is not None else "n/a",
        )
    console.print(table)
    for item in document["skipped"]:
        console.print(
            f"[yellow]concurrency {item['concurrency']} skipped[/]: {item['reason']}", highlight=False
        )
    if document["points"] and document["points"][0].get("roofline_pct") is None:
        console.print("[dim]% roofline: GPU engine dirs only (the HBM bandwidth is measured on the card)[/]")
