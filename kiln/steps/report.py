"""Report: the build's table (recipe x target, recommended recipe per target) on disk, in MLflow, and the
markdown and links the orchestrator publishes (``kiln.tasks.report`` turns them into Prefect artifacts)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from kiln import progress
from kiln.errors import RegistryError
from kiln.hub import ModelSnapshot
from kiln.profiles import BuildRequest
from kiln.redact import redact
from kiln.steps.outcome import Outcome


@dataclass(frozen=True)
class EngineLink:
    """What the UI shows for one registered engine: a page a browser opens, or its files as text."""

    key: str
    text: str
    description: str
    page: str | None = None


@dataclass(frozen=True)
class BuildReport:
    markdown: str
    directory: Path
    links: list[EngineLink] = field(default_factory=list)
    warning: str | None = None
    """Why the report is not in MLflow (the build's outcome stands; the report is on disk)."""


def build_report(request: BuildRequest, snapshot: ModelSnapshot, outcomes: list[Outcome]) -> BuildReport:
    """Write results.json, report.md and plots under KILN_HOME/reports/<build>, log them to MLflow."""
    from kiln.validation.report import BuildResults, log_to_mlflow, rows_from, write_report

    with progress.step("report", request.name) as ev:
        model = f"{snapshot.repo_id or snapshot.path} @ {snapshot.sha[:12]}"
        results = BuildResults(
            build=request.name, model=model, select=request.evaluation.select, rows=rows_from(outcomes)
        )
        written = write_report(results)
        directory = written.results_path.parent
        warning = None
        try:
            log_to_mlflow(
                written, results, request.registry.resolved_tracking_uri, request.registry.model_name
            )
        except RegistryError as exc:
            # the report is already on disk and the versions are registered (or their failure reported):
            # an unreachable tracking server must not turn the build's outcome into a failure
            warning = f"build report not logged to MLflow ({redact(str(exc))}); it is at {directory}"
        markdown = written.markdown + links_markdown(request, outcomes, directory.as_uri())
        ev.note = str(directory)
        # the tracking URI or a path may carry credentials
        return BuildReport(redact(markdown), directory, engine_links(request, outcomes), warning)


def engine_links(request: BuildRequest, outcomes: list[Outcome]) -> list[EngineLink]:
    tracking = request.registry.resolved_tracking_uri
    links = []
    for o in outcomes:
        if not (o.uri and o.version):
            continue
        key = artifact_key("kiln-engine", request.name, o.recipe, o.target)
        description = redact(f"{o.recipe} x {o.target}: {o.verdict}; files at {o.uri}")
        if page := engine_link(tracking, o):
            links.append(EngineLink(key, f"{o.model_name} v{o.version}", description, redact(page)))
        else:
            links.append(EngineLink(key, redact(f"{o.model_name} v{o.version}: `{o.uri}`"), description))
    return links


def links_markdown(request: BuildRequest, outcomes: list[Outcome], report_uri: str) -> str:
    """The markdown links section: each registered engine's files and (for an HTTP tracking server) its
    version page."""
    tracking = request.registry.resolved_tracking_uri
    lines = ["", "## Links", "", f"- report and plots: [{report_uri}]({report_uri})"]
    for o in outcomes:
        if not (o.uri and o.version):
            continue
        page = mlflow_link(tracking, o)
        mlflow = (
            f" · [MLflow]({page})" if page else f" · MLflow `{o.model_name}` v{o.version} at `{tracking}`"
        )
        lines.append(f"- {o.recipe} x {o.target}: [{o.model_name} v{o.version}]({o.uri}){mlflow}")
    return "\n".join(lines) + "\n"


def engine_link(tracking_uri: str, outcome: Outcome) -> str | None:
    """What a browser can open from the Prefect UI for a registered engine: its MLflow version page where a
    tracking server is configured, its files where they are served over http(s); None (show the path as
    text) for a file:// store with local SQLite tracking."""
    page = mlflow_link(tracking_uri, outcome)
    if page is None and outcome.uri and outcome.uri.startswith(("http://", "https://")):
        page = outcome.uri
    return page


def mlflow_link(tracking_uri: str, outcome: Outcome) -> str | None:
    """The MLflow UI page of a model version when the tracking server is HTTP(S); None for a local
    SQLite store."""
    if not tracking_uri.startswith(("http://", "https://")) or not outcome.model_name:
        return None
    return f"{tracking_uri.rstrip('/')}/#/models/{outcome.model_name}/versions/{outcome.version}"


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower())).strip("-")
