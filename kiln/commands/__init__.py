"""CLI commands, one module per area; each decorates functions onto ``kiln.cli.app``."""
