"""kiln's error hierarchy. Each error says what went wrong and what to do about it.

``KilnInputError`` and its subclasses are the user's to fix (bad profile, bad model, impossible
recipe x target): the CLI exits with code 2 for them, before any expensive step. ``TransientError`` and its
subclasses may pass on a retry (a hub or store that is down or busy): the CLI exits with 75 (EX_TEMPFAIL),
so schedulers retry them instead of paging a human for a bad profile.

Retries and exit codes are decided from two typed attributes, never from an error's class name or text:
``retryable`` (:func:`is_retryable` walks the cause chain) and ``exit_code``. The places that map
huggingface_hub, MLflow, boto3 and Prefect errors onto these classes set ``retryable`` and the typed fields.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator


class KilnError(Exception):
    """Base class of every error kiln raises on purpose."""

    exit_code: int = 1
    retryable: bool | None = None
    """True: the same call may succeed later unchanged (a service down or busy); False: never, the input or
    the configuration must change; None: kiln's own check, so whatever caused it decides (no cause: False)."""

    def __init__(self, *args: object, retryable: bool | None = None) -> None:
        super().__init__(*args)
        if retryable is not None:  # an instance attribute: pickled and restored with the error
            self.retryable = retryable


class TransientError(KilnError):
    """A service kiln needs is down, busy or unreachable; the same command may pass later (exit code 75)."""

    exit_code = 75
    retryable = True


class HubUnavailableError(TransientError):
    """The Hugging Face hub (``HF_ENDPOINT``) answered 5xx/429 or could not be reached, and nothing is cached.

    Example: ``HubUnavailableError("model: hub repo 'org/m' at http://hub is failing or busy (HTTP 503) ...",
    repo_id="org/m", status=503)``; ``status`` is None when the hub could not be reached at all.
    """

    def __init__(self, message: str, *, repo_id: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.status = status


class KilnInputError(KilnError, ValueError):
    """A bad input: fix the named file, field or value and run again (exit code 2)."""

    exit_code = 2


class ProfileError(KilnInputError):
    """A profile file is missing, malformed, or fails validation.

    Example:
    ``ProfileError("profiles/x.yaml: targets[0].limits.max_seq_len: must be >= max_input_len (512)")``
    """


class ModelSourceError(KilnInputError):
    """The model cannot be used: unknown repo or revision, no safetensors, pickle-only, unsupported
    architecture."""


class CalibrationDataError(KilnInputError):
    """Calibration or held-out data is missing, too small, or overlaps."""


class UnsupportedCombinationError(KilnInputError):
    """A recipe cannot run on a target (e.g. fp8 below SM 89, nvfp4 without CUDA or below SM 100)."""


class BackendUnavailableError(KilnError):
    """A backend's runtime is not installed here (e.g. ``tensorrt_llm`` on a machine without NVIDIA's
    image)."""


class ContractError(KilnError):
    """kiln would emit or read something the installed TensorRT-LLM's API contract lacks
    (kiln/contracts/*.json)."""


class EngineMismatchError(KilnError):
    """An engine was built for another GPU SM or toolchain than this machine's, or its ``kiln-engine.json`` is
    missing, malformed or of another format (:func:`kiln.engine.manifest.read` names the file and field)."""


class GenerationLimitError(KilnInputError):
    """A generation request exceeds the engine's build limits (input length, batch, sequence length)."""


class RegistryError(KilnError):
    """The artifact store or MLflow registry refused or could not be reached (a build's register step retries
    it).

    ``where`` is the store key or tracking URI; ``code`` the service's error code (S3 ``SlowDown``, MLflow
    ``INTERNAL_ERROR``) or None when it could not be reached.
    """

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        where: str | None = None,
        code: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message, retryable=retryable)
        self.where = where
        self.code = code


class DeploymentNotFoundError(KilnError):
    """A target's ``kiln-target/<work pool>`` deployment is not on the Prefect server: add it to
    prefect.yaml."""

    retryable = False

    def __init__(self, message: str, *, deployment: str | None = None, target: str | None = None) -> None:
        super().__init__(message)
        self.deployment = deployment
        self.target = target


class IntegrityError(KilnError):
    """A downloaded or loaded file does not match its recorded SHA-256."""


class GateFailedError(KilnError):
    """An engine or checkpoint failed an accuracy/performance gate; it is never a candidate."""


class RegistryConfigError(KilnInputError, RegistryError):
    """The store or tracking URI cannot work as given: malformed URI, bucket missing, no permission.

    Example:
    ``RegistryConfigError("s3://engines/kiln: bucket 'engines' does not exist: create it or fix store_uri")``
    Network failures (endpoint down, timeouts) stay ``RegistryError``: they may pass on a retry.
    """

    retryable = False


class VersionNotFoundError(KilnInputError):
    """A registered model, model version or alias named on the command line does not exist."""


class NotPromotableError(KilnInputError):
    """A version failed its gates or was never completely published, so it cannot become ``production``."""


class DiskFullError(KilnError, OSError):
    """A step ran out of disk while writing (its partial output is removed); free space and run again.

    Example:
    ``DiskFullError("compile: cannot write /k/cache/compile/ab12/output (No space left on device) ...")``
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.args[1])


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed step may pass on a retry: the first error in the cause chain that decides it (a kiln
    error's ``retryable``; an HTTP answer of 5xx/429; a connection failure or timeout). Bad input, a refused
    credential and kiln's own checks fail the same way every time, so they are never retried."""
    seen: BaseException | None = exc
    while seen is not None:
        decided = seen.retryable if isinstance(seen, KilnError) else _third_party_retryable(seen)
        if decided is not None:
            return decided
        seen = seen.__cause__
    return False


def _third_party_retryable(exc: BaseException) -> bool | None:
    import httpx

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):  # an HTTP answer (the hub's errors are OSErrors too): busy or down only
        return status >= 500 or status == 429
    if isinstance(exc, OSError | TimeoutError | httpx.TransportError):
        return True  # connection refused/reset, timeouts
    return None


def disk_full(step: str, path: os.PathLike | str, exc: BaseException) -> DiskFullError | None:
    """The ``DiskFullError`` for ``exc`` when it (or its cause) is "no space left" from any writer (os,
    safetensors, torch, ModelOpt), naming the step and the path; None for any other error."""
    if isinstance(exc, DiskFullError):
        return exc
    seen: BaseException | None = exc
    while seen is not None:
        # safetensors (Rust) and some C extensions report ENOSPC only in their message
        if (
            (isinstance(seen, OSError) and seen.errno == errno.ENOSPC)
            or "No space left on device" in str(seen)
            or "os error 28" in str(seen)
        ):
            return DiskFullError(
                f"{step}: cannot write {path} (No space left on device); free space there, or point "
                "KILN_HOME at a disk with room, and run again (nothing partial was kept)"
            )
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def writing(step: str, path: os.PathLike | str) -> Iterator[None]:
    """Run a block that writes ``path``; running out of disk there raises one ``DiskFullError``."""
    try:
        yield
    except BaseException as exc:
        full = disk_full(step, path, exc)
        if full is None or full is exc:
            raise
        raise full from exc
