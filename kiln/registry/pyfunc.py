"""Every registered version is an MLflow model: the ``python_function`` flavor over the kiln engine files.

Publish writes ``MLmodel`` (plus ``requirements.txt``, ``python_env.yaml``, ``conda.yaml``) beside the
version's ``manifest.json`` in the artifact store, with ``data: files``: the flavor points at the engine
files kiln already stores, so the weights are kept once whatever reads them. ``loader_module`` is this
module (no pickled Python object in the registry: loading needs kiln installed, which the requirements
name). So ``mlflow.pyfunc.load_model("models:/NAME.TARGET@production").predict(...)`` and ``mlflow models
serve -m models:/NAME.TARGET@production --env-manager local`` work on any MLflow client.

kiln's manifest stays the source of truth: loading checks ``manifest.json`` against the sha256 the
``MLmodel`` records (the one the model version is tagged with) and every engine file against the manifest
before the engine loads (``kiln fetch`` / ``kiln serve`` check the same manifest against the registry).

Input (a DataFrame, a list of rows, a dict or a string): a ``prompt`` (text) or ``messages`` (chat turns,
rendered with the model's own chat template) per row. Output: ``text``, ``prompt_tokens``,
``completion_tokens`` and ``finish_reason`` per row. Params: ``max_tokens``, ``temperature`` (0 = greedy,
the default), ``top_p``, ``top_k``, ``seed`` (-1 = unseeded) and ``stop`` (strings).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

import yaml

from kiln import constants
from kiln.engine.manifest import EngineManifest
from kiln.errors import IntegrityError, KilnInputError
from kiln.registry.naming import FILES_DIR

MLMODEL = "MLmodel"
LOADER_MODULE = "kiln.registry.pyfunc"
DISTRIBUTION = "kiln-llm"
DEFAULT_PARAMS: dict[str, Any] = {
    "max_tokens": 64,
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "seed": -1,
    "stop": [],
}


def signature() -> Any:
    """Prompts or chat messages in; text and token counts out; the sampling fields as params."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    message = Object([Property("role", "string"), Property("content", "string")])
    inputs = Schema(
        [ColSpec("string", "prompt", required=False), ColSpec(Array(message), "messages", required=False)]
    )
    outputs = Schema(
        [
            ColSpec("string", "text"),
            ColSpec("long", "prompt_tokens"),
            ColSpec("long", "completion_tokens"),
            ColSpec("string", "finish_reason"),
        ]
    )
    types = {
        "max_tokens": "long",
        "temperature": "double",
        "top_p": "double",
        "top_k": "long",
        "seed": "long",
    }
    params = [ParamSpec(name, kind, DEFAULT_PARAMS[name]) for name, kind in types.items()]
    params.append(ParamSpec("stop", "string", DEFAULT_PARAMS["stop"], shape=(-1,)))
    return ModelSignature(inputs, outputs, ParamSchema(params))


def _requirements(engine: EngineManifest) -> list[str]:
    """What loading needs: kiln itself, MLflow, and the runtime the engine is tied to (major.minor for
    torch)."""
    found = [
        f"{DISTRIBUTION}=={importlib.metadata.version(DISTRIBUTION)}",
        f"mlflow=={importlib.metadata.version('mlflow')}",
    ]
    toolchain = engine.toolchain
    if engine.backend == "tensorrt_llm" and toolchain.get("tensorrt_llm"):
        found.append(f"tensorrt_llm=={toolchain['tensorrt_llm']}")
    elif toolchain.get("torch"):
        major_minor = ".".join(str(toolchain["torch"]).split("+")[0].split(".")[:2])
        found.append(f"torch=={major_minor}.*")
    return found


def flavor_files(manifest: Any, manifest_bytes: bytes) -> dict[str, bytes]:
    """``MLmodel`` and its environment files for a version prefix; the same bytes for the same manifest."""
    import uuid

    import mlflow.pyfunc
    from mlflow.models import Model

    python = platform.python_version()
    requirements = _requirements(manifest.engine)
    model = Model(
        signature=signature(),
        model_uuid=uuid.UUID(manifest.build_key[:32]).hex,
        utc_time_created=manifest.created_at.replace("T", " ").rstrip("Z"),
        model_size_bytes=manifest.total_bytes,
        metadata={
            "kiln": {
                "manifest": constants.STORE_MANIFEST,
                "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                "model": manifest.model,
                "target": manifest.target,
                "recipe": manifest.recipe,
                "build_key": manifest.build_key,
                "backend": manifest.engine.backend,
            }
        },
    )
    mlflow.pyfunc.add_to_model(
        model,
        loader_module=LOADER_MODULE,
        data=FILES_DIR,
        python_env="python_env.yaml",
        conda_env="conda.yaml",
    )
    python_env = {
        "python": python,
        "build_dependencies": ["pip", "setuptools", "wheel"],
        "dependencies": ["-r requirements.txt"],
    }
    conda = {
        "name": "mlflow-env",
        "channels": ["conda-forge"],
        "dependencies": [f"python={python}", "pip", {"pip": requirements}],
    }
    return {
        MLMODEL: model.to_yaml().encode(),
        "requirements.txt": ("\n".join(requirements) + "\n").encode(),
        "python_env.yaml": yaml.safe_dump(python_env, sort_keys=False).encode(),
        "conda.yaml": yaml.safe_dump(conda, sort_keys=False).encode(),
    }


