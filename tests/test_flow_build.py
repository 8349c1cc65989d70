"""The build flow in-process (Prefect's test harness): real steps on a tiny Llama, caching, skips, early failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.errors import UnsupportedCombinationError

LIMITS = {"max_batch_size": 2, "max_input_len": 64, "max_seq_len": 128, "max_num_tokens": 256}


def _request(model_dir: Path, name: str = "flowtest", targets: list[dict] | None = None, **extra) -> dict:
    return {
        "name": name,
        "model": {"local_dir": str(model_dir)},
        "recipes": [{"name": "none", "quantization": "none"}],
        "targets": targets or [{"name": "cpu", "dtype": "float32", "limits": LIMITS}],
        "evaluation": {"heldout_tokens": 128, "prompts": 2, "max_new_tokens": 4, "concurrency": [1]},
        "registry": {"model_name": name},
        **extra,
    }


@pytest.fixture
def steps():
    """Every step event of the flow run, as (step, detail, status)."""
    from kiln.tasks import progress

    seen: list[tuple[str, str, str]] = []
    with progress.listening(lambda e: seen.append((e.step, e.detail, e.status)) if e.status != "running" else None):
        yield seen


def _versions(kiln_home: Path, name: str) -> list:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{kiln_home / 'mlflow.db'}").search_model_versions(f"name = '{name}'")


def test_build_registers_a_validated_version_then_an_identical_rebuild_reuses_every_step(
        prefect_harness, kiln_home, tiny_hub_model_dir, steps):
    from kiln.flows.build import build

    first = build(profile=_request(tiny_hub_model_dir))
    assert [(o.recipe, o.target, o.status) for o in first] == [("none", "cpu", "registered")]
    assert first[0].metrics["perplexity"] > 1 and first[0].version and first[0].reused is False
    assert len(_versions(kiln_home, "flowtest.cpu")) == 1
    computed = {(s, d) for s, d, status in steps if status == "done"}
    assert {("quantize", "baseline"), ("compile", "baseline x cpu"), ("validate", "none x cpu")} <= computed

    steps.clear()
    second = build(profile=_request(tiny_hub_model_dir))
    assert second[0].version == first[0].version and second[0].reused is True
    assert len(_versions(kiln_home, "flowtest.cpu")) == 1
    expensive = [(s, d, status) for s, d, status in steps if s in {"quantize", "compile", "validate", "register"}]
    assert expensive and all(status == "reused" for _, _, status in expensive), expensive


def test_changing_one_targets_limits_rebuilds_only_that_target(prefect_harness, kiln_home, tiny_hub_model_dir, steps):
    from kiln.flows.build import build

    targets = [{"name": "a", "dtype": "float32", "limits": LIMITS}, {"name": "b", "dtype": "float32", "limits": LIMITS}]
    build(profile=_request(tiny_hub_model_dir, targets=targets))
    steps.clear()
    targets[0] = {**targets[0], "limits": {**LIMITS, "max_batch_size": 4}}
    outcomes = build(profile=_request(tiny_hub_model_dir, targets=targets))
    status = {(s, d): st for s, d, st in steps}
    assert status[("quantize", "baseline")] == "reused"
    assert status[("compile", "none x a")] == "done" and status[("compile", "none x b")] == "reused"
    assert status[("validate", "none x a")] == "done" and status[("validate", "none x b")] == "reused"
    by_target = {o.target: o for o in outcomes}
    assert by_target["a"].reused is False and by_target["b"].reused is True


def test_an_impossible_recipe_target_pair_fails_before_any_work(prefect_harness, kiln_home, tiny_hub_model_dir, steps):
    from kiln.flows.build import build

    request = _request(tiny_hub_model_dir, recipes=[{"name": "fp4", "quantization": "nvfp4"}])
    with pytest.raises(UnsupportedCombinationError, match="nvfp4"):
        build(profile=request)
    assert [s for s, _, _ in steps] == ["preflight"]
    assert not (kiln_home / "cache").exists()
