"""kiln's portable engine: runs TensorRT-LLM checkpoints with torch on CPUs and CUDA GPUs."""

from kiln.engine.torch.backend import TorchBackend, check_compatible
from kiln.engine.torch.runtime import TorchEngine

__all__ = ["TorchBackend", "TorchEngine", "check_compatible"]
