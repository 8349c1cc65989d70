"""`kiln` commands for orchestrate."""

from kiln.cli import app  # noqa: F401
