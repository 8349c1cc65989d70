"""The ``kiln`` command line (Typer + rich). Commands live in ``kiln/commands/<area>.py``."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="kiln",
    help="Turn a Hugging Face LLM checkpoint into validated, versioned inference engines per GPU target.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
profiles_app = typer.Typer(help="Validate profiles without doing any work.", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")


def _register_commands() -> None:
    # Each area registers its commands on `app`; imported here so `kiln --help` lists them all.
    from kiln.commands import assets, build, doctor, engine, orchestrate, quantize, registry, report  # noqa: F401


_register_commands()
