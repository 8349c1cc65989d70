"""The build's last step as a Prefect task: the report (:mod:`kiln.steps.report`) as Prefect artifacts.

One markdown artifact per build (the table, gate failures, and links to every registered engine and
its MLflow version) and one link artifact per registered engine, so the Prefect UI points at the files.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from kiln.hub import ModelSnapshot
from kiln.profiles import BuildRequest
from kiln.steps.outcome import Outcome
from kiln.steps.report import artifact_key, build_report
from kiln.tasks.options import LOCAL


@task(name="report", **LOCAL)
def report(request: BuildRequest, snapshot: ModelSnapshot, outcomes: list[Outcome]) -> str:
    """Write results.json, report.md and plots under KILN_HOME/reports/<build>; publish the artifacts."""
    written = build_report(request, snapshot, outcomes)
    if written.warning:
        get_run_logger().warning("%s", written.warning)
    create_markdown_artifact(
        written.markdown,
        key=artifact_key("kiln-build", request.name),
        description=f"kiln build {request.name}",
    )
    for link in written.links:
        if link.page:
            create_link_artifact(link.page, link_text=link.text, key=link.key, description=link.description)
        else:
            create_markdown_artifact(link.text, key=link.key, description=link.description)
    return written.markdown
