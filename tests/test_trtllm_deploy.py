"""The GPU worker recipe (deploy/): a docker work pool template on NVIDIA's TensorRT-LLM image, validated, not
run.

Checked against Prefect's own rules for base job templates (``WorkPoolCreate``: every placeholder declared
as a variable; variables a JSON schema) and, where ``prefect-docker`` is installed, against the docker
worker itself (``DockerWorkerJobConfiguration`` built from the template's defaults, as the worker does).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from kiln.engine.trtllm import api

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "trtllm-work-pool.json"
DOCKERFILE = ROOT / "deploy" / "Dockerfile.trtllm"


@pytest.fixture(scope="module")
def template() -> dict:
    return json.loads(TEMPLATE.read_text())


def _defaults(template: dict) -> dict:
    return {
        k: v["default"]
        for k, v in template["variables"]["properties"].items()
        if v.get("default") is not None
    }


def test_prefect_accepts_it_as_a_docker_work_pool(template: dict) -> None:
    from prefect.server.schemas.actions import WorkPoolCreate

    pool = WorkPoolCreate(name="kiln-h100-trtllm", type="docker", base_job_template=template)
    assert pool.base_job_template["job_configuration"]["image"] == "{{ image }}"


def test_variables_are_a_valid_json_schema_and_defaults_satisfy_it(template: dict) -> None:
    schema = template["variables"]
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(_defaults(template), schema)


def test_a_placeholder_without_a_variable_is_refused(template: dict) -> None:
    from prefect.server.schemas.actions import WorkPoolCreate

    broken = json.loads(json.dumps(template))
    broken["job_configuration"]["env"] = "{{ gpu_env }}"
    with pytest.raises(ValueError, match="gpu_env"):
        WorkPoolCreate(name="x", type="docker", base_job_template=broken)


def test_the_container_gets_the_gpus_and_nvidias_runtime_settings(template: dict) -> None:
    kwargs = _defaults(template)["container_create_kwargs"]
    assert kwargs["device_requests"] == [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
    assert kwargs["ipc_mode"] == "host"
    assert {u["name"]: u["soft"] for u in kwargs["ulimits"]} == {"memlock": -1, "stack": 67108864}


@pytest.mark.skipif(
    importlib.util.find_spec("prefect_docker") is None,
    reason="prefect-docker not installed: the structural checks above still run",
)
def test_the_docker_worker_builds_its_job_configuration_from_it(template: dict) -> None:
    from prefect.utilities.templating import apply_values
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    default = DockerWorker.get_default_base_job_template()
    assert template["job_configuration"] == default["job_configuration"]  # only defaults differ
    ours, theirs = template["variables"]["properties"], default["variables"]["properties"]
    assert set(ours) == set(theirs)
    for name, prop in ours.items():  # same types as the worker declares
        assert {k: v for k, v in prop.items() if k not in ("default", "description")} == {
            k: v for k, v in theirs[name].items() if k not in ("default", "description")
        }, name
    config = DockerWorkerJobConfiguration(**apply_values(template["job_configuration"], _defaults(template)))
    assert config.image == "kiln-trtllm:1.2.1" and config.env["KILN_HOME"] == "/var/lib/kiln"
    # same path on host and in here
    assert f"{config.env['KILN_HOME']}:{config.env['KILN_HOME']}" in config.volumes
    import docker.types

    for request in config.container_create_kwargs["device_requests"]:
        assert docker.types.DeviceRequest(**request)["Driver"] == "nvidia"
    for limit in config.container_create_kwargs["ulimits"]:
        docker.types.Ulimit(**limit)


def test_the_image_is_nvidias_tensorrt_llm_release_of_the_contract(template: dict) -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG TRTLLM_IMAGE=(\S+)$", text, re.M)
    assert base and base.group(1).startswith("nvcr.io/nvidia/tensorrt-llm/release:")
    version = base.group(1).rsplit(":", 1)[1]
    assert api.series_for(version) == "1.2" and api.load_contract("1.2").data["version"]["target"].startswith(
        f"TensorRT-LLM {version}"
    )
    assert "FROM ${TRTLLM_IMAGE}" in text
    assert _defaults(template)["image"].endswith(f":{version}")


def test_every_trtllm_target_names_a_pool_documented_here() -> None:
    targets = yaml.safe_load((ROOT / "profiles" / "targets.yaml").read_text())["targets"]
    readme = (ROOT / "deploy" / "README.md").read_text()
    pools = {t["work_pool"] for t in targets if t.get("backend") == "tensorrt_llm"}
    assert pools and all(pool in readme for pool in pools)
