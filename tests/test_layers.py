"""The layers and the lint stay true: import-linter's contracts (.importlinter), ruff's lint and ruff's
formatter, in the one test run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what ruff checks and formats: every Python tree of the repo, benchmarks included
PATHS = ["kiln", "flows", "tasks", "tests", "bench"]


def _tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold() -> None:
    """Domain modules and build steps never import Prefect; steps -> domain -> errors/constants/host facts;
    the torch engine does not import the registry."""
    done = _run(_tool("lint-imports"), "--config", str(ROOT / ".importlinter"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_ruff_is_clean() -> None:
    done = _run(_tool("ruff"), "check", *PATHS)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_ruff_format_is_applied() -> None:
    """Every converted file is as `ruff format` writes it (run `ruff format <file>` to fix one)."""
    done = _run(_tool("ruff"), "format", "--check", *PATHS)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
