"""The revalidate flow (cron): re-measure each target's production engine and flag drift vs its recorded
metrics.

Drift means the same engine on the same held-out text now measures differently (a changed worker
image, driver or GPU, or a corrupted artifact): each metric beyond ``tolerance_pct`` of what was
recorded at registration is flagged in the result and in a markdown artifact.
"""

from __future__ import annotations

from prefect import flow

from kiln.tasks.build import calibration_data, download, load_and_preflight
from kiln.tasks.revalidate import drift_report, remeasure_production


@flow(name="kiln-revalidate")
def revalidate(profile: str, alias: str = "production", tolerance_pct: float = 5.0) -> list[dict]:
    """For every target of ``profile``: fetch its ``alias`` engine, re-measure it, compare, report."""
    request = load_and_preflight(profile)
    snapshot = download(request)
    data = calibration_data(request, snapshot)
    rows = [
        remeasure_production(request, target, data.heldout, alias, tolerance_pct)
        for target in request.targets
    ]
    drift_report(request, rows)
    return rows
