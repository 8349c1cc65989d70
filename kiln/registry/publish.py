"""Publish one (recipe, target) build: store upload first, then the MLflow run and model version.

Order and what a crash leaves behind:

1. A version with this build key already published -> return it (``reused``); nothing is uploaded.
2. Upload into ``<store>/<model>/<target>/<build key>/``, manifest last. A crash here leaves no
   version anywhere (no manifest, no model version); the rerun skips files already uploaded. Then the
   MLflow ``MLmodel`` (python_function flavor, :mod:`kiln.registry.pyfunc`) beside the manifest, pointing
   at the same files, so the model version is loadable by ``mlflow.pyfunc`` and ``mlflow models serve``.
3. The build's MLflow run (found again by its build-key tag on a rerun): params, metrics, lineage
   tags, reports/plots, the manifest.
4. The model version (source = the store prefix), tagged ``kiln.state=registering``; a concurrent
   publisher of the same key that also created one keeps only the lowest version.
5. ``candidate`` moves to it if it passed its gates and validation recommended it.
6. ``kiln.state=published``, run FINISHED. A rerun after a crash in 3-6 finishes those steps on the
   existing version instead of creating a second one.

A build that failed its gates is published too (run + version tagged ``kiln.gates=failed``) so it can
be inspected and compared, but it never gets an alias and promote refuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln import constants
from kiln.engine import manifest as engine_manifest
from kiln.errors import KilnInputError, RegistryConfigError
from kiln.profiles import Registry
from kiln.redact import redact as _redact
from kiln.redact import scrub as _scrub
from kiln.registry import mlflow_registry as R
from kiln.registry import naming as N
from kiln.registry.pyfunc import write_flavor
from kiln.registry.store import ProgressFn, open_store, upload_version

_TAG_VALUE_LIMIT = 5000
_PARAM_VALUE_LIMIT = 6000


@dataclass(frozen=True)
class PublishedVersion:
    """Where a build went: registered model ``name`` version ``version``, files at ``uri``."""

    name: str
    version: str
    uri: str
    reused: bool
    run_id: str | None = None
    candidate: bool = False


def check_registry(registry: Registry) -> None:
    """Store and tracking server reachable and writable; call before any GPU work.

    Raises RegistryConfigError (a setting to fix: bad URI, missing bucket, no permission, a remote MLflow
    with a ``file://`` store) or RegistryError (unreachable: may pass on retry).
    """
    tracking_uri, store_uri = registry.resolved_tracking_uri, registry.resolved_store_uri
    if R.is_remote(tracking_uri) and store_uri.startswith("file://"):
        raise RegistryConfigError(
            f"tracking URI {tracking_uri} is a remote MLflow server but the store is {store_uri}: other "
            "machines could not fetch from a local dir and MLflow refuses local sources. Use an s3:// "
            "store_uri (or KILN_STORE_URI) with a remote tracking server"
        )
    open_store(store_uri).check_writable()
    R.check_tracking(tracking_uri, registry.model_name)


def _name_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return value["name"]
    return None


def flat_params(prefix: str, value: Any) -> dict[str, str]:
    """A nested mapping as flat MLflow params (``lineage.model.sha``, ``target.limits.max_seq_len``)."""
    flat: dict[str, str] = {}

    def walk(key: str, item: Any) -> None:
        if isinstance(item, dict):
            for sub, nested in item.items():
                walk(f"{key}.{sub}", nested)
        elif item is not None:
            flat[key] = item if isinstance(item, str) else json.dumps(item, sort_keys=True, default=str)

    walk(prefix, value)
    return flat


def _text(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return _redact(text)[:limit]


def _check_inputs(
    metrics: dict[str, float], params: dict[str, str], artifacts: list[Path]
) -> dict[str, float]:
    clean = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isinf(value):
            raise KilnInputError(f"metric {key!r}={value!r}: metrics must be finite numbers")
        clean[key] = float(value)
    for key in params:
        if not isinstance(key, str) or not key:
            raise KilnInputError(f"param name {key!r}: must be a non-empty string")
    for path in artifacts:
        if not Path(path).exists():
            raise KilnInputError(
                f"artifact {path}: does not exist (reports and plots must be written before publish)"
            )
    return clean


def publish(
    engine_dir: Path,
    *,
    registry: Registry,
    build_key: str,
    lineage: dict[str, Any],
    metrics: dict[str, float],
    params: dict[str, str],
    artifacts: list[Path],
    passed_gates: bool,
    recommended: bool,
    recipe: str | None = None,
    target: str | None = None,
    on_progress: ProgressFn | None = None,
) -> PublishedVersion:
    """Publish ``engine_dir`` as a version of ``<model>.<target>``; idempotent by ``build_key``.

    ``recipe``/``target`` default to ``lineage["recipe"]`` / ``lineage["target"]`` (a name or a mapping
    with ``name``). ``on_progress`` is called after each file upload (for progress bars).
    """
    engine_dir = Path(engine_dir)
    N.check_build_key(build_key)
    recipe = recipe or _name_of(lineage.get("recipe"))
    target = target or _name_of(lineage.get("target"))
    if not recipe or not target:
        raise KilnInputError(
            "publish needs the recipe and target names: pass recipe=/target= or put them in "
            "lineage['recipe'] / lineage['target']"
        )
    model = N.check_name(registry.model_name, "registry.model_name")
    N.check_name(recipe, "recipe")
    name = N.registered_model_name(model, target)
    metrics = _check_inputs(metrics, params, [Path(p) for p in artifacts])
    # Secrets are dropped before anything is written: the manifest, run params/tags and artifacts.
    lineage = _scrub(dict(lineage))
    params = _scrub({**flat_params("lineage", lineage), **params})
    engine = engine_manifest.read(engine_dir)  # what fetch checks machines against: refuse a dir without one
    tracking_uri, store_uri = registry.resolved_tracking_uri, registry.resolved_store_uri
    mlflow_client = R.client(tracking_uri)

    with R.mlflow_errors(tracking_uri, f"publish {name}"):
        existing = R.find_versions(mlflow_client, name, build_key)
        if existing and (existing[0].tags or {}).get(N.TAG_STATE) == N.STATE_PUBLISHED:
            mv = existing[0]
            return PublishedVersion(
                name,
                str(mv.version),
                mv.source,
                reused=True,
                run_id=mv.run_id,
                candidate=N.CANDIDATE in (mv.aliases or []),
            )

    root = open_store(store_uri)
    root.check_root()
    version_store = root.child(N.version_prefix(model, target, build_key))
    manifest, _ = upload_version(
        version_store,
        engine_dir,
        model=model,
        target=target,
        recipe=recipe,
        build_key=build_key,
        engine=engine,
        lineage=lineage,
        on_progress=on_progress,
    )
    manifest_bytes = manifest.to_bytes()
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    # the MLflow pyfunc flavor over the files just stored (no second copy of the weights), before registration
    write_flavor(version_store, manifest, manifest_bytes)
    gates = "passed" if passed_gates else "failed"
    tags = {
        N.TAG_MODEL: model,
        N.TAG_TARGET: target,
        N.TAG_RECIPE: recipe,
        N.TAG_BUILD_KEY: build_key,
        N.TAG_GATES: gates,
        N.TAG_RECOMMENDED: str(bool(recommended)).lower(),
        N.TAG_STORE_URI: version_store.uri,
        N.TAG_MANIFEST_SHA256: manifest_sha,
        N.TAG_BACKEND: engine.backend,
        N.TAG_SM: engine.sm or engine.device,
    }

    with R.mlflow_errors(tracking_uri, f"register {name}"):
        experiment_id = R.ensure_experiment(mlflow_client, tracking_uri, model)
        run_id = R.find_run(mlflow_client, experiment_id, build_key)
        if run_id is None:
            run_id = mlflow_client.create_run(
                experiment_id, run_name=f"{recipe}.{target}", tags=tags
            ).info.run_id
        try:
            _log_run(mlflow_client, run_id, tags, lineage, metrics, params, artifacts, manifest_bytes)

            R.ensure_registered_model(mlflow_client, name, model, target)
            versions = R.find_versions(mlflow_client, name, build_key)
            reused = bool(versions)
            if not versions:
                created = mlflow_client.create_model_version(
                    name,
                    source=version_store.uri,
                    run_id=run_id,
                    tags={**tags, N.TAG_STATE: N.STATE_REGISTERING},
                    description=f"{recipe} on {target}, build {build_key[:12]}, gates {gates}",
                )
                versions = R.find_versions(mlflow_client, name, build_key)
                for duplicate in versions[1:]:  # a concurrent publisher of the same key: lowest version wins
                    if str(duplicate.version) == str(created.version):
                        mlflow_client.delete_model_version(name, str(duplicate.version))
                        reused = True
                versions = versions[:1] or [created]
            mv = versions[0]
            version = str(mv.version)
            # The version's own tags decide, not this call's arguments: a rerun completes what was recorded.
            mv_tags = mv.tags or {}
            candidate = mv_tags.get(N.TAG_GATES) == "passed" and mv_tags.get(N.TAG_RECOMMENDED) == "true"
            if mv_tags.get(N.TAG_STATE) != N.STATE_PUBLISHED:
                if candidate and N.CANDIDATE not in (mv.aliases or []):
                    R.move_alias(
                        mlflow_client,
                        name,
                        N.CANDIDATE,
                        version,
                        action="publish",
                        reason=f"build {build_key[:12]} passed its gates and was recommended",
                    )
                mlflow_client.set_model_version_tag(name, version, N.TAG_STATE, N.STATE_PUBLISHED)
            mlflow_client.set_terminated(run_id, "FINISHED")
        # Ctrl-C / SIGTERM mid-registration: the run ends KILLED, not RUNNING forever
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                mlflow_client.set_terminated(run_id, "KILLED")
            raise
    return PublishedVersion(name, version, mv.source, reused=reused, run_id=run_id, candidate=candidate)


_PER_CONCURRENCY = re.compile(r"(.+)_c(\d+)")


def _source_tags() -> dict[str, str]:
    """The run's who/where as MLflow's own UI shows them: user, source (the kiln command) and, inside a git
    checkout, its commit."""
    import getpass
    import subprocess
    import sys

    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": " ".join(["kiln", *sys.argv[1:2]]).strip()}
    with contextlib.suppress(KeyError, OSError):
        tags["mlflow.user"] = getpass.getuser()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit.stdout.strip()):
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    return tags


def _log_run(
    mlflow_client: Any,
    run_id: str,
    tags: dict[str, str],
    lineage: dict[str, Any],
    metrics: dict[str, float],
    params: dict[str, str],
    artifacts: list[Path],
    manifest: bytes,
) -> None:
    """Params, metrics, tags and files of the build run; safe to repeat on a rerun of the same build."""
    from mlflow.entities import Metric, Param, RunTag

    logged = mlflow_client.get_run(run_id).data.params
    param_items = [
        Param(str(k)[:250], _text(v, _PARAM_VALUE_LIMIT))
        for k, v in sorted(params.items())
        if str(k)[:250] not in logged
    ]  # params are write-once in MLflow
    run_tags = dict(tags)
    run_tags.update(
        {f"{N.TAG_LINEAGE_PREFIX}{k}"[:250]: _text(v, _TAG_VALUE_LIMIT) for k, v in lineage.items()}
    )
    run_tags.update(_source_tags())
    tag_items = [RunTag(k, v) for k, v in sorted(run_tags.items())]
    stamp = int(time.time() * 1000)
    metric_items = [Metric(k[:250], v, stamp, 0) for k, v in sorted(metrics.items())]
    # per-concurrency metrics (itl_p50_ms_c4 ...) once more as one series with step = concurrency, so MLflow
    # draws a curve; the suffixed names stay (the gates read them)
    metric_items += [
        Metric(m.group(1)[:250], v, stamp, int(m.group(2)))
        for k, v in sorted(metrics.items())
        if (m := _PER_CONCURRENCY.fullmatch(k))
    ]
    for start in range(0, max(len(param_items), len(tag_items), len(metric_items)), 100):
        mlflow_client.log_batch(
            run_id,
            metrics=metric_items[start : start + 100],
            params=param_items[start : start + 100],
            tags=tag_items[start : start + 100],
        )
    with tempfile.TemporaryDirectory(prefix="kiln-run-") as tmp:
        kiln_dir = Path(tmp) / "kiln"
        kiln_dir.mkdir()
        (kiln_dir / constants.STORE_MANIFEST).write_bytes(manifest)
        (kiln_dir / "lineage.json").write_text(
            _redact(json.dumps(lineage, indent=1, sort_keys=True, default=str))
        )
        mlflow_client.log_artifacts(run_id, str(kiln_dir), "kiln")
    for path in map(Path, artifacts):
        if path.is_dir():
            mlflow_client.log_artifacts(run_id, str(path), f"reports/{path.name}")
        else:
            mlflow_client.log_artifact(run_id, str(path), "reports")
