"""The ``kiln`` command line (Typer + rich). Commands live in ``kiln/commands/<area>.py``; they are registered
here, explicitly, in :func:`_register_commands`."""

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
profiles_app = typer.Typer(
    help="Validate profiles without doing any work.", no_args_is_help=True, context_settings=HELP
)
app.add_typer(profiles_app, name="profiles")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"kiln {version('kiln-llm')}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print kiln's version and exit"
    ),
) -> None:
    """Turn a Hugging Face LLM checkpoint into validated, versioned inference engines per GPU target."""


def _register_commands() -> None:
    """Every command, named here once (``kiln --help`` lists them in this order); the modules of
    ``kiln/commands/`` define plain functions and never import this app."""
    from kiln.commands import (
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

    app.add_typer(assets.assets_app, name="assets")
    app.command("bench")(bench.bench_command)
    profiles_app.command("check")(build.profiles_check)
    app.command("build")(build.build_command)
    app.command("doctor")(doctor.doctor_command)
    app.command("compile")(engine.compile_command)
    app.command("generate")(engine.generate_command)
    app.add_typer(orchestrate.pools_app, name="pools")
    app.command("emit")(orchestrate.emit_command)
    app.command("quantize")(quantize.quantize_command)
    app.command("versions")(registry.versions)
    app.command("promote")(registry.promote)
    app.command("rollback")(registry.rollback)
    app.command("fetch")(registry.fetch)
    app.command("report")(report.report)
    app.command("serve")(serve.serve_command)


_register_commands()
