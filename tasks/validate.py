"""Per-target steps after compile as Prefect tasks: validate and register (:mod:`kiln.steps`)."""

from __future__ import annotations

from prefect import task

from kiln.steps import register as register_step
from kiln.steps import validate as validate_step
from kiln.tasks.options import LOCAL, NETWORK

validate = task(name="validate", timeout_seconds=4 * 3600, **LOCAL)(validate_step.validate)
"""Accuracy vs the baseline engine of the same target, performance, then the recipe's gates."""

register = task(name="register", timeout_seconds=3600, **NETWORK)(register_step.register)
"""Publish a passing engine (store + MLflow version, alias candidate); a rebuild reuses the version."""
