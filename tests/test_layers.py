"""The layers and the lint stay true: import-linter's contracts (.importlinter) and ruff, in the one test run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def test_import_contracts_hold() -> None:
    """Domain modules and build steps never import Prefect; steps -> domain -> errors/constants/host facts; the
    torch engine does not import the registry."""
    done = subprocess.run([_tool("lint-imports"), "--config", str(ROOT / ".importlinter")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_ruff_is_clean() -> None:
    done = subprocess.run([_tool("ruff"), "check", "kiln", "flows", "tasks", "tests"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
