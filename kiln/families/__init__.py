"""The model families kiln builds: one module per family declares what it is, and everything else asks here.

Pre-flight, download, quantize, the torch engine and ``kiln doctor`` read this registry instead of keeping
lists of their own. A family says which HF architectures it covers, how ModelOpt exports it (the
TensorRT-LLM checkpoint, or only the unified HF checkpoint), how that export maps onto the torch engine's
layers (``hf_names`` and ``engine_numerics``), which recipes ModelOpt can quantize and export for it (and
why not the others), and which artifact kinds TensorRT-LLM loads for it (the contract's ``architectures``).
"""

from __future__ import annotations

from kiln.errors import ModelSourceError
from kiln.families.base import Family, HFNames
from kiln.families.gemma import GEMMA2, GEMMA3
from kiln.families.llama import LLAMA, QWEN2
from kiln.families.moe import MIXTRAL, QWEN3_MOE
from kiln.families.phi3 import PHI3
from kiln.families.qwen3 import QWEN3

FAMILIES: tuple[Family, ...] = (LLAMA, QWEN2, QWEN3, GEMMA2, GEMMA3, PHI3, MIXTRAL, QWEN3_MOE)

_BY_ARCHITECTURE = {arch: family for family in FAMILIES for arch in family.architectures}

__all__ = ["FAMILIES", "Family", "HFNames", "architectures", "family_for", "find_family"]


def architectures() -> tuple[str, ...]:
    """Every HF architecture name kiln accepts, in the registry's order."""
    return tuple(_BY_ARCHITECTURE)


def find_family(architecture: str | None) -> Family | None:
    return _BY_ARCHITECTURE.get(architecture or "")


def family_for(architecture: str | None, where: str = "model", model_type: str | None = None) -> Family:
    """The family of an HF architecture, or a ModelSourceError naming it and listing the supported
    families."""
    family = find_family(architecture)
    if family is None:
        families = ", ".join(f.name for f in FAMILIES)
        raise ModelSourceError(
            f"{where}: {architecture!r} is not supported (model_type {model_type!r}); supported "
            f"architectures: {', '.join(architectures())} (families {families}; `kiln doctor` lists each "
            "family's recipes and backends)"
        )
    return family
