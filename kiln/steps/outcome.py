"""One recipe x target row of a build: what the report, MLflow and the CLI table read."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Outcome:
    """One recipe x target row of the build: verdict, key metrics and where the version went."""

    recipe: str
    target: str
    status: str  # registered | failed-gates | skipped
    verdict: str
    metrics: dict[str, float] = field(default_factory=dict)
    recommended: bool = False
    model_name: str | None = None
    version: str | None = None
    uri: str | None = None
    reused: bool = False
    build_key: str | None = None
    task_notes: dict[str, str] = field(default_factory=dict)
