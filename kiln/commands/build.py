"""``kiln build`` and ``kiln profiles check``."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import typer
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from kiln import constants
from kiln.commands._common import cli_errors, console, print_table
from kiln.errors import KilnInputError, ModelSourceError
from kiln.profiles import LocalModel, load_request


def profiles_check(files: list[Path] = typer.Argument(..., help="Build request YAML files")) -> None:
    """Validate build requests (fields, names, recipe x target combinations); do no work."""
    with cli_errors():
        for path in files:
            request = load_request(path)
            model = request.model
            missing = isinstance(model, LocalModel) and not Path(model.local_dir).is_dir()
            if missing:  # checked on a machine without the model: the request's own rules still run
                from kiln.preflight import check_request

                check_request(request, source=str(path), local_targets=False)
            else:
                _check_before_prefect(request, path, "deployments")  # every rule that needs no download
            table = Table(title=f"{path}: ok")
            table.add_column("recipe")
            table.add_column("target")
            for recipe in request.recipes:
                for target in request.targets:
                    table.add_row(
                        f"{recipe.name} ({recipe.quantization})",
                        f"{target.name} ({target.backend}/{target.sm or target.device})",
                    )
            console.print(table)
            if missing:
                console.print(
                    f"note: model.local_dir {model.local_dir} is not here, so its checks (architecture, "
                    "weights format, tp/pp vs heads, memory) did not run; `kiln build` runs them",
                    highlight=False,
                )
            elif not isinstance(model, LocalModel):
                console.print(
                    "note: the model checks (architecture and family, tp/pp vs heads, memory) need the hub's "
                    "config.json: `kiln build` runs them after download, before any calibration",
                    highlight=False,
                )
            console.print(
                "note: whether a target can be built on this machine is `kiln doctor --target NAME`; "
                "`kiln build` checks it for targets it runs in-process",
                highlight=False,
            )


_MARKS = {"done": "[green]✓[/]", "reused": "[cyan]↺[/]", "skipped": "[yellow]-[/]", "failed": "[red]✗[/]"}
DISPATCH = ("auto", "inline", "deployments")


def build_command(
    profile: Path = typer.Argument(..., help="build request YAML (e.g. profiles/examples/tiny-cpu.yaml)"),
    dispatch: str = typer.Option(
        "auto",
        help="auto | inline | deployments: where per-target subflows run "
        "(auto: on their work pools when run from a deployment, else in this process)",
    ),
) -> None:
    """Build a request through the Prefect DAG (embedded ephemeral server unless PREFECT_API_URL is set)."""
    with cli_errors():
        request = load_request(profile)
        _check_before_prefect(request, profile, dispatch)  # bad input: exit 2 before Prefect starts (~15 s)
        # the step lines below are the progress; a failing step is printed there and as the error
        # quiet Prefect's console handler only: run logs still reach the server (the run page shows them)
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        import kiln.flows  # PREFECT_HOME under KILN_HOME before prefect is imported
        from kiln.flows.build import build

        kiln.flows.embedded_server_in_its_own_session()
        from kiln import progress
        from kiln.tasks.progress import started_runs

        started = time.perf_counter()
        interrupted: list[int] = []

        def interrupt(signum: int, _frame: object) -> None:
            interrupted.append(signum)
            raise KeyboardInterrupt

        # Ctrl-C and a scheduler's SIGTERM stop the build alike; remembered, because Prefect may turn the
        # KeyboardInterrupt into another error when it lands inside its own bookkeeping
        signal.signal(signal.SIGINT, interrupt)
        signal.signal(signal.SIGTERM, interrupt)
        try:
            with _StepProgress() as display, progress.listening(display.show):
                outcomes = build(profile=str(profile), dispatch=dispatch)
        except BaseException as exc:
            if not interrupted and not isinstance(exc, KeyboardInterrupt):
                raise
            _stop_interrupted(started_runs, time.perf_counter() - started)
        _print_summary(outcomes, time.perf_counter() - started)


def _stop_interrupted(runs: dict[str, str], seconds: float) -> None:
    """One line, the build's Prefect runs marked Cancelled, exit 130; finished steps stay cached."""
    from kiln.commands._common import err_console

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the bookkeeping short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cancelled = _cancel_runs(runs)
    err_console.print(
        f"interrupted after {seconds:.0f}s: kiln build stopped ({cancelled} Prefect run(s) marked "
        "Cancelled); finished steps are cached, so running it again resumes from them",
        highlight=False,
    )
    raise typer.Exit(130)


