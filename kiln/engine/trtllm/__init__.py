"""The ``tensorrt_llm`` backend: NVIDIA's TensorRT-LLM behind kiln's Backend/Engine protocols.

``api`` holds everything version-specific (read from ``kiln/contracts``); ``backend`` runs it. Importing
this package never imports ``tensorrt_llm`` itself, so a machine without it can still plan and check.
"""

from kiln.engine.trtllm.backend import TensorRTLLMBackend, TensorRTLLMEngine

__all__ = ["TensorRTLLMBackend", "TensorRTLLMEngine"]