def write_flavor(version_store: Any, manifest: Any, manifest_bytes: bytes) -> None:
    """Put the flavor files into a version prefix (create-if-absent: a rerun or a second publisher changes
    nothing)."""
    for name, data in flavor_files(manifest, manifest_bytes).items():
        version_store.put_bytes_if_absent(name, data)


# -- loading (what MLflow calls) -----------------------------------------------------------------------------


def _load_pyfunc(data_path: str) -> KilnEngineModel:
    """MLflow's entry point: ``data_path`` is the downloaded version's ``files/`` dir."""
    from kiln.engine.base import get_backend
    from kiln.registry.store import FETCHED_MANIFEST, verified_manifest, verify_dir
    from kiln.serve.text import TextCodec

    files = Path(data_path)
    root = files.parent
    raw = (
        (root / constants.STORE_MANIFEST).read_bytes()
        if (root / constants.STORE_MANIFEST).is_file()
        else None
    )
    if raw is None:
        raise IntegrityError(
            f"{root}: no {constants.STORE_MANIFEST} beside {FILES_DIR}/; this is not a kiln version"
        )
    expected = (_mlmodel_metadata(root).get("kiln") or {}).get("manifest_sha256")
    manifest = verified_manifest(raw, str(root / constants.STORE_MANIFEST), expected, "its MLmodel records")
    (files / FETCHED_MANIFEST).write_bytes(manifest.to_bytes())
    verify_dir(files)  # every engine file against the manifest, before a byte of it is loaded
    engine = get_backend(manifest.engine.backend).load(files)
    return KilnEngineModel(engine, TextCodec(files))


def _mlmodel_metadata(root: Path) -> dict[str, Any]:
    path = root / MLMODEL
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    return (data or {}).get("metadata") or {}


class KilnEngineModel:
    """The loaded pyfunc model: batched generation through the engine (``Engine.generate``)."""

    def __init__(self, engine: Any, codec: Any) -> None:
        self.engine, self.codec = engine, codec

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        from kiln.engine.base import GenerationRequest, SamplingParams
        from kiln.errors import GenerationLimitError

        p = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
        stop = [p["stop"]] if isinstance(p["stop"], str) else [str(s) for s in p["stop"]]
        sampling = SamplingParams(
            max_new_tokens=int(p["max_tokens"]),
            temperature=float(p["temperature"]),
            top_p=float(p["top_p"]),
            top_k=int(p["top_k"]),
            seed=None if int(p["seed"]) < 0 else int(p["seed"]),
            stop_token_ids=self.codec.eos_token_ids,
        )
        rows = _rows(model_input)
        if not rows:
            raise KilnInputError(
                "no input rows: pass a DataFrame (or records) with a 'prompt' or 'messages' column"
            )
        requests = [GenerationRequest(self._encode(row, i), sampling) for i, row in enumerate(rows)]
        try:
            results = self.engine.generate(requests)
        except GenerationLimitError as exc:
            from mlflow.exceptions import MlflowException

            raise MlflowException.invalid_parameter_value(str(exc)) from None
        out = []
        for request, result in zip(requests, results, strict=True):
            stream = self.codec.stream(stop, sampling.stop_token_ids, incremental=False)
            for token in result.token_ids:
                stream.push(token)
                if stream.stopped:
                    break
            out.append(
                {
                    "text": stream.final_text,
                    "prompt_tokens": len(request.prompt_token_ids),
                    "completion_tokens": len(stream.token_ids),
                    "finish_reason": "stop" if stream.stopped else result.finish_reason,
                }
            )
        return pd.DataFrame(out, columns=["text", "prompt_tokens", "completion_tokens", "finish_reason"])

    def _encode(self, row: dict[str, Any], index: int) -> list[int]:
        messages = row.get("messages")
        # NaN: a row without it
        if messages is not None and not isinstance(messages, float) and len(messages):
            return self.codec.encode_chat(
                [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
            )
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            return self.codec.encode_prompt(prompt)
        raise KilnInputError(f"row {index}: give a 'prompt' (text) or 'messages' ([{{role, content}}, ...])")


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """Rows of a DataFrame, a list of rows or prompts, a dict (one row, or a list of prompts), or one
    prompt."""
    if isinstance(model_input, str):
        return [{"prompt": model_input}]
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):
        return [dict(r) for r in model_input.to_dict(orient="records")]
    if isinstance(model_input, dict):
        if isinstance(model_input.get("prompt"), list):
            return [{"prompt": p} for p in model_input["prompt"]]
        return [{k: model_input[k] for k in ("prompt", "messages") if k in model_input}]
    if isinstance(model_input, list):
        return [{"prompt": r} if isinstance(r, str) else dict(r) for r in model_input]
    raise KilnInputError(
        f"unsupported input {type(model_input).__name__}: pass a DataFrame with a 'prompt' or "
        "'messages' column, a list of prompts or a dict"
    )
