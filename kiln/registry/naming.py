"""Names kiln gives things in the registry: registered models, store prefixes, tags, aliases.

One registered model per model x target (``<model>.<target>``, e.g. ``smollm2-135m.h100``): an alias
such as ``production`` names what one fleet of one GPU class serves, and every version of that
registered model can run there. Recipes are versions of it that compete for the ``candidate`` and
``production`` aliases; the recipe is a tag. The store keeps each version under an immutable,
content-addressed prefix ``<model>/<target>/<build key>/`` so a rebuild with identical inputs lands on
the same prefix (and the manifest's conditional put makes the first writer win).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kiln.errors import KilnInputError

CANDIDATE = "candidate"
PRODUCTION = "production"

EXPERIMENT_PREFIX = "kiln/"
FILES_DIR = "files"
"""Engine files live under ``<version prefix>/files/``; ``manifest.json`` sits beside that folder."""

# Model-version / registered-model / run tags.
TAG_MODEL = "kiln.model"
TAG_TARGET = "kiln.target"
TAG_RECIPE = "kiln.recipe"
TAG_BUILD_KEY = "kiln.build_key"
TAG_GATES = "kiln.gates"  # "passed" | "failed"
TAG_RECOMMENDED = "kiln.recommended"  # "true" | "false"
TAG_STATE = "kiln.state"  # "registering" -> "published" (set last)
TAG_MANIFEST_SHA256 = "kiln.manifest_sha256"
TAG_STORE_URI = "kiln.store_uri"
TAG_BACKEND = "kiln.engine.backend"
TAG_SM = "kiln.engine.sm"
TAG_LINEAGE_PREFIX = "kiln.lineage."
STATE_REGISTERING = "registering"
STATE_PUBLISHED = "published"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$")
_BUILD_KEY_RE = re.compile(r"^[0-9a-f]{16,128}$")


def history_tag(alias: str) -> str:
    """Registered-model tag holding the JSON list of every move of ``alias`` (newest last)."""
    return f"kiln.history.{alias}"


def move_tag(alias: str, field: str) -> str:
    """Model-version tag recording the latest move of ``alias`` onto that version
    (``by``/``at``/``reason``)."""
    return f"kiln.{alias}.{field}"


def check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value or ""):
        raise KilnInputError(
            f"{what} {value!r} is not a valid name: use letters, digits, '_', '.', '-' "
            "(start with a letter or digit, at most 101 characters)"
        )
    return value


def check_build_key(build_key: str) -> str:
    if not _BUILD_KEY_RE.match(build_key or ""):
        raise KilnInputError(f"build_key {build_key!r} must be a lowercase hex digest (kiln.cache.build_key)")
    return build_key


def registered_model_name(model: str, target: str | None) -> str:
    """``<model>.<target>``; without a target, ``model`` is taken as the full registered-model name."""
    check_name(model, "model name")
    if target is None:
        return model
    return f"{model}.{check_name(target, 'target')}"


def experiment_name(model: str) -> str:
    """One MLflow experiment per model: every (recipe, target) build of it is a run there."""
    return EXPERIMENT_PREFIX + model


def version_prefix(model: str, target: str, build_key: str) -> str:
    """Store-relative prefix of one version (no leading or trailing slash)."""
    return f"{check_name(model, 'model name')}/{check_name(target, 'target')}/{check_build_key(build_key)}"


@dataclass(frozen=True)
class VersionRef:
    """``NAME@ALIAS`` or ``NAME@vN`` / ``NAME@N`` (an explicit version), as given to fetch."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.alias if self.alias else 'v' + str(self.version)}"


def parse_ref(ref: str) -> VersionRef:
    """Split ``NAME@ALIAS`` / ``NAME@v3`` / ``NAME@3``; anything else is a KilnInputError."""
    name, sep, selector = (ref or "").partition("@")
    if not sep or not name or not selector:
        raise KilnInputError(
            f"{ref!r}: expected NAME@ALIAS (e.g. smollm2@production) or NAME@vN (e.g. smollm2@v3)"
        )
    check_name(name, "model name")
    if match := re.fullmatch(r"[vV]?(\d+)", selector):
        return VersionRef(name, version=str(int(match.group(1))))
    if not re.fullmatch(r"[\w-]{1,255}", selector):
        raise KilnInputError(f"{ref!r}: alias {selector!r} may hold only letters, digits, '_' and '-'")
    return VersionRef(name, alias=selector)
