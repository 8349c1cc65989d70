"""``kiln serve``: the OpenAI API over a torch engine, with in-flight batching across clients.

Two processes: the HTTP one (FastAPI on uvicorn) and the engine one, so per-token HTTP work never holds
the interpreter lock the decode loop needs. Modules: :mod:`kiln.serve.app` (routes, auth, limits, the SSE
stream), :mod:`kiln.serve.loop` (the HTTP process's handle on the engine process, each request's token
stream), :mod:`kiln.serve.worker` (the engine process), :mod:`kiln.serve.wire` (the frames between them),
:mod:`kiln.serve.schemas` (OpenAI bodies), :mod:`kiln.serve.text` (tokenize, chat template, stream text),
:mod:`kiln.serve.metrics` (Prometheus), :mod:`kiln.serve.server` (uvicorn with draining shutdown,
``trtllm-serve`` for TensorRT-LLM artifacts), :mod:`kiln.serve.source` (engine dir or registry reference),
:mod:`kiln.serve.client` (the streaming client ``kiln bench --url`` drives).
"""
