"""The build DAG's steps up to compile as Prefect tasks: decorators over :mod:`kiln.steps`.

Every step that produces files (quantize, compile) or costs minutes (validate) runs through
:class:`kiln.cache.StepCache` under a key of its content inputs, so an identical rebuild reuses it.
Network steps (download, register) retry with exponential backoff; input errors never retry.
"""

from __future__ import annotations

from prefect import task

from kiln.steps import checkpoint as checkpoint_step
from kiln.steps import data as data_step
from kiln.steps import download as download_step
from kiln.steps import engine as engine_step
from kiln.steps import request as request_step
from kiln.tasks.options import LOCAL, NETWORK, transient

__all__ = [
    "LOCAL",
    "NETWORK",
    "calibrate_and_quantize",
    "calibration_data",
    "compile_engine",
    "download",
    "load_and_preflight",
    "transient",
]

load_and_preflight = task(name="load-and-preflight", **LOCAL)(request_step.load_and_preflight)
download = task(name="download", timeout_seconds=3 * 3600, **NETWORK)(download_step.download)
calibration_data = task(name="calibration-data", timeout_seconds=3600, **LOCAL)(data_step.calibration_data)
calibrate_and_quantize = task(name="calibrate-and-quantize", timeout_seconds=6 * 3600, **LOCAL)(
    checkpoint_step.build_checkpoint
)
compile_engine = task(name="compile", timeout_seconds=4 * 3600, **LOCAL)(engine_step.compile_engine)
