"""CLI commands, one module per area: plain functions that ``kiln.cli`` registers on its app."""
