"""Revalidate: re-measure a target's production engine, compare with the metrics recorded at registration."""

from __future__ import annotations

from typing import Any

from kiln import constants
from kiln.calibration import TokenSet
from kiln.profiles import BuildRequest, Target

DRIFT_METRICS = ("perplexity", "tokens_per_s", "ttft_p90_ms")


def drift(recorded: dict[str, float], measured: dict[str, float], tolerance_pct: float) -> dict[str, float]:
    """Relative change (%) of each tracked metric that moved more than ``tolerance_pct``."""
    moved = {}
    for name in DRIFT_METRICS:
        before, now = recorded.get(name), measured.get(name)
        if before and now is not None:
            change = 100.0 * (now - before) / abs(before)
            if abs(change) > tolerance_pct:
                moved[name] = round(change, 2)
    return moved


def remeasure_production(
    request: BuildRequest, target: Target, heldout: TokenSet | None, alias: str, tolerance_pct: float
) -> dict[str, Any]:
    """Fetch ``<model>.<target>@alias``, measure it on this worker, and flag metrics that drifted."""
    from kiln.registry import fetch, list_versions
    from kiln.validation.measure import measure_engine

    tracking_uri = request.registry.resolved_tracking_uri
    model = request.registry.model_name
    ref = f"{model}.{target.name}@{alias}"
    current = next(
        (v for v in list_versions(model, target.name, tracking_uri=tracking_uri) if alias in v.aliases), None
    )
    if current is None:
        return {"target": target.name, "ref": ref, "status": f"no version has alias {alias!r}"}
    output = constants.cache_dir() / "revalidate" / current.name / str(current.version)
    engine_dir = fetch(f"{model}@{alias}", target.name, output, tracking_uri=tracking_uri)
    # drift is the same engine measuring differently: compared with itself as baseline, only speed and
    # absolute perplexity move, which is what the recorded metrics are checked against
    measured, _ = measure_engine(engine_dir, engine_dir, heldout, request.evaluation)
    moved = drift(current.metrics, measured, tolerance_pct)
    return {
        "target": target.name,
        "ref": ref,
        "version": str(current.version),
        "status": "drift" if moved else "ok",
        "drift_pct": moved,
        "measured": measured,
    }


def drift_markdown(request: BuildRequest, rows: list[dict]) -> str:
    """The drift table of one revalidation, credentials masked."""
    from kiln.redact import redact

    lines = [
        f"# kiln revalidate `{request.name}`",
        "",
        "| target | version | status | drifted metrics (%) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['target']} | {r.get('version', '-')} | {r['status']} | {r.get('drift_pct') or '-'} |"
        for r in rows
    ]
    return redact("\n".join(lines) + "\n")
