"""kiln's library of named recipes and targets (the YAML files here), installed as ``kiln.library``."""
