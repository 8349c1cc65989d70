"""kiln's Prefect flows (installed as ``kiln.flows``): build, per-target build, promote, revalidate, watch.

Importing this package points Prefect at kiln's embedded default before Prefect reads its settings:
``PREFECT_HOME`` under ``KILN_HOME`` (the ephemeral server's SQLite lives there) and no analytics
(there is no internet, and failed telemetry can lock that SQLite). A ``PREFECT_HOME`` or
``PREFECT_API_URL`` already in the environment (a worker, a test harness) is left alone.
"""

from __future__ import annotations

import os

from kiln import constants


def configure_prefect() -> None:
    """Set kiln's Prefect defaults in the environment; call before ``prefect`` is first imported."""
    os.environ.setdefault("PREFECT_HOME", str(constants.prefect_home()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


configure_prefect()
