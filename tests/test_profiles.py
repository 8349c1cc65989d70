"""Profiles: validation errors name the file, field path and allowed values; `kiln profiles check`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kiln.cli import app
from kiln.errors import ProfileError, UnsupportedCombinationError
from kiln.preflight import check_request_static
from kiln.profiles import load_request

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "profiles" / "examples"
runner = CliRunner()


def write_profile(root: Path, body: dict) -> Path:
    """A request inside a copy of the repo's profiles/ tree, so named recipes/targets resolve."""
    profiles = root / "profiles"
    (profiles / "examples").mkdir(parents=True, exist_ok=True)
    for lib in ("recipes.yaml", "targets.yaml"):
        (profiles / lib).write_text((REPO / "profiles" / lib).read_text())
    path = profiles / "examples" / "req.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def base_body() -> dict:
    return {
        "name": "t",
        "model": {"repo_id": "org/model", "revision": "main"},
        "recipes": ["none"],
        "targets": ["cpu"],
        "registry": {"model_name": "m"},
    }


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_validate(path: Path, kiln_home: Path) -> None:
    request = load_request(path)
    assert request.recipes and request.targets


def test_named_recipes_and_targets_resolve_from_library(tmp_path: Path) -> None:
    body = base_body() | {"recipes": ["none", "fp8"], "targets": ["cpu", "h100-torch"]}
    request = load_request(write_profile(tmp_path, body))
    assert [r.quantization for r in request.recipes] == ["none", "fp8"]
    assert request.targets[1].sm == "sm90"


def test_misspelled_field_names_the_field_and_file(tmp_path: Path) -> None:
    body = base_body() | {"gates": {"max_ppl_increse_pct": 3}}
    path = write_profile(tmp_path, body)
    with pytest.raises(ProfileError) as info:
        load_request(path)
    message = str(info.value)
    assert str(path) in message and "gates.max_ppl_increse_pct" in message and "unknown field" in message


def test_unknown_recipe_name_lists_known_ones(tmp_path: Path) -> None:
    path = write_profile(tmp_path, base_body() | {"recipes": ["fp9"]})
    with pytest.raises(ProfileError, match=r"recipes\[0\]: unknown recipe 'fp9'.*known: .*fp8"):
        load_request(path)


def test_unknown_quantization_lists_allowed_values(tmp_path: Path) -> None:
    path = write_profile(tmp_path, base_body() | {"recipes": [{"name": "x", "quantization": "int3"}]})
    with pytest.raises(ProfileError, match=r"recipes\.0\.quantization: got 'int3'; allowed: .*'int4_awq'"):
        load_request(path)


def test_seq_len_must_exceed_input_len(tmp_path: Path) -> None:
    target = {"name": "c", "limits": {"max_input_len": 512, "max_seq_len": 256}}
    with pytest.raises(
        ProfileError,
        match=r"targets\.0\.limits.*max_seq_len \(256\) must be greater than max_input_len \(512\)",
    ):
        load_request(write_profile(tmp_path, base_body() | {"targets": [target]}))


def test_repo_id_with_path_traversal_is_refused(tmp_path: Path) -> None:
    body = base_body() | {"model": {"repo_id": "../etc/passwd"}}
    with pytest.raises(ProfileError, match=r"model\.HubModel\.repo_id"):
        load_request(write_profile(tmp_path, body))


def test_cuda_target_requires_sm(tmp_path: Path) -> None:
    body = base_body() | {"targets": [{"name": "g", "device": "cuda"}]}
    with pytest.raises(ProfileError, match="sm is required for a cuda target"):
        load_request(write_profile(tmp_path, body))


def test_fp8_on_ampere_is_refused_up_front(tmp_path: Path) -> None:
    request = load_request(
        write_profile(tmp_path, base_body() | {"recipes": ["fp8"], "targets": ["a100-trtllm"]})
    )
    with pytest.raises(
        UnsupportedCombinationError, match=r"fp8 needs SM >= 89; target 'a100-trtllm' is sm80"
    ):
        check_request_static(request)


def test_nvfp4_on_cpu_is_refused_up_front(tmp_path: Path) -> None:
    request = load_request(write_profile(tmp_path, base_body() | {"recipes": ["nvfp4"]}))
    with pytest.raises(UnsupportedCombinationError, match="nvfp4 needs CUDA"):
        check_request_static(request)


def test_cli_check_exits_2_and_names_the_field(tmp_path: Path) -> None:
    path = write_profile(tmp_path, base_body() | {"regsitry": {"model_name": "m"}})
    result = runner.invoke(app, ["profiles", "check", str(path)])
    assert result.exit_code == 2
    assert "regsitry" in result.output


def test_cli_check_accepts_the_demo(kiln_home: Path) -> None:
    result = runner.invoke(app, ["profiles", "check", str(EXAMPLES / "tiny-cpu.yaml")])
    assert result.exit_code == 0, result.output
    assert "none" in result.output and "cpu" in result.output


def test_malformed_yaml_is_a_profile_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_request(path)


def test_a_profile_outside_the_repo_resolves_the_installed_library_with_kiln_profiles_dir_on_top(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library ships inside the package: a request copied anywhere resolves ``none`` / ``cpu``; a
    KILN_PROFILES_DIR adds its own names on top (and wins a name both define)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("KILN_PROFILES_DIR", raising=False)
    path = elsewhere / "req.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "copied",
                "model": {"repo_id": "org/m"},
                "recipes": ["none", "fp8"],
                "targets": ["cpu"],
                "registry": {"model_name": "m"},
            }
        )
    )
    request = load_request(path)
    assert [r.quantization for r in request.recipes] == ["none", "fp8"] and request.targets[0].name == "cpu"

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "recipes.yaml").write_text(
        yaml.safe_dump(
            {
                "recipes": [
                    {"name": "fp8", "quantization": "fp8", "kv_cache_dtype": "fp8"},
                    {"name": "wo", "quantization": "int8_wo"},
                ]
            }
        )
    )
    monkeypatch.setenv("KILN_PROFILES_DIR", str(mine))
    path.write_text(
        yaml.safe_dump(
            {
                "name": "copied",
                "model": {"repo_id": "org/m"},
                "recipes": ["none", "fp8", "wo"],
                "targets": ["cpu"],
                "registry": {"model_name": "m"},
            }
        )
    )
    request = load_request(path)
    assert [(r.quantization, r.kv_cache_dtype) for r in request.recipes] == [
        ("none", "auto"),
        ("fp8", "fp8"),
        ("int8_wo", "auto"),
    ]
