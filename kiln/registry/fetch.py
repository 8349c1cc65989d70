"""GPU-aware fetch for serving: resolve ``NAME@ALIAS``, check this machine can run it, download, verify.

The engine record (``kiln-engine.json``, :class:`kiln.engine.manifest.EngineManifest`, copied into the
manifest at publish) says what an engine needs: its format, ``sm`` (``sm90``; None for CPU engines),
``backend`` and ``toolchain`` (package -> version, e.g. ``{"torch": "2.13.0"}``). TensorRT engines only run
on the SM and the TensorRT-LLM/TensorRT versions they were built with; torch engines on their SM and torch
major.minor. The check runs on the manifest, before a byte of the engine is fetched. A fetched dir keeps
the manifest (``kiln-manifest.json``): :func:`verify_if_fetched` re-checks its files before it is loaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from kiln import constants
from kiln.engine.manifest import FORMAT_VERSION, EngineManifest
from kiln.errors import EngineMismatchError, IntegrityError, NotPromotableError
from kiln.host import installed_versions
from kiln.registry import mlflow_registry as R
from kiln.registry import naming as N
from kiln.registry.store import (
    FETCHED_MANIFEST,
    ProgressFn,
    download_version,
    open_store,
    verified_manifest,
    verify_dir,
)


class ForcedFetchWarning(UserWarning):
    """``fetch(force=True)`` downloaded an engine this machine's GPU or toolchain does not match."""


class UnrecordedAliasWarning(UserWarning):
    """The alias fetched was moved outside kiln (e.g. in the MLflow UI): kiln has no record of that move."""


def _sm(value: Any) -> str | None:
    """``sm90`` / ``90`` / ``9.0`` -> ``sm90``; CPU markers -> None."""
    if value in (None, "", "cpu", "none"):
        return None
    text = str(value).lower().removeprefix("sm").removeprefix("_")
    if "." in text:
        major, minor = text.split(".", 1)
        text = f"{major}{minor}"
    return f"sm{text}" if text.isdigit() else None


def machine_profile() -> dict[str, Any]:
    """This machine's GPU SM (None without CUDA) and the runtime versions engines depend on."""
    sm = gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            sm, gpu = f"sm{major}{minor}", torch.cuda.get_device_name(0)
    except ImportError:
        pass
    versions = installed_versions(("torch", "tensorrt_llm", "tensorrt"))
    return {"sm": sm, "gpu": gpu, "versions": versions}


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def compatibility_problems(engine: EngineManifest, machine: dict[str, Any]) -> list[str]:
    """Why an engine with record ``engine`` cannot run on ``machine`` (empty when it can)."""
    problems = []
    if engine.format_version != FORMAT_VERSION:
        problems.append(f"its engine format is {engine.format_version}, this kiln reads {FORMAT_VERSION}")
    need_sm = _sm(engine.sm)
    if need_sm is not None and need_sm != machine.get("sm"):
        here = f"{machine['sm']} ({machine.get('gpu')})" if machine.get("sm") else "no CUDA GPU"
        problems.append(f"built for {need_sm} ({engine.gpu or 'GPU'}), this machine has {here}")
    built = {package: str(version) for package, version in engine.toolchain.items() if version is not None}
    have = machine.get("versions", {})
    if engine.backend == "tensorrt_llm":
        for package in ("tensorrt_llm", "tensorrt"):
            if package in built and have.get(package) != built[package]:
                problems.append(
                    f"built with {package} {built[package]}, this machine has "
                    f"{have.get(package) or 'no ' + package}"
                )
    elif "torch" in built:
        if not have.get("torch") or _major_minor(have["torch"]) != _major_minor(built["torch"]):
            problems.append(
                f"built with torch {built['torch']}, this machine has torch {have.get('torch') or 'none'} "
                "(major.minor must match)"
            )
    return problems


def fetch(
    name_at_alias: str,
    target: str | None,
    output_dir: Path,
    force: bool = False,
    *,
    tracking_uri: str | None = None,
    on_progress: ProgressFn | None = None,
) -> Path:
    """Download ``NAME@ALIAS`` (or ``NAME@vN``) of ``target`` into ``output_dir``, every file verified.

    Refuses (EngineMismatchError) when this machine's GPU SM or toolchain differs from the engine's
    record, unless ``force`` (then warns with ForcedFetchWarning); IntegrityError when a stored file or
    the manifest does not match what was registered. ``output_dir`` is written only when all files match.
    """
    ref = N.parse_ref(name_at_alias)
    name = N.registered_model_name(ref.name, target)
    tracking_uri = tracking_uri or constants.default_tracking_uri()
    selector = ref.alias or ref.version or ""
    mlflow_client = R.client(tracking_uri)
    with R.mlflow_errors(tracking_uri, f"fetch {name}@{selector}"):
        mv = R.get_version(mlflow_client, name, selector)
        unrecorded = [
            line
            for line in R.unrecorded_aliases(mlflow_client, name)
            if ref.alias and line.startswith(f"{name}@{ref.alias} ")
        ]
    for line in unrecorded:
        warnings.warn(line, UnrecordedAliasWarning, stacklevel=2)
    tags = mv.tags or {}
    if tags.get(N.TAG_GATES) == "failed" and ref.alias:
        raise NotPromotableError(
            f"{name}@{selector} points at v{mv.version}, which failed its gates; move the alias"
        )
    if tags.get(N.TAG_STATE) != N.STATE_PUBLISHED:
        # A publisher crashed after creating the version: its files may be complete but its record is not.
        raise NotPromotableError(
            f"{name} v{mv.version} is not completely published ({N.TAG_STATE}="
            f"{tags.get(N.TAG_STATE, 'unset')}); rerun the build that published it "
            "(it completes the same version), then fetch"
        )
    version = open_store(mv.source)
    raw = version.get_bytes(constants.STORE_MANIFEST)
    if raw is None:
        raise IntegrityError(
            f"{name} v{mv.version}: no manifest at {mv.source}; its files are gone or were never "
            "completely uploaded. Rerun the build that published it"
        )
    expected = tags.get(N.TAG_MANIFEST_SHA256)
    manifest = verified_manifest(
        raw,
        f"{mv.source}/{constants.STORE_MANIFEST}",
        expected,
        f"registered with {name} v{mv.version} ({expected})",
    )
    problems = compatibility_problems(manifest.engine, machine_profile())
    if problems:
        detail = f"{name} v{mv.version} ({manifest.recipe}): " + "; ".join(problems)
        if not force:
            raise EngineMismatchError(
                f"{detail}. Fetch it on a machine of its target ({manifest.target}), fetch "
                "the version built for this one, or pass --force to download anyway"
            )
        warnings.warn(
            f"FORCED fetch of an engine this machine cannot run as built: {detail}",
            ForcedFetchWarning,
            stacklevel=2,
        )
    return download_version(version, Path(output_dir), manifest, on_progress)


def verify_if_fetched(engine_dir: Path) -> None:
    """Before loading ``engine_dir``: when ``fetch`` wrote it, every file must still match the registered
    manifest it left there (``IntegrityError`` naming the file otherwise); a dir built here has no record."""
    if (Path(engine_dir) / FETCHED_MANIFEST).is_file():
        verify_dir(Path(engine_dir))
