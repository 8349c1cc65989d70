"""What this machine can build and run: Python, torch, CUDA, GPUs (name + SM), ModelOpt, TensorRT-LLM.

``collect()`` gathers the facts (cheap, no GPU work); ``check_target_here(target)`` runs a target's
pre-flight against this machine's GPUs and toolchain, which is what ``kiln doctor --target`` prints.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.profiles import Target

GIB = 1024**3


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    sm: int
    memory_gib: float

    @property
    def sm_name(self) -> str:
        return f"sm{self.sm}"


@dataclass(frozen=True)
class Component:
    """One package or tool: present or not, its version, and why it is missing."""

    name: str
    present: bool
    version: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class TensorRTLLMStatus:
    """Whether ``tensorrt_llm`` imports here, its version and toolchain, or why not."""

    importable: bool
    version: str | None = None
    tensorrt_version: str | None = None
    trtllm_build: str | None = None
    why: str = ""


@dataclass
class HostReport:
    python: str
    platform: str
    components: list[Component]
    gpus: list[GpuInfo]
    cuda_runtime: str | None
    driver: str | None
    tensorrt_llm: TensorRTLLMStatus
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpus() -> list[GpuInfo]:
    """Visible CUDA GPUs via torch (empty on a CPU-only machine or a CPU build of torch)."""
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append(GpuInfo(index=index, name=props.name, sm=props.major * 10 + props.minor,
                             memory_gib=round(props.total_memory / GIB, 1)))
    return found


def driver_version() -> str | None:
    """NVIDIA driver version from ``nvidia-smi`` (None without one)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


