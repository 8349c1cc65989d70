"""Re-measure a production engine and compare with its recorded metrics (:mod:`kiln.steps.revalidate`)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from kiln.calibration import TokenSet
from kiln.profiles import BuildRequest, Target
from kiln.steps import revalidate as revalidate_step
from kiln.steps.report import artifact_key
from kiln.tasks.options import LOCAL, NETWORK


@task(name="remeasure-production", timeout_seconds=4 * 3600, **NETWORK)
def remeasure_production(
    request: BuildRequest, target: Target, heldout: TokenSet | None, alias: str, tolerance_pct: float
) -> dict:
    """Fetch ``<model>.<target>@alias``, measure it on this worker, and flag metrics that drifted."""
    return revalidate_step.remeasure_production(request, target, heldout, alias, tolerance_pct)


@task(name="drift-report", **LOCAL)
def drift_report(request: BuildRequest, rows: list[dict]) -> str:
    markdown = revalidate_step.drift_markdown(request, rows)
    create_markdown_artifact(markdown, key=artifact_key("kiln-revalidate", request.name))
    return markdown
