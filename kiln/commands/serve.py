"""``kiln serve``: the OpenAI API over an engine dir or a registered version (see kiln/serve/)."""

from __future__ import annotations

import ipaddress
import logging
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from kiln.commands._common import cli_errors, console, err_console

if TYPE_CHECKING:
    from kiln.engine.manifest import EngineManifest


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve_command(
    model: str = typer.Argument(
        ...,
        metavar="(NAME@ALIAS | NAME@vN | ENGINE_DIR)",
        help="a registered version (fetched and verified for this machine) or an engine dir",
    ),
    target: str = typer.Option(
        None, "--target", "-t", help="target name (the registered model is NAME.TARGET)"
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (loopback unless told otherwise)"),
    port: int = typer.Option(8000, "--port"),
    api_key: str = typer.Option(
        None,
        "--api-key",
        envvar="KILN_API_KEY",
        show_default=False,
        help="demand 'Authorization: Bearer KEY' on every endpoint but /health; prefer "
        "KILN_API_KEY (a command-line value shows in ps)",
    ),
    served_model_name: str = typer.Option(
        None,
        "--served-model-name",
        help="the name clients pass as `model` (default: the registered model or the engine dir's name)",
    ),
    max_waiting: int = typer.Option(
        64,
        "--max-waiting",
        min=0,
        help="requests that may wait for a slot beyond max_batch_size; past it: 429",
    ),
    max_body_bytes: int = typer.Option(
        1 << 20, "--max-body-bytes", min=1, help="larger request bodies get 413"
    ),
    drain_timeout: float = typer.Option(
        30.0, "--drain-timeout", min=0.0, help="seconds admitted requests get to finish after SIGTERM/SIGINT"
    ),
    batch_wait_ms: float = typer.Option(
        5.0,
        "--batch-wait-ms",
        min=0.0,
        help="how long an idle engine may wait for requests already reaching the server, so that a burst "
        "is prefilled together (0: never wait)",
    ),
    log_requests: bool = typer.Option(
        False, "--log-requests", help="log prompts and completions (off: never)"
    ),
    tracking_uri: str = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI for a registry reference"
    ),
) -> None:
    """Serve the OpenAI API (completions, chat, streaming, /metrics) with in-flight batching."""
    with cli_errors():
        from kiln.engine import manifest as engine_manifest
        from kiln.registry.fetch import verify_if_fetched
        from kiln.serve.source import resolve

        served = resolve(model, target, tracking_uri=tracking_uri)
        verify_if_fetched(served.engine_dir)  # a fetched or cached copy must still hold the registered bytes
        manifest = engine_manifest.read(served.engine_dir)
        if manifest.backend == "tensorrt_llm":
            _exec_trtllm(served.engine_dir, manifest, host, port, api_key)
            return
        if not _loopback(host) and not api_key:
            err_console.print(
                f"[bold yellow]warning:[/] binding {host} without --api-key: anyone who can reach "
                "this port can use the model",
                highlight=False,
            )
        from kiln.serve.app import ServeSettings
        from kiln.serve.loop import EngineProcess
        from kiln.serve.server import serve_engine

        engine = EngineProcess.start(served.engine_dir)  # loaded and warmed up in a process of its own
        settings = ServeSettings(
            model_name=served_model_name or served.model_name,
            source=served.source,
            api_key=api_key or None,
            max_waiting=max_waiting,
            max_body_bytes=max_body_bytes,
            log_requests=log_requests,
            drain_timeout_s=drain_timeout,
            batch_wait_s=batch_wait_ms / 1e3,
        )
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
        limits = manifest.limits
        console.print(
            f"serving [bold]{settings.model_name}[/] ({served.source}; torch on {manifest.device}, "
            f"max_batch_size {limits.max_batch_size}, max_input_len {limits.max_input_len}, "
            f"max_seq_len {limits.max_seq_len}) at http://{host}:{port}/v1 "
            f"({'API key required' if api_key else 'no API key'})",
            highlight=False,
        )
        serve_engine(engine, served.engine_dir, settings, host=host, port=port)


def _exec_trtllm(
    engine_dir: Path, manifest: EngineManifest, host: str, port: int, api_key: str | None
) -> None:
    """Hand a TensorRT-LLM artifact to ``trtllm-serve`` where it runs; elsewhere say where and how, exit
    non-zero."""
    from kiln.errors import BackendUnavailableError, KilnInputError
    from kiln.serve.server import trtllm_serve_command, trtllm_serve_problem

    argv = trtllm_serve_command(engine_dir, manifest, host, port)
    if api_key:
        raise KilnInputError(
            "trtllm-serve has no API key option, so --api-key / KILN_API_KEY cannot be honoured for "
            "a TensorRT-LLM engine; put it behind an authenticating proxy and serve without the key"
        )
    command = shlex.join(argv)
    problem = trtllm_serve_problem(engine_dir, manifest)
    if problem is not None:
        print(command)  # unwrapped, to copy: the command to run where the artifact can run
        raise BackendUnavailableError(
            f"{engine_dir} is a TensorRT-LLM {manifest.artifact} for {manifest.sm} "
            f"({manifest.gpu or 'GPU'}); it cannot be served here: {problem}. On a machine of its target "
            f"with TensorRT-LLM {manifest.toolchain.get('tensorrt_llm') or ''} (NVIDIA's image, "
            "deploy/README.md) run the trtllm-serve command printed above"
        )
    err_console.print(f"exec: {command}", highlight=False, soft_wrap=True)
    os.execvp(argv[0], argv)
