"""MLflow side of the registry: build runs, registered model versions, recorded alias moves.

Every alias move (``candidate`` by a passing build, ``production`` by promote/rollback) sets the alias,
tags the version it lands on with who/when/why/action, and appends an entry to the registered model's
``kiln.history.<alias>`` tag (JSON, newest last). Rollback replays that history as a stack (promote
pushes, rollback pops), so repeated rollbacks walk back through earlier production versions.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import NotPromotableError, RegistryError, VersionNotFoundError
from kiln.registry import naming as N

# MLflow 3's UI opens an experiment on its GenAI overview unless this tag says it holds model runs
EXPERIMENT_KIND, CLASSIC_RUNS = "mlflow.experimentKind", "custom_model_development"
HISTORY_LIMIT = 200
"""Entries kept per alias history tag (a tag value holds up to 100,000 characters)."""


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version as kiln sees it (what ``kiln versions`` lists)."""

    name: str
    version: str
    target: str | None
    recipe: str | None
    aliases: list[str]
    passed_gates: bool
    recommended: bool
    state: str
    build_key: str | None
    uri: str
    run_id: str | None
    created_at: str
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def whoami() -> str:
    """``user@host`` for alias-move records."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@contextlib.contextmanager
def mlflow_errors(tracking_uri: str, action: str) -> Iterator[None]:
    """Turn MLflow client failures into kiln errors naming the tracking URI and what to do."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise VersionNotFoundError(f"{action}: {exc.message} (tracking URI {tracking_uri})") from None
        raise RegistryError(
            f"MLflow at {tracking_uri}: {action} failed: {exc.message}. Check that the "
            "server is up and MLFLOW_TRACKING_URI / the profile's tracking_uri",
            where=tracking_uri,
            code=exc.error_code,
        ) from None
    except OSError as exc:  # requests' ConnectionError is an OSError
        raise RegistryError(
            f"MLflow at {tracking_uri}: {action} failed: cannot reach it ({exc}); start the "
            "server or fix MLFLOW_TRACKING_URI / the profile's tracking_uri",
            where=tracking_uri,
            retryable=True,
        ) from None


def client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    if not tracking_uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    # creating the first client of a new SQLite store creates and migrates its schema (the tracking store
    # in the constructor, the registry store on first use): two builds starting at once on a fresh
    # KILN_HOME raced there (alembic "Online migration expected to match one row", "duplicate column
    # name"); one process at a time
    with _schema_lock(tracking_uri):
        mlflow_client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        mlflow_client.search_registered_models(max_results=1)
    return mlflow_client


