"""Model sources: pin a hub revision to its commit sha and fetch only safetensors, config and tokenizer files.

kiln never unpickles weights: ``.bin``/``.pt``/``.pth``/``.pkl`` files are refused unless a request says
``allow_pickle: true``, and even then they are only downloaded, never loaded. A local directory's identity is
the sha256 of its files, so the same bytes give the same build key wherever they live.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from kiln import constants
from kiln.errors import HubUnavailableError, IntegrityError, ModelSourceError
from kiln.families import architectures, family_for
from kiln.profiles import HubModel, LocalModel

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = architectures()

# transformers' own names for safetensors weights (a single file, or shards plus their index); other
# *.safetensors in a repo (consolidated.safetensors, onnx/...) are other formats and not downloaded.
WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
CONFIG_PATTERNS = ("config.json", "generation_config.json")
DEFAULT_PATTERNS = WEIGHT_PATTERNS + CONFIG_PATTERNS + constants.TOKENIZER_FILES
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")

_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


@dataclass(frozen=True)
class ModelSnapshot:
    """A model pinned to exact bytes: a hub commit sha, or the content hash of a local directory."""

    path: Path
    sha: str
    source: Literal["hub", "local"]
    repo_id: str | None = None
    revision: str | None = None

    def lineage(self) -> dict[str, str | None]:
        """What lineage files and build keys record about the model."""
        return {
            "source": self.source,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "sha": self.sha,
            "path": str(self.path),
        }


@dataclass(frozen=True)
class ModelInfo:
    """The shape of a model, read from ``config.json`` and the safetensors headers (no weights loaded)."""

    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    torch_dtype: str
    param_count: int
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fetch_model(model: HubModel | LocalModel, *, token: str | None = None) -> ModelSnapshot:
    """Pin and fetch a model; ``token`` (else ``HF_TOKEN``/the saved login) is only ever sent to the hub."""
    if isinstance(model, LocalModel):
        return _local_snapshot(model)
    return _hub_snapshot(model, token)


# --- hub -------------------------------------------------------------------------------------------------


def _hub_snapshot(model: HubModel, token: str | None) -> ModelSnapshot:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub import constants as hf_constants
    from huggingface_hub.file_download import repo_folder_name

    endpoint = constants.hf_endpoint()
    cache_dir = constants.hf_cache_dir()
    offline = constants.hf_offline()
    where = f"hub repo {model.repo_id!r} at {endpoint or hf_constants.ENDPOINT}"
    patterns = list(DEFAULT_PATTERNS) + list(model.allow_patterns or [])
    api = HfApi(endpoint=endpoint, token=token)

    with _hub_errors(model, where, offline, token):
        revision = api.resolve_revision(
            model.repo_id, revision=model.revision, cache_dir=cache_dir, local_files_only=offline
        )
        sha = revision.resolved
        snapshot_dir = (
            cache_dir / repo_folder_name(repo_id=model.repo_id, repo_type="model") / "snapshots" / sha
        )
        complete = False
        if not offline:
            info = api.model_info(model.repo_id, revision=sha)
            remote_files = [sibling.rfilename for sibling in info.siblings or []]
            selected = _check_files(remote_files, patterns, model.allow_pickle, f"{where} (commit {sha})")
            complete = all((snapshot_dir / name).is_file() for name in selected)
            # The architecture decides whether the weights are worth fetching: check it first.
            config_path = hf_hub_download(
                model.repo_id,
                "config.json",
                revision=sha,
                cache_dir=cache_dir,
                endpoint=endpoint,
                token=token,
            )
            check_architecture(_read_json(Path(config_path)), f"{where} (commit {sha})")
        log.info("fetching %s@%s (commit %s)", model.repo_id, model.revision, sha)
        path = Path(
            snapshot_download(
                model.repo_id,
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=patterns,
                local_files_only=offline,
                endpoint=endpoint,
                token=token,
            )
        )
        if not offline and not complete:
            _verify_checksums(api, model.repo_id, sha, cache_dir, path)

    # Offline, only the cached files can say what the snapshot holds.
    _check_files(_list_files(path), patterns, model.allow_pickle, f"cached snapshot {path}")
    check_architecture(_read_json(path / "config.json"), str(path))
    return ModelSnapshot(path=path, sha=sha, source="hub", repo_id=model.repo_id, revision=model.revision)


def _verify_checksums(api: Any, repo_id: str, sha: str, cache_dir: Path, path: Path) -> None:
    """Compare fresh downloads with the hub's git/LFS hashes: a pinned sha is only as good as its bytes."""
    result = api.verify_repo_checksums(repo_id, revision=sha, cache_dir=cache_dir)
    if not result.mismatches:
        return
    for mismatch in result.mismatches:
        # Drop the bad bytes (cache pointer and blob) so the next fetch downloads them again.
        pointer = path / mismatch["path"]
        blob = pointer.resolve()
        pointer.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
    names = ", ".join(
        f"{m['path']} ({m['algorithm']} {m['actual'][:12]} != {m['expected'][:12]})"
        for m in result.mismatches
    )
    raise IntegrityError(
        f"{path}: downloaded files do not match commit {sha} of {repo_id}: {names}; the bad "
        "files were removed from the cache: fetch again (a repeat means a corrupting proxy or hub)"
    )


