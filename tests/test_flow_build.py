"""The build flow in-process (Prefect's test harness): real steps on a tiny Llama, caching, skips, early
failures."""

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
    from kiln import progress

    seen: list[tuple[str, str, str]] = []
    with progress.listening(
        lambda e: seen.append((e.step, e.detail, e.status)) if e.status != "running" else None
    ):
        yield seen


def _versions(kiln_home: Path, name: str) -> list:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{kiln_home / 'mlflow.db'}").search_model_versions(
        f"name = '{name}'"
    )


def test_build_registers_a_validated_version_then_an_identical_rebuild_reuses_every_step(
    prefect_harness, kiln_home, tiny_hub_model_dir, steps
):
    from kiln.flows.build import build

    first = build(profile=_request(tiny_hub_model_dir))
    assert [(o.recipe, o.target, o.status) for o in first] == [("none", "cpu", "registered")]
    assert first[0].metrics["perplexity"] > 1 and first[0].version and first[0].reused is False
    assert len(_versions(kiln_home, "flowtest.cpu")) == 1
    computed = {(s, d) for s, d, status in steps if status == "done"}
    assert {("quantize", "baseline"), ("compile", "baseline x cpu"), ("validate", "none x cpu")} <= computed
    markdown, links = _artifacts("kiln-build-flowtest", "kiln-engine-flowtest-none-cpu")
    assert (
        "| none" in markdown and f"flowtest.cpu v{first[0].version}" in markdown and first[0].uri in markdown
    )
    # a local store and SQLite tracking have no page a browser opens from the Prefect UI: the path is text
    assert links == f"flowtest.cpu v{first[0].version}: `{first[0].uri}`"
    names, lines = _runs_and_logs()
    # not "thistle-puffin"
    assert "flowtest" in names and any(n.startswith("flowtest-cpu-") for n in names), names
    # kiln's steps in the run log
    assert any(line.startswith("done quantize baseline") for line in lines), lines[:20]

    steps.clear()
    second = build(profile=_request(tiny_hub_model_dir))
    assert second[0].version == first[0].version and second[0].reused is True
    assert len(_versions(kiln_home, "flowtest.cpu")) == 1
    expensive = [
        (s, d, status) for s, d, status in steps if s in {"quantize", "compile", "validate", "register"}
    ]
    assert expensive and all(status == "reused" for _, _, status in expensive), expensive


def _runs_and_logs() -> tuple[list[str], list[str]]:
    """Every flow run's name, and every log line, as the Prefect API returns them."""
    import asyncio

    from prefect import get_client

    async def read() -> tuple[list[str], list[str]]:
        async with get_client() as client:
            runs = await client.read_flow_runs()
            logs = await client.read_logs()
        return [r.name for r in runs], [log.message for log in logs]

    return asyncio.run(read())


def _artifacts(markdown_key: str, link_key: str) -> tuple[str, str]:
    """The latest markdown artifact and link artifact under these keys, as the Prefect API returns them."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def latest(key: str) -> str:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )
        assert found, f"no Prefect artifact {key!r}"
        return str(max(found, key=lambda a: a.created).data)

    markdown, link = asyncio.run(latest(markdown_key)), asyncio.run(latest(link_key))
    return markdown, link


def test_changing_one_targets_limits_rebuilds_only_that_target(
    prefect_harness, kiln_home, tiny_hub_model_dir, steps
):
    from kiln.flows.build import build

    targets = [
        {"name": "a", "dtype": "float32", "limits": LIMITS},
        {"name": "b", "dtype": "float32", "limits": LIMITS},
    ]
    build(profile=_request(tiny_hub_model_dir, targets=targets))
    steps.clear()
    targets[0] = {**targets[0], "limits": {**LIMITS, "max_batch_size": 4}}
    outcomes = build(profile=_request(tiny_hub_model_dir, targets=targets))
    status = {(s, d): st for s, d, st in steps}
    assert status[("quantize", "baseline")] == "reused"
    # recipe `none` shares the baseline's checkpoint and engine (same content key): built once per target
    assert status[("compile", "baseline x a")] == "done" and status[("compile", "baseline x b")] == "reused"
    assert status[("validate", "none x a")] == "done" and status[("validate", "none x b")] == "reused"
    by_target = {o.target: o for o in outcomes}
    assert by_target["a"].reused is False and by_target["b"].reused is True


def test_an_impossible_recipe_target_pair_fails_before_any_work(
    prefect_harness, kiln_home, tiny_hub_model_dir, steps
):
    from kiln.flows.build import build

    request = _request(tiny_hub_model_dir, recipes=[{"name": "fp4", "quantization": "nvfp4"}])
    with pytest.raises(UnsupportedCombinationError, match="nvfp4"):
        build(profile=request)
    assert [s for s, _, _ in steps] == ["preflight"]
    assert not (kiln_home / "cache").exists()


def test_network_steps_retry_transient_failures_only():
    import httpx
    from huggingface_hub.errors import RevisionNotFoundError

    from kiln.errors import ModelSourceError, RegistryConfigError, RegistryError
    from kiln.tasks.options import transient

    def caused(error: Exception, cause: BaseException) -> Exception:
        error.__cause__ = cause
        return error

    unreachable = caused(ModelSourceError("model: cannot reach the hub"), httpx.ConnectError("refused"))
    busy = caused(RegistryError("MLflow answered 503"), RuntimeError("503"))
    no_revision = caused(
        ModelSourceError("model.revision: 'nope' is not a branch"),
        RevisionNotFoundError(
            "404 revision not found", response=httpx.Response(404, request=httpx.Request("GET", "http://hub"))
        ),
    )
    assert transient(unreachable) and transient(busy) and transient(ConnectionResetError())
    assert not transient(no_revision)
    assert not transient(RegistryConfigError("store_uri: bucket missing"))
    assert not transient(TypeError("a bug")) and not transient(ModelSourceError("no safetensors"))


def test_promote_revalidate_and_rollback_flows_move_and_check_production(
    prefect_harness, kiln_home, tiny_hub_model_dir, tmp_path
):
    import yaml

    from kiln.flows.build import build
    from kiln.flows.promote import promote, rollback
    from kiln.flows.revalidate import revalidate

    def profile(name: str, limits: dict) -> str:
        path = tmp_path / f"{name}.yaml"
        targets = [{"name": "cpu", "dtype": "float32", "limits": limits}]
        path.write_text(yaml.safe_dump(_request(tiny_hub_model_dir, name="lifecycle", targets=targets)))
        return str(path)

    v1 = build(profile=profile("v1", LIMITS))[0]
    v2 = build(profile=profile("v2", {**LIMITS, "max_batch_size": 4}))[0]  # a new engine: a new version
    assert v2.version != v1.version
    assert "production" in promote("lifecycle", v1.version, reason="first release", target="cpu")["aliases"]

    drift = revalidate(profile("v1", LIMITS))
    assert [(r["target"], r["version"]) for r in drift] == [("cpu", v1.version)]
    assert drift[0]["measured"]["perplexity"] == pytest.approx(v1.metrics["perplexity"], rel=1e-4)
    assert "perplexity" not in drift[0]["drift_pct"]  # the same engine on the same text: no accuracy drift

    promote("lifecycle", v2.version, reason="bigger batches", target="cpu")
    back = rollback("lifecycle", reason="v2 regressed", target="cpu")
    assert back["version"] == v1.version and "production" in back["aliases"]