def is_remote(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://", "databricks"))


def check_tracking(tracking_uri: str, model: str) -> None:
    """The tracking server answers and accepts writes (creates the model's experiment if missing)."""
    if tracking_uri.startswith(("http://", "https://")):
        import requests

        try:
            response = requests.get(tracking_uri.rstrip("/") + "/health", timeout=5)
        except requests.RequestException as exc:
            raise RegistryError(
                f"MLflow tracking server {tracking_uri} is unreachable ({type(exc).__name__}); "
                "start it or fix MLFLOW_TRACKING_URI / the profile's tracking_uri",
                where=tracking_uri,
                retryable=True,
            ) from None
        if response.status_code != 200:
            raise RegistryError(
                f"MLflow tracking server {tracking_uri}: /health answered {response.status_code}; "
                "is this an MLflow server?",
                where=tracking_uri,
                code=str(response.status_code),
            )
    mlflow_client = client(tracking_uri)
    with mlflow_errors(tracking_uri, "registry check"):
        ensure_experiment(mlflow_client, tracking_uri, model)
        mlflow_client.search_registered_models(max_results=1)


def _schema_lock(tracking_uri: str) -> Any:
    from filelock import FileLock

    db = Path(tracking_uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{db}.kiln-schema.lock", timeout=600)


def _local_artifact_root(tracking_uri: str) -> str | None:
    """Next to a local SQLite DB (MLflow would otherwise write to ``./mlruns`` of the current dir)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri.removeprefix("sqlite:///")).expanduser().resolve()
    return (db.parent / "mlartifacts").as_uri()


def ensure_experiment(mlflow_client: Any, tracking_uri: str, model: str) -> str:
    name = N.experiment_name(model)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(experiment.experiment_id)
        if experiment.tags.get(EXPERIMENT_KIND) != CLASSIC_RUNS:
            mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, CLASSIC_RUNS)
        return experiment.experiment_id
    root = _local_artifact_root(tracking_uri)
    location = f"{root}/{model}" if root else None
    try:
        return mlflow_client.create_experiment(
            name, artifact_location=location, tags={N.TAG_MODEL: model, EXPERIMENT_KIND: CLASSIC_RUNS}
        )
    except Exception:
        experiment = mlflow_client.get_experiment_by_name(name)  # created concurrently
        if experiment is None:
            raise
        return experiment.experiment_id


def ensure_registered_model(mlflow_client: Any, name: str, model: str, target: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(
            name,
            tags={N.TAG_MODEL: model, N.TAG_TARGET: target},
            description=f"kiln engines of {model} for target {target}: one version per (recipe, build).",
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def find_versions(mlflow_client: Any, name: str, build_key: str) -> list[Any]:
    """Versions of ``name`` carrying ``build_key``, lowest version first."""
    from mlflow.exceptions import MlflowException

    query = f"name = '{name}' and tags.`{N.TAG_BUILD_KEY}` = '{build_key}'"
    try:
        found = list(mlflow_client.search_model_versions(query))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    return sorted(found, key=lambda mv: int(mv.version))


def find_run(mlflow_client: Any, experiment_id: str, build_key: str) -> str | None:
    runs = mlflow_client.search_runs(
        [experiment_id],
        f"tags.`{N.TAG_BUILD_KEY}` = '{build_key}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def get_version(mlflow_client: Any, name: str, selector: str) -> Any:
    """A version by number (``3``, ``v3``) or alias (``candidate``)."""
    from mlflow.exceptions import MlflowException

    digits = selector[1:] if selector[:1] in "vV" and selector[1:].isdigit() else selector
    try:
        if digits.isdigit():
            return mlflow_client.get_model_version(name, str(int(digits)))
        return mlflow_client.get_model_version_by_alias(name, selector)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            known = _known_versions(mlflow_client, name)
            raise VersionNotFoundError(f"{name}: no version or alias {selector!r}; {known}") from None
        raise


def _known_versions(mlflow_client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow_client.get_registered_model(name)
    except MlflowException:
        return f"registered model {name!r} does not exist (run `kiln versions MODEL` to list what does)"
    versions = sorted(int(mv.version) for mv in mlflow_client.search_model_versions(f"name = '{name}'"))
    aliases = ", ".join(f"{a}->v{v}" for a, v in sorted(model.aliases.items())) or "none"
    return f"versions: {', '.join(map(str, versions)) or 'none'}; aliases: {aliases}"


def history(mlflow_client: Any, name: str, alias: str, registered: Any = None) -> list[dict[str, Any]]:
    raw = (registered or mlflow_client.get_registered_model(name)).tags.get(N.history_tag(alias))
    if not raw:
        return []
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError:
        return []
    return entries if isinstance(entries, list) else []


def unrecorded_aliases(mlflow_client: Any, name: str, registered: Any = None) -> list[str]:
    """One line per alias of ``name`` that points somewhere kiln's recorded history does not end: it was moved
    outside kiln (the MLflow UI, another client), so who moved it, when and why are unknown, and a rollback
    would walk kiln's history, not that move."""
    registered = registered or mlflow_client.get_registered_model(name)
    lines = []
    for alias, version in sorted(registered.aliases.items()):
        entries = history(mlflow_client, name, alias, registered)
        recorded = entries[-1].get("version") if entries else None
        if recorded != str(version):
            where = f"v{recorded}" if recorded else "no version (no move recorded)"
            lines.append(
                f"{name}@{alias} points at v{version}, but kiln's last recorded move put it on {where}: it "
                "was moved outside kiln, with no who/when/why; record it with `kiln promote` (or move it "
                "back)"
            )
    return lines


def move_alias(
    mlflow_client: Any, name: str, alias: str, version: str, *, action: str, reason: str | None
) -> dict[str, Any]:
    """Point ``alias`` at ``version`` and record the move (version tags + registered-model history)."""
    model = mlflow_client.get_registered_model(name)
    previous = model.aliases.get(alias)
    entry = {
        "alias": alias,
        "action": action,
        "version": str(version),
        "previous": str(previous) if previous is not None else None,
        "by": whoami(),
        "at": now_iso(),
        "reason": reason or "",
    }
    mlflow_client.set_registered_model_alias(name, alias, str(version))
    for key in ("action", "by", "at", "reason"):
        mlflow_client.set_model_version_tag(name, str(version), N.move_tag(alias, key), entry[key])
    entries = (history(mlflow_client, name, alias) + [entry])[-HISTORY_LIMIT:]
    mlflow_client.set_registered_model_tag(name, N.history_tag(alias), json.dumps(entries))
    return entry


def _info(
    mlflow_client: Any, mv: Any, aliases: list[str] | None = None, with_metrics: bool = True
) -> VersionInfo:
    tags = dict(mv.tags or {})
    metrics: dict[str, float] = {}
    if with_metrics and mv.run_id:
        with contextlib.suppress(Exception):  # a deleted run leaves the version listable
            metrics = dict(mlflow_client.get_run(mv.run_id).data.metrics)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(mv.creation_timestamp or 0) / 1000))
    return VersionInfo(
        name=mv.name,
        version=str(mv.version),
        target=tags.get(N.TAG_TARGET),
        recipe=tags.get(N.TAG_RECIPE),
        aliases=sorted(aliases if aliases is not None else (mv.aliases or [])),
        passed_gates=tags.get(N.TAG_GATES) == "passed",
        recommended=tags.get(N.TAG_RECOMMENDED) == "true",
        state=tags.get(N.TAG_STATE, "unknown"),
        build_key=tags.get(N.TAG_BUILD_KEY),
        uri=mv.source,
        run_id=mv.run_id,
        created_at=created,
        metrics=metrics,
        tags=tags,
    )


