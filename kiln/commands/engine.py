"""`kiln` commands for engine."""

from kiln.cli import app  # noqa: F401
