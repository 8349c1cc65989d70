"""Facts about this machine that several layers ask (installed packages, GPUs, driver, TensorRT-LLM).

A leaf module: it imports nothing of kiln's, so pre-flight, the TensorRT-LLM backend and ``kiln doctor``
all read the same facts without importing each other.
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

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
    """The installed version of distribution ``name``; None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_versions(packages: Sequence[str]) -> dict[str, str]:
    """Installed versions of ``packages`` (absent ones omitted)."""
    return {package: version for package in packages if (version := package_version(package)) is not None}


def gpus() -> list[GpuInfo]:
    """Visible CUDA GPUs via torch (empty on a CPU-only machine or a CPU build of torch)."""
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append(
            GpuInfo(
                index=index,
                name=props.name,
                sm=props.major * 10 + props.minor,
                memory_gib=round(props.total_memory / GIB, 1),
            )
        )
    return found


def driver_version() -> str | None:
    """NVIDIA driver version from ``nvidia-smi`` (None without one)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


@functools.cache
def tensorrt_llm_status() -> TensorRTLLMStatus:
    """Import ``tensorrt_llm`` once; a placeholder wheel or missing CUDA libraries count as not importable."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return TensorRTLLMStatus(
            False,
            why="the tensorrt_llm package is not installed (its PyPI wheel is only a "
            "stub; NVIDIA ships it in the TensorRT-LLM container image)",
        )
    try:
        module = importlib.import_module("tensorrt_llm")
    except (
        Exception
    ) as exc:  # an import of a native package can fail in many ways; report, never crash doctor
        return TensorRTLLMStatus(
            False,
            version=package_version("tensorrt_llm"),
            why=f"import tensorrt_llm failed: {type(exc).__name__}: {exc}",
        )
    version = getattr(module, "__version__", None) or package_version("tensorrt_llm")
    if not version:
        return TensorRTLLMStatus(
            False, why="tensorrt_llm imports but reports no version (a placeholder package?)"
        )
    return TensorRTLLMStatus(
        True,
        version=str(version),
        tensorrt_version=package_version("tensorrt"),
        trtllm_build=shutil.which("trtllm-build"),
    )


def collect() -> HostReport:
    """Facts about this machine; never fails (missing things are reported as missing)."""
    import torch

    components = [
        Component("kiln", True, package_version("kiln-llm")),
        Component(
            "torch",
            True,
            torch.__version__,
            f"CUDA build {torch.version.cuda}" if torch.version.cuda else "CPU build",
        ),
    ]
    for name in ("nvidia-modelopt", "transformers", "prefect", "mlflow", "tensorrt"):
        version = package_version(name)
        components.append(Component(name, version is not None, version, "" if version else "not installed"))
    trt = tensorrt_llm_status()
    components.append(
        Component(
            "tensorrt_llm",
            trt.importable,
            trt.version,
            trt.why or f"trtllm-build: {trt.trtllm_build or 'not on PATH'}",
        )
    )
    report = HostReport(
        python=sys.version.split()[0],
        platform=platform.platform(),
        components=components,
        gpus=gpus(),
        cuda_runtime=torch.version.cuda,
        driver=driver_version(),
        tensorrt_llm=trt,
    )
    if not report.gpus:
        report.notes.append("no CUDA GPU visible: cuda targets build on a GPU worker, not here")
    return report