def _cancel_runs(runs: dict[str, str]) -> int:
    """Mark this process's flow and task runs that are not final Cancelled (bounded: a dead server is
    skipped)."""
    import asyncio
    import uuid

    from prefect import get_client
    from prefect.states import Cancelled

    async def cancel() -> int:
        done = 0
        async with get_client() as client:
            for raw_id, kind in runs.items():
                run_id = uuid.UUID(raw_id)
                read = client.read_flow_run if kind == "flow" else client.read_task_run
                setter = client.set_flow_run_state if kind == "flow" else client.set_task_run_state
                run = await read(run_id)
                if run.state is None or not run.state.is_final() or run.state.is_crashed():
                    await setter(run_id, Cancelled(message="interrupted (SIGINT/SIGTERM)"), force=True)
                    done += 1
        return done

    try:
        return asyncio.run(asyncio.wait_for(cancel(), timeout=20))
    except Exception:  # noqa: BLE001 - best effort: the interrupt still ends the build with its own message
        return 0


def _check_before_prefect(request, profile: Path, dispatch: str) -> None:
    from kiln.preflight import check_request_static

    if dispatch not in DISPATCH:
        raise KilnInputError(f"--dispatch {dispatch!r}: allowed values are {', '.join(DISPATCH)}")
    check_request_static(request, source=str(profile))
    model = request.model
    if isinstance(model, LocalModel) and not Path(model.local_dir).is_dir():
        hint = (
            " (the demo model: run `kiln assets prepare` first, with the same KILN_HOME)"
            if Path(model.local_dir).parent == constants.assets_dir()
            else ""
        )
        raise ModelSourceError(
            f"{profile}: model.local_dir {model.local_dir} is not a directory; point it at an "
            f"HF model directory (config.json, *.safetensors, tokenizer files){hint}"
        )
    info = None
    if isinstance(model, LocalModel):
        # headers only (no weights read): a corrupt file or a tp_size that cannot split the heads fails here
        from kiln.hub import check_local_dir, inspect_model

        info = inspect_model(check_local_dir(model))
    from kiln.preflight import check_request

    # targets that run in this process (not on their pools) must be buildable here: a required TensorRT-LLM
    # target without tensorrt_llm fails now, not after download and calibration
    check_request(request, source=str(profile), model_info=info, local_targets=dispatch != "deployments")


class _StepProgress:
    """A spinner per running step (rich), and one line per finished step: mark, step, note, seconds."""

    def __init__(self) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._tasks: dict[tuple[str, str], TaskID] = {}

    def __enter__(self) -> _StepProgress:
        self._progress.__enter__()
        self._tasks[("prefect", "")] = self._progress.add_task(
            "starting Prefect (embedded server) ...", total=None
        )
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def show(self, event) -> None:
        starting = self._tasks.pop(("prefect", ""), None)
        if starting is not None:
            self._progress.remove_task(starting)
        label = f"{event.step} [bold]{event.detail}[/]" if event.detail else event.step
        key = (event.step, event.detail)
        if event.status == "running":
            self._tasks[key] = self._progress.add_task(f"{label} ...", total=None)
            return
        if (task := self._tasks.pop(key, None)) is not None:
            self._progress.remove_task(task)
        if event.status == "cancelled":  # the interrupt gets one line of its own (build_command)
            return
        note = f" ({event.note})" if event.note else ""
        reused = " reused" if event.status == "reused" else ""
        self._progress.console.print(
            f"{_MARKS.get(event.status, '?')} {label}{reused}{note} [dim]{event.seconds:.1f}s[/]",
            highlight=False,
        )


def _print_summary(outcomes, seconds: float) -> None:
    table = Table(
        title=f"kiln build: {len(outcomes)} engine(s) in {seconds:.0f}s",
        caption="★ recommended: the fastest engine of its target that passes every gate; Δppl vs the "
        "unquantized baseline on the same target; `kiln report` shows every metric",
    )
    for column in ("recipe", "target", "ppl", "Δppl %", "tok/s", "verdict", "model version", "artifact URI"):
        table.add_column(column)

    def num(metrics: dict[str, float], key: str, fmt: str) -> str:
        value = metrics.get(key)
        return "-" if value is None else format(value, fmt)

    for o in outcomes:
        version = f"{o.model_name} v{o.version}" + (" (reused)" if o.reused else "") if o.version else "-"
        table.add_row(
            o.recipe + (" ★" if o.recommended else ""),
            o.target,
            num(o.metrics, "perplexity", ".2f"),
            num(o.metrics, "ppl_increase_pct", "+.2f"),
            num(o.metrics, "tokens_per_s", ".1f"),
            o.verdict,
            version,
            o.uri or "-",
        )
    print_table(table)
    registered = [o for o in outcomes if o.version]
    if registered and all(o.reused for o in registered):
        console.print(
            "identical inputs: reused every step and every registered version; no new model version"
        )
    elif registered:
        new = sum(not o.reused for o in registered)
        console.print(f"{new} new model version(s); {len(registered) - new} reused")
