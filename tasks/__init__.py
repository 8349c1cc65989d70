"""kiln's Prefect tasks (installed as ``kiln.tasks``): ``@task`` decorators over :mod:`kiln.steps`.

Retries (with backoff) are declared only on network steps (download, register); deterministic steps
fail once. Step results are cached by content keys in :mod:`kiln.cache`, not by Prefect's input
hashing, so a rebuild with identical inputs skips them on any worker sharing ``KILN_HOME``.
"""

import kiln.flows  # noqa: F401  (sets kiln's Prefect defaults before prefect is imported)
from kiln.tasks import progress  # noqa: F401  (step progress also goes to the Prefect run's log)
