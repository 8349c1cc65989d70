"""`kiln` commands for report."""

from kiln.cli import app  # noqa: F401