def check_promotable(mv: Any) -> None:
    tags = mv.tags or {}
    if tags.get(N.TAG_GATES) != "passed":
        raise NotPromotableError(
            f"{mv.name} v{mv.version} failed its gates ({N.TAG_GATES}={tags.get(N.TAG_GATES, 'unset')}); it "
            "can never become production. Promote a version that passed (`kiln versions` shows them)"
        )
    if tags.get(N.TAG_STATE) != N.STATE_PUBLISHED:
        raise NotPromotableError(
            f"{mv.name} v{mv.version} was not completely published "
            f"({N.TAG_STATE}={tags.get(N.TAG_STATE, 'unset')}); rerun its build to complete it, then promote"
        )


def promote(
    tracking_uri: str, name: str, selector: str, *, reason: str | None, check_files: Any = None
) -> tuple[VersionInfo, dict[str, Any] | None]:
    """Move ``production`` to a passing, published version; returns (version, move or None if already
    there)."""
    mlflow_client = client(tracking_uri)
    with mlflow_errors(tracking_uri, f"promote {name}@{selector}"):
        mv = get_version(mlflow_client, name, selector)
        check_promotable(mv)
        if check_files is not None:
            check_files(mv)
        current = mlflow_client.get_registered_model(name).aliases.get(N.PRODUCTION)
        if current is not None and str(current) == str(mv.version):
            return _info(mlflow_client, mv), None
        entry = move_alias(
            mlflow_client, name, N.PRODUCTION, str(mv.version), action="promote", reason=reason
        )
        return _info(mlflow_client, mlflow_client.get_model_version(name, str(mv.version))), entry


def rollback_target(entries: list[dict[str, Any]], current: str) -> str | None:
    """The production version before ``current``: replay promote (push) / rollback (pop) as a stack."""
    stack: list[str] = []
    for entry in entries:
        if entry.get("action") == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != entry.get("version"):
                stack.append(str(entry.get("version")))
        else:
            stack.append(str(entry.get("version")))
    while stack and stack[-1] == current:
        stack.pop()
    return stack[-1] if stack else None


def rollback(tracking_uri: str, name: str, *, reason: str | None) -> tuple[VersionInfo, dict[str, Any]]:
    """Move ``production`` back to the version it held before the current one."""
    mlflow_client = client(tracking_uri)
    with mlflow_errors(tracking_uri, f"rollback {name}"):
        current = mlflow_client.get_registered_model(name).aliases.get(N.PRODUCTION)
        if current is None:
            raise VersionNotFoundError(
                f"{name}: no version holds 'production'; nothing to roll back "
                "(promote one with `kiln promote`)"
            )
        previous = rollback_target(history(mlflow_client, name, N.PRODUCTION), str(current))
        if previous is None:
            raise VersionNotFoundError(
                f"{name}: production is v{current} and no earlier production version is "
                "recorded; promote the version you want explicitly"
            )
        mv = get_version(mlflow_client, name, previous)
        check_promotable(mv)
        entry = move_alias(mlflow_client, name, N.PRODUCTION, previous, action="rollback", reason=reason)
        return _info(mlflow_client, mlflow_client.get_model_version(name, previous)), entry


def registered_names(tracking_uri: str, model: str, target: str | None) -> list[str]:
    """Registered models of ``model`` (one per target), or the one for ``target``."""
    mlflow_client = client(tracking_uri)
    if target is not None:
        return [N.registered_model_name(model, target)]
    found = mlflow_client.search_registered_models(f"tags.`{N.TAG_MODEL}` = '{model}'")
    names = sorted(rm.name for rm in found)
    if not names:
        with contextlib.suppress(Exception):
            names = [mlflow_client.get_registered_model(model).name]
    return names


def list_versions(tracking_uri: str, model: str, target: str | None = None) -> list[VersionInfo]:
    """Every version of the model (on every target, or one), newest first, with run metrics and aliases."""
    mlflow_client = client(tracking_uri)
    with mlflow_errors(tracking_uri, f"list versions of {model}"):
        names = registered_names(tracking_uri, model, target)
        infos: list[VersionInfo] = []
        for name in names:
            aliases_by_version: dict[str, list[str]] = {}
            try:
                registered = mlflow_client.get_registered_model(name)
            except Exception as exc:
                if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                    raise VersionNotFoundError(
                        f"registered model {name!r} does not exist at {tracking_uri}; "
                        "check the model and target names"
                    ) from None
                raise
            for alias, version in registered.aliases.items():
                aliases_by_version.setdefault(str(version), []).append(alias)
            token = None
            while True:
                page = mlflow_client.search_model_versions(
                    f"name = '{name}'", max_results=1000, page_token=token
                )
                infos += [
                    _info(mlflow_client, mv, aliases_by_version.get(str(mv.version), [])) for mv in page
                ]
                token = page.token
                if not token:
                    break
        if not infos and target is None and not names:
            raise VersionNotFoundError(
                f"no registered models for {model!r} at {tracking_uri}; "
                "publish a build first or check the name"
            )
    return sorted(infos, key=lambda info: (info.name, -int(info.version)))
