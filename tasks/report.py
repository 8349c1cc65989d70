"""The build's last step: the report (recipe x target table, recommended recipe per target) as a Prefect artifact."""

from __future__ import annotations

import re

from prefect import task
from prefect.artifacts import create_markdown_artifact

from kiln.profiles import BuildRequest
from kiln.tasks import progress
from kiln.tasks.build import LOCAL, Outcome, Snapshot


@task(name="report", **LOCAL)
def report(request: BuildRequest, snapshot: Snapshot, outcomes: list[Outcome]) -> str:
    """Write results.json, report.md and plots under KILN_HOME/reports/<build>; publish the markdown artifact."""
    from kiln.validation.report import BuildResults, rows_from, write_report

    with progress.step("report", request.name) as ev:
        model = f"{snapshot.repo_id or snapshot.path} @ {snapshot.sha[:12]}"
        results = BuildResults(build=request.name, model=model, select=request.evaluation.select,
                               rows=rows_from(outcomes))
        written = write_report(results)
        create_markdown_artifact(written.markdown, key=_artifact_key(request.name), description=f"kiln build {request.name}")
        ev.note = str(written.results_path.parent)
        return written.markdown


def _artifact_key(build: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "kiln-build-" + re.sub(r"[^a-z0-9-]+", "-", build.lower())