@contextmanager
def _hub_errors(model: HubModel, where: str, offline: bool, token: str | None) -> Iterator[None]:
    """Turn huggingface_hub's errors into ModelSourceErrors that say which field to fix and how."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    try:
        yield
    except RevisionNotFoundError as exc:
        raise ModelSourceError(
            f"model.revision: {model.revision!r} is not a branch, tag or commit of {where}; "
            "use one that exists (e.g. main, a release tag, or a full 40-character commit sha)",
            retryable=False,
        ) from _scrubbed(exc, token)
    except GatedRepoError as exc:
        raise ModelSourceError(
            f"model.repo_id: {where} is gated: accept its terms on the hub with your account, then set "
            "HF_TOKEN to a token of that account",
            retryable=False,
        ) from _scrubbed(exc, token)
    except RepositoryNotFoundError as exc:
        raise ModelSourceError(
            f"model.repo_id: {where} does not exist or is not visible: check the name (owner/name); for a "
            "private repo set HF_TOKEN to a token that can read it",
            retryable=False,
        ) from _scrubbed(exc, token)
    except (RevisionResolutionError, LocalEntryNotFoundError) as exc:
        if offline:
            raise ModelSourceError(
                f"model: HF_HUB_OFFLINE is set and {model.repo_id}@{model.revision} is not in the cache "
                f"{constants.hf_cache_dir()}: fetch it once online (unset HF_HUB_OFFLINE), or pin "
                "model.revision to a commit sha that is cached",
                retryable=False,
            ) from _scrubbed(exc, token)
        raise HubUnavailableError(
            f"model: cannot reach {where} and {model.repo_id}@{model.revision} is not cached: check "
            "HF_ENDPOINT and the network, or set HF_HUB_OFFLINE=1 to use a cached snapshot",
            repo_id=model.repo_id,
        ) from _scrubbed(exc, token)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        if isinstance(status, int) and (status >= 500 or status == 429):
            raise HubUnavailableError(
                f"model: {where} is failing or busy (HTTP {status}); the build's download step retries this, "
                "try again later if it persists",
                repo_id=model.repo_id,
                status=status,
            ) from _scrubbed(exc, token)
        raise ModelSourceError(
            f"model: {where} refused the request (HTTP {status}); check HF_TOKEN's permissions and "
            "HF_ENDPOINT",
            retryable=False,
        ) from _scrubbed(exc, token)


def _scrubbed(exc: BaseException, token: str | None) -> BaseException:
    """The hub's error, minus any trace of the token (its messages carry URLs, never headers; belt and
    braces)."""
    secrets = [t for t in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")) if t]
    if any(secret in str(exc) for secret in secrets):
        return ModelSourceError("hub error (message withheld: it contained a credential)")
    return exc


# --- file selection ---------------------------------------------------------------------------------------


def _check_files(files: Iterable[str], patterns: list[str], allow_pickle: bool, where: str) -> list[str]:
    """The files kiln will fetch from ``files``; refuse pickles and repos without HF safetensors weights."""
    from huggingface_hub.utils import filter_repo_objects

    files = sorted(files)
    selected = list(filter_repo_objects(files, allow_patterns=patterns))
    pickles = [name for name in selected if name.endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        raise ModelSourceError(
            f"{where}: model.allow_patterns selects pickle files {pickles}; pickles can run code when "
            "loaded. Remove those patterns, or set model.allow_pickle: true (kiln downloads them but never "
            "unpickles them)"
        )
    if "config.json" not in selected:
        raise ModelSourceError(
            f"{where}: no config.json: kiln needs a Hugging Face transformers model repo/dir"
        )
    weights = list(filter_repo_objects(selected, allow_patterns=list(WEIGHT_PATTERNS)))
    if not any(name.endswith(".safetensors") for name in weights):
        all_pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
        other_safetensors = [name for name in files if name.endswith(".safetensors")]
        if all_pickles:
            raise ModelSourceError(
                f"{where}: holds only pickle weights ({', '.join(all_pickles[:3])}); kiln loads safetensors "
                "only. Convert them (transformers: from_pretrained then save_pretrained, which writes "
                "model.safetensors) and point model at the converted repo or directory"
            )
        hint = (
            f" (found {other_safetensors[:3]}, which are not transformers' layout)"
            if other_safetensors
            else ""
        )
        raise ModelSourceError(
            f"{where}: no safetensors weights{hint}; kiln needs model.safetensors or "
            "model-NNNNN-of-NNNNN.safetensors shards with model.safetensors.index.json"
        )
    return selected


def _list_files(root: Path) -> list[str]:
    """Relative posix paths of the files under ``root``, in a stable order, skipping dotfiles and dot-dirs."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith("."):
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


