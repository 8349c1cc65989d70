"""``kiln quantize``: calibrate and quantize one recipe of a profile and write its checkpoint, no engine."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer
from rich.table import Table

from kiln.commands._common import cli_errors, console
from kiln.errors import KilnInputError, UnsupportedCombinationError, writing

FORMATS = ("trtllm", "hf")
DEVICES = ("auto", "cpu", "cuda")


def quantize_command(
    profile: Path = typer.Argument(..., help="build request YAML naming the model and the recipe"),
    recipe_name: str = typer.Option(..., "--recipe", help="name of one of the profile's recipes"),
    output: Path = typer.Option(..., "--output", help="directory to write the checkpoint to (new or empty)"),
    tp: int = typer.Option(1, "--tp", help="tensor-parallel ranks of the TensorRT-LLM checkpoint"),
    pp: int = typer.Option(1, "--pp", help="pipeline-parallel stages of the TensorRT-LLM checkpoint"),
    fmt: str = typer.Option(
        "auto",
        "--format",
        help="trtllm (config.json + rank{N}.safetensors), hf, or auto: "
        "the export the family's torch engine compiles (kiln doctor)",
    ),
    dtype: str = typer.Option(
        "bfloat16", help="dtype of the unquantized tensors: float32 | float16 | bfloat16"
    ),
    device: str = typer.Option("auto", help="where to calibrate: auto (cuda when available) | cpu | cuda"),
    ppl: bool = typer.Option(
        None,
        "--ppl/--no-ppl",
        help="measure fake-quant perplexity on held-out text (default: when the profile "
        "sets max_ppl_increase_pct, which then gates the recipe)",
    ),
) -> None:
    """Run the calibrate + quantize + export step of one recipe alone and write the checkpoint to OUTPUT."""
    with cli_errors():
        from kiln.profiles import load_request

        request = load_request(profile)
        recipe = next((r for r in request.recipes if r.name == recipe_name), None)
        if recipe is None:
            raise KilnInputError(
                f"{profile}: --recipe {recipe_name!r} is not one of its recipes: "
                f"{', '.join(r.name for r in request.recipes)}"
            )
        if fmt not in (*FORMATS, "auto"):
            raise KilnInputError(
                f"--format {fmt!r}: allowed values are {', '.join(FORMATS)}, or auto (the family's)"
            )
        if device not in DEVICES:
            raise KilnInputError(f"--device {device!r}: allowed values are {', '.join(DEVICES)}")
        if tp < 1 or pp < 1:
            raise KilnInputError(f"--tp {tp} / --pp {pp}: both must be >= 1")
        if fmt == "hf" and (tp, pp) != (1, 1):
            raise KilnInputError(
                "--tp/--pp apply to --format trtllm; an HF checkpoint is not split into ranks"
            )
        from kiln.quantize import hf_export_problem

        if fmt == "hf" and (why := hf_export_problem(recipe)):
            raise UnsupportedCombinationError(why)
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise KilnInputError(f"--output {output}: exists and is not an empty directory; pick a new path")
        _run(profile, request, recipe, output, tp=tp, pp=pp, fmt=fmt, dtype=dtype, device=device, ppl=ppl)


def _run(
    profile: Path,
    request,
    recipe,
    output: Path,
    *,
    tp: int,
    pp: int,
    fmt: str,
    dtype: str,
    device: str,
    ppl: bool | None,
) -> None:
    from kiln.hub import fetch_model, inspect_model, load_tokenizer
    from kiln.preflight import check_request_static
    from kiln.quantize import check_recipe, layout_key, needs_calibration, quantize

    # the recipe against the profile's targets (e.g. fp8 for an SM 80 target): same checks as `kiln build`
    check_request_static(request.model_copy(update={"recipes": [recipe]}), source=str(profile))
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    with console.status(f"resolving {getattr(request.model, 'repo_id', None) or request.model.local_dir}"):
        snapshot = fetch_model(request.model)
    info = inspect_model(Path(snapshot.path))
    if fmt == "auto":
        from kiln.families import family_for

        fmt = family_for(info.architecture).engine_source
    check_recipe(recipe, info, device=device, layouts=[(tp, pp)], dtype=dtype)  # before tokenizing anything
    gate = request.gates_for(recipe).max_ppl_increase_pct
    measure = ppl if ppl is not None else gate is not None
    calibration = heldout = None
    if needs_calibration(recipe) or measure:
        from kiln.steps.data import tokenize  # the build's calibration-data step, for one recipe

        with console.status("tokenizing calibration and held-out text"):
            data = tokenize([recipe], request.evaluation, load_tokenizer(snapshot.path), heldout=measure)
            calibration, heldout = data.calibration.get(recipe.name), data.heldout
    staging = output.parent / f".{output.name}.kiln-partial"
    shutil.rmtree(staging, ignore_errors=True)
    lineage = {
        "model_sha": snapshot.sha,
        "repo_id": getattr(snapshot, "repo_id", None),
        "recipe": recipe.name,
        "profile": str(profile),
    }
    try:
        with console.status(f"quantizing {recipe.name} ({recipe.quantization}) on {device}") as status:

            def progress(done: int, total: int) -> None:
                status.update(f"calibrating {recipe.name}: batch {done}/{total}")

            with writing("quantize", output):
                result = quantize(
                    Path(snapshot.path),
                    recipe,
                    layouts=[(tp, pp)],
                    output_dir=staging,
                    dtype=dtype,
                    device=device,
                    lineage=lineage,
                    calibration=calibration,
                    heldout=heldout,
                    max_ppl_increase_pct=gate if measure else None,
                    formats=(fmt,),
                    on_progress=progress,
                )
        produced = result.trtllm_dirs[layout_key(tp, pp)] if fmt == "trtllm" else result.hf_dir
        if output.exists():
            output.rmdir()  # checked empty above
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(produced), str(output))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _summary(result, output)


def _summary(result, output: Path) -> None:
    table = Table(title=f"{result.recipe}: {output}", show_header=False)
    table.add_row("quant_algo", str(result.quant_algo))
    table.add_row("kv_cache_quant_algo", str(result.kv_cache_quant_algo))
    table.add_row("calibration", result.calibration_sha256 or "none (no calibration passes)")
    if result.perplexity:
        p = result.perplexity
        table.add_row(
            "perplexity",
            f"{p.quantized:.3f} vs {p.baseline:.3f} baseline ({p.increase_pct:+.2f}%, "
            f"{p.num_tokens} held-out tokens)",
        )
    table.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in result.timings_s.items()))
    console.print(table)
