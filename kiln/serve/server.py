"""Run ``kiln serve``: uvicorn with a draining shutdown, or TensorRT-LLM's own ``trtllm-serve``.

Shutdown: the first SIGTERM / SIGINT starts draining: the listening socket stays open so new requests get
a 503 with ``Retry-After`` (a load balancer moves them elsewhere) while every admitted request, running or
waiting, finishes; once none is left, or ``drain_timeout_s`` passed (the rest are then aborted), uvicorn
shuts down and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import logging
import shutil
import signal
import time
from pathlib import Path
from types import FrameType

import uvicorn

from kiln.engine.manifest import EngineManifest
from kiln.serve.app import ServerState, ServeSettings, create_app
from kiln.serve.loop import EngineProcess

log = logging.getLogger("kiln.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn whose first shutdown signal drains instead of stopping (see the module doc)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.kiln = state
        self._deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after a clean shutdown (exit by
        # signal).
        if self.kiln.draining:
            log.warning(
                "second %s: exiting without waiting for %d request(s)",
                signal.Signals(sig).name,
                self.kiln.loop.in_flight,
            )
            self.should_exit = self.force_exit = True
            return
        self._deadline = time.monotonic() + self.kiln.settings.drain_timeout_s
        self.kiln.start_drain()

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self._deadline is None:
            return False
        if self.kiln.loop.in_flight == 0:
            log.info("drained: every admitted request finished")
            return True
        if time.monotonic() > self._deadline:
            log.warning(
                "drain timeout (%g s): aborting %d request(s)",
                self.kiln.settings.drain_timeout_s,
                self.kiln.loop.in_flight,
            )
            self.kiln.loop.abort_all("server shut down (drain timeout)")
            return True
        return False


def serve_engine(
    engine: EngineProcess,
    engine_dir: Path,
    settings: ServeSettings,
    *,
    host: str,
    port: int,
    log_level: str = "info",
) -> None:
    """Serve a started engine process until a signal drains the server (blocks); the engine process stops with
    it.

    uvicorn picks its fastest HTTP parser and event loop that are installed (httptools, uvloop: what
    ``uvicorn[standard]`` adds), else h11 and asyncio."""
    from prometheus_client import disable_created_metrics

    from kiln.serve.text import TextCodec

    try:
        disable_created_metrics()  # no *_created series: this process exports only its own registry
        app = create_app(engine, TextCodec(engine_dir), settings)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            lifespan="on",
            http="auto",
            loop="auto",
            timeout_graceful_shutdown=5,
            server_header=False,
        )
        DrainingServer(config, app.state).run()
    finally:
        engine.stop()


# -- TensorRT-LLM artifacts ----------------------------------------------------------------------------------


def trtllm_serve_command(engine_dir: Path, manifest: EngineManifest, host: str, port: int) -> list[str]:
    """The ``trtllm-serve`` argv for a kiln TensorRT-LLM artifact (flags of tensorrt_llm/commands/serve.py:
    MODEL, --tokenizer, --host, --port, --backend {pytorch, tensorrt (alias trt)},
    --extra_llm_api_options)."""
    engine_dir = Path(engine_dir)
    argv = ["trtllm-serve", str(engine_dir)]
    if manifest.artifact == "engine":  # a trtllm-build engine dir: the TensorRT backend, our tokenizer copy
        argv += ["--backend", "trt", "--tokenizer", str(engine_dir)]
    else:  # an HF checkpoint for the PyTorch backend, with the LLM API settings kiln validated it with
        argv += ["--backend", "pytorch"]
        options = manifest.llm_api.options_file if manifest.llm_api is not None else "llm_api_options.yaml"
        if (engine_dir / options).is_file():
            argv += ["--extra_llm_api_options", str(engine_dir / options)]
    return [*argv, "--host", host, "--port", str(port)]


def trtllm_serve_problem(engine_dir: Path, manifest: EngineManifest) -> str | None:
    """Why ``trtllm-serve`` cannot serve this artifact here (None when it can)."""
    from kiln.engine.trtllm.backend import check_loadable, toolchain
    from kiln.errors import EngineMismatchError
    from kiln.host import tensorrt_llm_status

    status = tensorrt_llm_status()
    if not status.importable or not status.version:
        return status.why or "tensorrt_llm is not importable here"
    if shutil.which("trtllm-serve") is None:
        return f"tensorrt_llm {status.version} imports but trtllm-serve is not on PATH"
    try:
        check_loadable(manifest, engine_dir, toolchain())
    except EngineMismatchError as exc:
        return str(exc)
    return None