# --- local directories ------------------------------------------------------------------------------------


def _local_snapshot(model: LocalModel) -> ModelSnapshot:
    root = check_local_dir(model)
    return ModelSnapshot(path=root.resolve(), sha=hash_directory(root), source="local")


def check_local_dir(model: LocalModel) -> Path:
    """A local model dir's checks (pickles, safetensors layout, architecture) without hashing its weights."""
    root = Path(model.local_dir)
    if not root.is_dir():
        raise ModelSourceError(
            f"model.local_dir: {root} is not a directory; point it at an HF model directory "
            "(config.json, model.safetensors, tokenizer files)"
        )
    files = _list_files(root)
    pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    if pickles and not model.allow_pickle:
        raise ModelSourceError(
            f"model.local_dir: {root} holds pickle files {pickles[:5]}; pickles can run code when loaded. "
            "Move them out of the directory, or set model.allow_pickle: true (kiln never unpickles them)"
        )
    _check_files(files, list(DEFAULT_PATTERNS), model.allow_pickle, f"model.local_dir: {root}")
    check_architecture(_read_json(root / "config.json"), str(root))
    return root


def hash_directory(root: Path) -> str:
    """sha256 over the relative path and content of every file (dotfiles skipped), in sorted order."""
    digest = hashlib.sha256()
    for name in _list_files(root):
        file_digest = hashlib.sha256()
        with open(root / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                file_digest.update(block)
        # Fixed-size per-file digests after a NUL-terminated path keep the stream unambiguous.
        digest.update(name.encode() + b"\0" + file_digest.digest())
    return digest.hexdigest()


# --- inspection -------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelSourceError(f"{path}: missing; an HF model directory needs config.json") from None
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path}: expected a JSON object")
    return data


def check_architecture(config: dict[str, Any], where: str) -> str:
    """The model's architecture, or a ModelSourceError naming it and the supported list."""
    names = config.get("architectures") or []
    architecture = names[0] if names else None
    family_for(architecture, f"{where}: architecture", config.get("model_type"))
    return architecture


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelSourceError(f"{index}: has no weight_map")
        shards = [path / name for name in sorted(set(weight_map.values()))]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise ModelSourceError(
                f"{index}: lists shards that are missing: {missing}; fetch the model again"
            )
        return shards
    single = path / "model.safetensors"
    if not single.is_file():
        raise ModelSourceError(f"{path}: no model.safetensors (nor a model.safetensors.index.json)")
    return [single]


