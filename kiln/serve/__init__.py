"""``kiln serve``: the OpenAI API over a torch engine, with in-flight batching across clients.

Modules: :mod:`kiln.serve.app` (routes, auth, limits), :mod:`kiln.serve.loop` (the engine thread),
:mod:`kiln.serve.schemas` (OpenAI bodies), :mod:`kiln.serve.text` (tokenize, chat template, stream text),
:mod:`kiln.serve.metrics` (Prometheus), :mod:`kiln.serve.server` (uvicorn with draining shutdown,
``trtllm-serve`` for TensorRT-LLM artifacts), :mod:`kiln.serve.source` (engine dir or registry reference),
:mod:`kiln.serve.client` (the streaming client ``kiln bench --url`` drives).
"""
