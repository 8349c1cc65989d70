"""``kiln compile`` (checkpoint -> engine dir for a target) and ``kiln generate`` (run an engine dir)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
import yaml

from kiln.commands._common import cli_errors, console
from kiln.errors import ProfileError


def _target(profile: Path, name: str) -> Any:
    """Target ``name`` from a build request, or from a targets library (``profiles/targets.yaml``)."""
    from kiln.profiles import library_file, load_request, load_target

    if not profile.is_file():
        raise ProfileError(f"{profile}: no such profile file")
    data = yaml.safe_load(profile.read_text())
    if isinstance(data, dict) and set(data) == {"targets"} and isinstance(data["targets"], list):
        targets = library_file(profile, "targets")
        if name not in targets:
            raise ProfileError(f"{profile}: no target {name!r}; targets: {', '.join(map(str, targets))}")
        return load_target(targets[name])
    request = load_request(profile)
    for target in request.targets:
        if target.name == name:
            return target
    raise ProfileError(
        f"{profile}: no target {name!r}; targets: {', '.join(t.name for t in request.targets)}"
    )


def compile_command(
    checkpoint_dir: Path = typer.Argument(
        ..., help="TensorRT-LLM checkpoint dir (config.json + rank<N>.safetensors)"
    ),
    profile: Path = typer.Option(
        ..., "--profile", "-p", help="build request YAML or targets library naming the target"
    ),
    target: str = typer.Option(..., "--target", "-t", help="target name in the profile"),
    output: Path = typer.Option(..., "--output", "-o", help="engine dir to write (replaced if it exists)"),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="HF dir whose tokenizer files the engine keeps"
    ),
) -> None:
    """Compile a checkpoint into an engine dir for one target (no quantization, no registry)."""
    with cli_errors():
        from kiln.engine.base import get_backend
        from kiln.errors import ModelSourceError

        tgt = _target(profile, target)
        if not (checkpoint_dir / "config.json").is_file():
            raise ModelSourceError(
                f"{checkpoint_dir}: no config.json; pass a TensorRT-LLM checkpoint dir "
                "(made by `kiln quantize`)"
            )
        backend = get_backend(tgt.backend)
        backend.check_available(tgt)
        lineage = {"checkpoint_dir": str(checkpoint_dir)}
        if tokenizer is not None:
            lineage["tokenizer_dir"] = str(tokenizer)
        started = time.perf_counter()
        with console.status(f"compiling {checkpoint_dir} for {tgt.name} ({tgt.backend}) ..."):
            engine_dir = backend.compile(checkpoint_dir, tgt, output, lineage)
        console.print(f"[green]✓[/] engine {engine_dir} ({tgt.name}, {time.perf_counter() - started:.1f} s)")


def _read_prompts(prompts: list[str], input_file: Path | None) -> list[dict[str, Any]]:
    from kiln.errors import GenerationLimitError

    items: list[dict[str, Any]] = [{"prompt": p} for p in prompts]
    if input_file is not None:
        from kiln.commands._common import jsonl_rows

        for number, item in jsonl_rows(input_file, GenerationLimitError):
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise GenerationLimitError(f'{input_file}:{number}: expected {{"prompt": "...", ...}}')
            unknown = set(item) - {"prompt", "max_new_tokens", "temperature", "top_p", "top_k", "seed"}
            if unknown:
                raise GenerationLimitError(
                    f"{input_file}:{number}: unknown fields {sorted(unknown)}; allowed: prompt, "
                    "max_new_tokens, temperature, top_p, top_k, seed"
                )
            items.append(item)
    if not items:
        raise GenerationLimitError("nothing to generate: pass --prompt TEXT or --input prompts.jsonl")
    return items


def generate_command(
    engine_dir: Path = typer.Argument(..., help="engine dir built by `kiln compile`"),
    prompt: list[str] = typer.Option([], "--prompt", help="prompt text (repeatable)"),
    input_file: Path | None = typer.Option(
        None, "--input", help='JSONL file, one {"prompt": ...} per line (batched)'
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off"),
    seed: int | None = typer.Option(None, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per prompt (text, token_ids)"),
    warmup: bool = typer.Option(
        True,
        "--warmup/--no-warmup",
        help="run the prompts for 2 tokens first, so tokens/s leaves out one-time costs",
    ),
) -> None:
    """Generate completions with an engine dir; prints them and the tokens/s (after a warm-up)."""
    with cli_errors():
        from transformers import AutoTokenizer

        from kiln.constants import TOKENIZER_CONFIG
        from kiln.engine import manifest as engine_manifest
        from kiln.engine.base import GenerationRequest, SamplingParams
        from kiln.errors import ModelSourceError
        from kiln.registry.fetch import verify_if_fetched

        items = _read_prompts(prompt, input_file)
        verify_if_fetched(engine_dir)
        manifest = engine_manifest.read(engine_dir)
        if not (engine_dir / TOKENIZER_CONFIG).is_file():
            raise ModelSourceError(
                f"{engine_dir}: the engine has no tokenizer files; rebuild it with "
                "`kiln compile ... --tokenizer HF_MODEL_DIR`"
            )
        tokenizer = AutoTokenizer.from_pretrained(engine_dir)
        requests = []
        for item in items:
            sampling = SamplingParams(
                max_new_tokens=int(item.get("max_new_tokens", max_new_tokens)),
                temperature=float(item.get("temperature", temperature)),
                top_p=float(item.get("top_p", top_p)),
                top_k=int(item.get("top_k", top_k)),
                seed=item.get("seed", seed),
                stop_token_ids=tuple(t for t in (tokenizer.eos_token_id,) if t is not None),
            )
            requests.append(GenerationRequest(tokenizer(item["prompt"])["input_ids"], sampling))
        import torch.distributed as dist

        from kiln.engine.base import get_backend
        from kiln.engine.torch.parallel import init_from_launcher

        # a multi-rank engine runs as one process per rank (`torchrun --nproc-per-node N kiln generate ...`);
        # every rank generates in lockstep and only the first prints
        joined = manifest.backend == "torch" and init_from_launcher(manifest.device)
        rank = dist.get_rank() if joined else 0
        try:
            engine = get_backend(manifest.backend).load(engine_dir)
            if warmup:  # first calls allocate, capture CUDA graphs, compile: not what tokens/s should measure
                engine.generate(
                    [
                        GenerationRequest(
                            r.prompt_token_ids,
                            replace(r.sampling, max_new_tokens=min(2, r.sampling.max_new_tokens)),
                        )
                        for r in requests
                    ]
                )
            started = time.perf_counter()
            results = engine.generate(requests)
            elapsed = time.perf_counter() - started
            engine.close()
        finally:
            if joined:
                dist.destroy_process_group()
        if rank != 0:
            return
        total = sum(len(r.token_ids) for r in results)
        for item, result in zip(items, results, strict=True):
            text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
            if as_json:
                print(
                    json.dumps(
                        {
                            "prompt": item["prompt"],
                            "text": text,
                            "token_ids": result.token_ids,
                            "finish_reason": result.finish_reason,
                        }
                    )
                )
            else:
                console.print(f"[bold]{item['prompt']}[/]{text}", highlight=False)
        if not as_json:
            console.print(
                f"[dim]{len(results)} prompt(s), {total} tokens in {elapsed:.2f} s = "
                f"{total / elapsed:.1f} tokens/s[/]"
            )