def _tensor_headers(files: list[Path]) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) from the safetensors headers; the weights stay on disk."""
    from safetensors import SafetensorError, safe_open

    headers: dict[str, tuple[list[int], str]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    headers[name] = (list(view.get_shape()), view.get_dtype())
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelSourceError(
                f"{file}: not a valid safetensors file ({exc}); fetch the model again"
            ) from None
    return headers


def config_int(config: dict[str, Any], key: str, where: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelSourceError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _check_shapes(
    config: dict[str, Any],
    headers: dict[str, tuple[list[int], str]],
    config_path: Path,
    *,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> None:
    """Refuse a config.json that does not describe its weights (first layer, embedding), naming the first
    tensor whose shape disagrees: transformers' loader would otherwise crash inside quantization."""
    from kiln.families import family_for

    family = family_for((config.get("architectures") or [None])[0])
    names, layer = family.hf_names, "model.layers.0."
    inter = config.get("intermediate_size")
    expected: dict[str, list[int]] = {
        "model.embed_tokens.weight": [config.get("vocab_size"), hidden],
        layer + names.dense + ".weight": [hidden, heads * head_dim],
    }
    qkv_rows = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    if len(names.qkv) == 1:
        expected[layer + names.qkv[0] + ".weight"] = [sum(qkv_rows), hidden]
    else:
        expected.update(
            {layer + n + ".weight": [rows, hidden] for n, rows in zip(names.qkv, qkv_rows, strict=True)}
        )
    if names.router and layer + names.router + ".weight" in headers:
        moe = family.numerics(config)
        gate, up, down = (t.format(e=0) for t in names.experts)
        ffn = moe["moe_intermediate_size"]
        expected.update(
            {
                layer + names.router + ".weight": [moe["num_experts"], hidden],
                layer + gate + ".weight": [ffn, hidden],
                layer + up + ".weight": [ffn, hidden],
                layer + down + ".weight": [hidden, ffn],
            }
        )
    else:
        if len(names.gate_up) == 1:
            expected[layer + names.gate_up[0] + ".weight"] = [2 * inter, hidden]
        else:
            expected.update({layer + n + ".weight": [inter, hidden] for n in names.gate_up})
        expected[layer + names.down + ".weight"] = [hidden, inter]
    for name, shape in expected.items():
        found = headers.get(name)
        if found is None or found[1] not in _SAFETENSORS_DTYPES:  # absent (e.g. tied) or already quantized
            continue
        if found[0] != shape:
            raise ModelSourceError(
                f"{config_path}: does not describe the weights: {name} is {found[0]} but hidden_size "
                f"{hidden}, num_attention_heads {heads}, num_key_value_heads {kv_heads}, head_dim "
                f"{head_dim}, intermediate_size {inter}, vocab_size {config.get('vocab_size')} give {shape}; "
                "fix config.json or fetch the matching weights"
            )


def inspect_model(path: Path) -> ModelInfo:
    """Architecture, sizes and parameter count of an HF model dir; unsupported architectures are refused."""
    path = Path(path)
    config_path = path / "config.json"
    config = _read_json(config_path)
    architecture = check_architecture(config, str(path))
    headers = _tensor_headers(weight_files(path))
    if not headers:
        raise ModelSourceError(f"{path}: the safetensors files hold no tensors")
    num_heads = config_int(config, "num_attention_heads", config_path)
    hidden_size = config_int(config, "hidden_size", config_path)
    num_kv_heads = config.get("num_key_value_heads") or num_heads
    dtype = config.get("dtype") or config.get("torch_dtype")
    if not isinstance(dtype, str):
        dtype = _SAFETENSORS_DTYPES.get(
            Counter(d for _, d in headers.values()).most_common(1)[0][0], "float32"
        )
    head_dim = int(config.get("head_dim") or hidden_size // num_heads)
    _check_shapes(
        config,
        headers,
        config_path,
        hidden=hidden_size,
        heads=num_heads,
        kv_heads=int(num_kv_heads),
        head_dim=head_dim,
    )
    param_count = 0
    for shape, _ in headers.values():
        count = 1
        for dim in shape:
            count *= dim
        param_count += count
    return ModelInfo(
        architecture=architecture,
        model_type=str(config.get("model_type")),
        num_layers=config_int(config, "num_hidden_layers", config_path),
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=int(num_kv_heads),
        head_dim=head_dim,
        intermediate_size=config_int(config, "intermediate_size", config_path),
        vocab_size=config_int(config, "vocab_size", config_path),
        torch_dtype=dtype.removeprefix("torch."),
        param_count=param_count,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        # Qwen2 configs carry no attention_bias flag: the q/k/v bias tensors are the evidence.
        attention_bias=any(name.endswith("self_attn.q_proj.bias") for name in headers),
        max_position_embeddings=config.get("max_position_embeddings"),
    )


def load_tokenizer(snapshot_or_path: ModelSnapshot | Path | str) -> Any:
    """The model's tokenizer via transformers' AutoTokenizer, never with remote code."""
    path = snapshot_or_path.path if isinstance(snapshot_or_path, ModelSnapshot) else Path(snapshot_or_path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelSourceError(
            f"{path}: no usable tokenizer ({exc}); the model needs tokenizer.json (or tokenizer.model) and "
            "tokenizer_config.json"
        ) from None