@functools.cache
def tensorrt_llm_status() -> TensorRTLLMStatus:
    """Import ``tensorrt_llm`` once; a placeholder wheel or missing CUDA libraries count as not importable."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return TensorRTLLMStatus(False, why="the tensorrt_llm package is not installed (its PyPI wheel is only a "
                                            "stub; NVIDIA ships it in the TensorRT-LLM container image)")
    try:
        module = importlib.import_module("tensorrt_llm")
    except Exception as exc:  # an import of a native package can fail in many ways; report, never crash doctor
        return TensorRTLLMStatus(False, version=package_version("tensorrt_llm"),
                                 why=f"import tensorrt_llm failed: {type(exc).__name__}: {exc}")
    version = getattr(module, "__version__", None) or package_version("tensorrt_llm")
    if not version:
        return TensorRTLLMStatus(False, why="tensorrt_llm imports but reports no version (a placeholder package?)")
    return TensorRTLLMStatus(True, version=str(version), tensorrt_version=package_version("tensorrt"),
                             trtllm_build=shutil.which("trtllm-build"))


def collect() -> HostReport:
    """Facts about this machine; never fails (missing things are reported as missing)."""
    import torch

    from kiln import constants
    from kiln.profiles import library_roots

    components = [Component("kiln", True, package_version("kiln-llm"), f"KILN_HOME {constants.kiln_home()}"),
                  Component("torch", True, torch.__version__,
                            f"CUDA build {torch.version.cuda}" if torch.version.cuda else "CPU build")]
    for name, dist in (("nvidia-modelopt", "nvidia-modelopt"), ("transformers", "transformers"),
                       ("prefect", "prefect"), ("mlflow", "mlflow"), ("tensorrt", "tensorrt")):
        version = package_version(dist)
        components.append(Component(name, version is not None, version, "" if version else "not installed"))
    trt = tensorrt_llm_status()
    components.append(Component("tensorrt_llm", trt.importable, trt.version, trt.why or
                                f"trtllm-build: {trt.trtllm_build or 'not on PATH'}"))
    report = HostReport(python=sys.version.split()[0], platform=platform.platform(), components=components,
                        gpus=gpus(), cuda_runtime=torch.version.cuda, driver=driver_version(), tensorrt_llm=trt)
    if not report.gpus:
        report.notes.append("no CUDA GPU visible: cuda targets build on a GPU worker, not here")
    roots = library_roots(Path.cwd() / "profiles" / "_")
    report.notes.append("recipe/target library: " + (" over ".join(f"{p} ({label})" for label, p in roots) or "none"))
    return report


def check_target_here(target: Target, recipes: list[Any] | tuple[Any, ...] = (), model_info: Any = None) -> list[Any]:
    """Pre-flight findings for ``target`` on this machine (its GPUs and toolchain) and for each recipe on it."""
    from kiln import preflight

    return preflight.check_target_on_host(target, collect(), recipes=recipes, model_info=model_info)


def library_entry(kind: str, name: str) -> dict[str, Any]:
    """A named recipe or target from the library (``kiln.profiles.library_roots``: ./profiles, then
    ``$KILN_PROFILES_DIR``, then the one installed with kiln)."""
    from kiln.errors import ProfileError
    from kiln.profiles import library

    entries, files = library(f"{kind}s", Path.cwd() / "profiles" / "_")
    if not files:
        raise ProfileError(f"no {kind} library found (./profiles, KILN_PROFILES_DIR, or kiln's own): pass a {kind} "
                           "YAML file")
    if name not in entries:
        raise ProfileError(f"{', '.join(map(str, files))}: no {kind} named {name!r}; known: "
                           f"{', '.join(sorted(map(str, entries)))}")
    return dict(entries[name])


def family_rows() -> list[dict[str, str]]:
    """Per model family: architectures, the export the torch engine compiles, recipes (and why not the
    others), and which TensorRT-LLM artifacts load it per kiln's contracts (1.2: engine, 1.3: HF checkpoint)."""
    from kiln.engine.trtllm import api
    from kiln.families import FAMILIES

    def trtllm(series: str, artifact: str, architectures: tuple[str, ...]) -> str:
        facts = (api.load_contract(series).data.get("architectures") or {}).get(artifact) or {}
        answers = {(facts.get(a) or {}).get("supported") for a in architectures}
        if answers == {True}:
            return "yes"
        return "no" if answers == {False} else "unverified" if None in answers else "partly"

    rows = []
    for family in FAMILIES:
        rows.append({
            "family": family.name, "architectures": ", ".join(family.architectures), "summary": family.summary,
            "export": "TensorRT-LLM checkpoint + HF" if family.modelopt_decoder else "HF checkpoint only",
            "recipes": ", ".join(family.recipes),
            "refused": "; ".join(f"{', '.join(q for q, w in family.refused.items() if w == why)}: {why}"
                                 for why in dict.fromkeys(family.refused.values())),
            "torch": "yes",
            "tensorrt_llm engine (1.2)": trtllm("1.2", "engine", family.architectures)
            if family.modelopt_decoder else "no (no TensorRT-LLM checkpoint export)",
            "tensorrt_llm hf_checkpoint (>= 1.3)": trtllm("1.3", "hf_checkpoint", family.architectures),
        })
    return rows


FAMILY_COLUMNS = ("family", "architectures", "export", "recipes", "torch", "tensorrt_llm engine (1.2)",
                  "tensorrt_llm hf_checkpoint (>= 1.3)")


def families_markdown() -> str:
    """docs/FAMILIES.md: the family table, generated from the registry and the contracts so it cannot drift."""
    rows = family_rows()
    lines = ["# Model families", "",
             "Generated from `kiln.families` and `kiln/contracts/` by `kiln.doctor.families_markdown()` "
             "(a test keeps this file equal to it). `kiln doctor` prints the same table.", "",
             "| " + " | ".join(FAMILY_COLUMNS) + " |", "|" + "---|" * len(FAMILY_COLUMNS)]
    lines += ["| " + " | ".join(row[c] for c in FAMILY_COLUMNS) + " |" for row in rows]
    lines += ["", "Refused recipes, with the reason pre-flight gives:", ""]
    lines += [f"- {row['family']}: {row['refused']}" for row in rows if row["refused"]]
    lines += ["", "What sets each family apart:", ""]
    lines += [f"- {row['family']}: {row['summary']}" for row in rows]
    return "\n".join(lines) + "\n"
