"""Environment switches and on-disk layout, read in one place.

Every environment variable kiln honours is read here; other modules import these helpers instead of
touching ``os.environ`` themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

ENGINE_MANIFEST = "kiln-engine.json"
"""Written into every engine dir: backend, limits, SM, toolchain, lineage."""

LINEAGE_FILE = "kiln-lineage.json"
"""Written into every checkpoint dir: model repo + sha, recipe, calibration hash, versions."""

STORE_MANIFEST = "manifest.json"
"""Written last into every published version prefix; a prefix without it is not a version."""

TOKENIZER_CONFIG = "tokenizer_config.json"
"""The file that marks a dir as holding a tokenizer (transformers' ``AutoTokenizer`` needs it)."""

TOKENIZER_FILES = (
    TOKENIZER_CONFIG,
    "tokenizer.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""A model's tokenizer files: what a download fetches and what checkpoints and engine dirs carry."""

MODEL_SIDE_FILES = (*TOKENIZER_FILES, "generation_config.json")
"""What travels with the weights into a checkpoint or engine dir, so it serves alone."""


def kiln_home() -> Path:
    """State dir (Prefect home, MLflow db, artifact store, caches): ``$KILN_HOME`` or ``~/.kiln``."""
    return Path(os.environ.get("KILN_HOME") or Path.home() / ".kiln").expanduser().resolve()


def cache_dir() -> Path:
    return kiln_home() / "cache"


def hf_cache_dir() -> Path:
    """huggingface_hub cache; ``HF_HUB_CACHE``/``HF_HOME`` win when set, as huggingface_hub does."""
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME"):
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    return kiln_home() / "hf"


def assets_dir() -> Path:
    return kiln_home() / "assets"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or a SQLite store under KILN_HOME."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{kiln_home() / 'mlflow.db'}"


def default_store_uri() -> str:
    """``$KILN_STORE_URI`` or a ``file://`` artifact store under KILN_HOME."""
    return os.environ.get("KILN_STORE_URI") or (kiln_home() / "store").as_uri()


def store_uri_override() -> str | None:
    return os.environ.get("KILN_STORE_URI") or None


def tracking_uri_override() -> str | None:
    return os.environ.get("MLFLOW_TRACKING_URI") or None


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def hf_endpoint() -> str | None:
    """``$HF_ENDPOINT`` read at call time (huggingface_hub reads it once, at import); None means its
    default."""
    value = os.environ.get("HF_ENDPOINT", "").strip()
    return value.rstrip("/") or None


def profiles_dir() -> Path | None:
    """Optional library of named recipes/targets for profiles outside a ``profiles/`` tree."""
    value = os.environ.get("KILN_PROFILES_DIR")
    return Path(value).expanduser() if value else None


def packaged_profiles_dir() -> Path | None:
    """The recipe/target library installed with kiln (the repo's ``profiles/``, shipped as
    ``kiln.library``)."""
    import importlib.util

    spec = importlib.util.find_spec("kiln.library")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "recipes.yaml").is_file():
            return Path(location)
    return None


def prefect_home() -> Path:
    return kiln_home() / "prefect"


def torch_extensions_dir() -> Path:
    """ModelOpt's CUDA extension build cache (compiled on first INT4-AWQ use, which is slow): keep it across
    builds."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or kiln_home() / "torch_extensions")


SECRET_ENV_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "KILN_API_KEY",
)
"""Values of these never reach logs, Prefect artifacts or MLflow params (see kiln.redact)."""
