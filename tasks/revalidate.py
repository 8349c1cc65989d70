"""Re-measure a production engine and compare with its recorded metrics (:mod:`kiln.steps.revalidate`)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from kiln.profiles import BuildRequest
from kiln.steps import revalidate as revalidate_step
from kiln.steps.report import artifact_key
from kiln.tasks.options import LOCAL, NETWORK

remeasure_production = task(name="remeasure-production", timeout_seconds=4 * 3600, **NETWORK)(
    revalidate_step.remeasure_production
)


@task(name="drift-report", **LOCAL)
def drift_report(request: BuildRequest, rows: list[dict]) -> str:
    """The drift table as the run's markdown artifact."""
    markdown = revalidate_step.drift_markdown(request, rows)
    create_markdown_artifact(markdown, key=artifact_key("kiln-revalidate", request.name))
    return markdown
