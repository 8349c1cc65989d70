"""kiln's Prefect flows (installed as ``kiln.flows``): build, per-target build, promote, revalidate, watch.

Importing this package points Prefect at kiln's embedded default before Prefect reads its settings:
``PREFECT_HOME`` under ``KILN_HOME`` (the ephemeral server's SQLite lives there) and no analytics
(there is no internet, and failed telemetry can lock that SQLite). A ``PREFECT_HOME`` or
``PREFECT_API_URL`` already in the environment (a worker, a test harness) is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from kiln import constants


def configure_prefect() -> None:
    """Set kiln's Prefect defaults in the environment; call before ``prefect`` is first imported."""
    home = os.environ.setdefault("PREFECT_HOME", str(constants.prefect_home()))
    # Prefect creates its home without parents; a fresh KILN_HOME would leave the ephemeral server
    # without a database ("unable to open database file") and a 40 s startup timeout
    Path(home).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # a fresh KILN_HOME migrates the SQLite database first: on a busy 2-core machine that outlasts
    # Prefect's 20 s default and the build would die before its first step
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def embedded_server_in_its_own_session() -> None:
    """Start Prefect's ephemeral server in a session of its own, so the terminal's Ctrl-C (sent to the whole
    foreground process group) reaches kiln but not the server: the interrupted build can still record its
    runs as Cancelled, and Prefect stops the server at exit. (Without it the server died first and the
    build hung for minutes retrying it, then printed hundreds of lines of connection tracebacks.)"""
    import subprocess

    from prefect.server.api import server

    original = server.SubprocessASGIServer._run_uvicorn_command
    if getattr(original, "_kiln_own_session", False):
        return

    def run_in_own_session(self: server.SubprocessASGIServer) -> subprocess.Popen:
        popen = server.subprocess.Popen
        server.subprocess.Popen = lambda *args, **kwargs: popen(*args, start_new_session=True, **kwargs)
        try:
            return original(self)
        finally:
            server.subprocess.Popen = popen

    run_in_own_session._kiln_own_session = True  # type: ignore[attr-defined]
    server.SubprocessASGIServer._run_uvicorn_command = run_in_own_session


configure_prefect()
