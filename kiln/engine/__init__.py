"""Engines: one interface (``Backend``/``Engine``), two backends (``torch``, ``tensorrt_llm``)."""

from kiln.engine.base import Backend, Engine, GenerationRequest, GenerationResult, SamplingParams, get_backend

__all__ = ["Backend", "Engine", "GenerationRequest", "GenerationResult", "SamplingParams", "get_backend"]
