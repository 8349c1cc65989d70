"""`kiln` commands for quantize."""

from kiln.cli import app  # noqa: F401
