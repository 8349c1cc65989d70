"""The build's last step: the report (recipe x target table, recommended recipe per target) as Prefect artifacts.

One markdown artifact per build (the table, gate failures, and links to every registered engine and
its MLflow version) and one link artifact per registered engine, so the Prefect UI points at the files.
"""

from __future__ import annotations

import re

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from kiln.errors import RegistryError
from kiln.profiles import BuildRequest
from kiln.redact import redact
from kiln.tasks import progress
from kiln.tasks.build import LOCAL, Outcome, Snapshot


@task(name="report", **LOCAL)
def report(request: BuildRequest, snapshot: Snapshot, outcomes: list[Outcome]) -> str:
    """Write results.json, report.md and plots under KILN_HOME/reports/<build>; publish the Prefect artifacts."""
    from kiln.validation.report import BuildResults, log_to_mlflow, rows_from, write_report

    with progress.step("report", request.name) as ev:
        model = f"{snapshot.repo_id or snapshot.path} @ {snapshot.sha[:12]}"
        results = BuildResults(build=request.name, model=model, select=request.evaluation.select,
                               rows=rows_from(outcomes))
        written = write_report(results)
        try:
            log_to_mlflow(written, results, request.registry.resolved_tracking_uri, request.registry.model_name)
        except RegistryError as exc:
            # the report is already on disk and the versions are registered (or their failure reported):
            # an unreachable tracking server must not turn the build's outcome into a failure
            get_run_logger().warning("build report not logged to MLflow (%s); it is at %s", redact(str(exc)),
                                     written.results_path.parent)
        markdown = written.markdown + links_markdown(request, outcomes, written.results_path.parent.as_uri())
        markdown = redact(markdown)  # the tracking URI or a path may carry credentials
        create_markdown_artifact(markdown, key=artifact_key("kiln-build", request.name),
                                 description=f"kiln build {request.name}")
        tracking = request.registry.resolved_tracking_uri
        for o in outcomes:
            if not (o.uri and o.version):
                continue
            key = artifact_key("kiln-engine", request.name, o.recipe, o.target)
            description = redact(f"{o.recipe} x {o.target}: {o.verdict}; files at {o.uri}")
            if page := engine_link(tracking, o):
                create_link_artifact(redact(page), link_text=f"{o.model_name} v{o.version}", key=key,
                                     description=description)
            else:
                create_markdown_artifact(redact(f"{o.model_name} v{o.version}: `{o.uri}`"), key=key,
                                         description=description)
        ev.note = str(written.results_path.parent)
        return markdown


def links_markdown(request: BuildRequest, outcomes: list[Outcome], report_uri: str) -> str:
    """The markdown links section: each registered engine's files and (for an HTTP tracking server) its version page."""
    tracking = request.registry.resolved_tracking_uri
    lines = ["", "## Links", "", f"- report and plots: [{report_uri}]({report_uri})"]
    for o in outcomes:
        if not (o.uri and o.version):
            continue
        page = mlflow_link(tracking, o)
        mlflow = f" · [MLflow]({page})" if page else f" · MLflow `{o.model_name}` v{o.version} at `{tracking}`"
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
    """The MLflow UI page of a model version when the tracking server is HTTP(S); None for a local SQLite store."""
    if not tracking_uri.startswith(("http://", "https://")) or not outcome.model_name:
        return None
    return f"{tracking_uri.rstrip('/')}/#/models/{outcome.model_name}/versions/{outcome.version}"


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower())).strip("-")
