"""Shared fixtures. Area fixtures live in tests/fixtures/*.py and load as pytest plugins."""

from __future__ import annotations

import os

import pytest

pytest_plugins = [
    "tests.fixtures.env",
    "tests.fixtures.models",
    "tests.fixtures.servers",
    "tests.fixtures.prefect",
    "tests.fixtures.hub",
]


@pytest.fixture(autouse=True)
def _no_network_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    # No internet here: telemetry would fail loudly and can lock Prefect's SQLite.
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def modelopt_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per ``mtq.quantize`` call (a spy: the real ModelOpt calibration still runs)."""
    import modelopt.torch.quantization as mtq

    calls: list[int] = []
    real_quantize = mtq.quantize

    def counting_quantize(*args, **kwargs):
        calls.append(1)
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(mtq, "quantize", counting_quantize)
    return calls
