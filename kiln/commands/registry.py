"""`kiln` commands for registry."""

from kiln.cli import app  # noqa: F401
