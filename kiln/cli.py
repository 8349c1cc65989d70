"""The ``kiln`` command line (Typer + rich). Commands live in ``kiln/commands/<area>.py``."""

from __future__ import annotations

import typer

HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    name="kiln",
    help="Turn a Hugging Face LLM checkpoint into validated, versioned inference engines per GPU target.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings=HELP,
)
profiles_app = typer.Typer(help="Validate profiles without doing any work.", no_args_is_help=True,
                           context_settings=HELP)
app.add_typer(profiles_app, name="profiles")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"kiln {version('kiln-llm')}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="print kiln's version and exit")) -> None:
    """Turn a Hugging Face LLM checkpoint into validated, versioned inference engines per GPU target."""


def _register_commands() -> None:
    # Each area registers its commands on `app`; imported here so `kiln --help` lists them all.
    from kiln.commands import (  # noqa: F401
        assets,
        bench,
        build,
        doctor,
        engine,
        orchestrate,
        quantize,
        registry,
        report,
        serve,
    )


_register_commands()
