"""`kiln` commands for doctor."""

from kiln.cli import app  # noqa: F401
