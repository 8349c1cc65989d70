"""``kiln doctor``: this machine's toolchain, and a target's pre-flight checks run here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kiln.cli import app

ROOT = Path(__file__).resolve().parents[1]
HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None
runner = CliRunner()


@pytest.fixture(autouse=True)
def _repo_profiles(monkeypatch: pytest.MonkeyPatch, kiln_home: Path) -> None:
    monkeypatch.setenv("KILN_PROFILES_DIR", str(ROOT / "profiles"))


def _json(args: list[str]) -> tuple[int, dict]:
    result = runner.invoke(app, ["doctor", *args, "--json"])
    return result.exit_code, json.loads(result.stdout)


def test_doctor_reports_the_host() -> None:
    code, report = _json([])
    assert code == 0 and report["findings"] == []
    names = {c["name"]: c for c in report["host"]["components"]}
    assert names["torch"]["present"] and names["nvidia-modelopt"]["present"]
    assert names["tensorrt_llm"]["present"] is HAS_TRTLLM


def test_fp8_on_an_sm80_target_is_refused_by_doctor() -> None:
    code, report = _json(["--target", "a100-trtllm", "--recipe", "fp8", "--recipe", "none"])
    assert code == 1
    errors = {(f["check"], f["subject"]): f["message"] for f in report["findings"] if f["level"] == "error"}
    assert errors[("sm", "recipe 'fp8' x target 'a100-trtllm'")].startswith("fp8 needs SM >= 89")
    assert ("sm", "recipe 'none' x target 'a100-trtllm'") not in errors


@pytest.mark.skipif(HAS_TRTLLM, reason="checks a machine without tensorrt_llm")
def test_doctor_says_why_a_trtllm_target_cannot_run_here(smollm2_dir: Path) -> None:
    code, report = _json(["--target", "h100-trtllm", "--recipe", "fp8", "--model", str(smollm2_dir)])
    assert code == 1
    by_check = {f["check"]: f for f in report["findings"]}
    assert "kiln-h100-trtllm" in by_check["backend"]["message"]
    assert "tensorrt_llm package is not installed" in by_check["backend"]["message"]
    assert by_check["memory"]["level"] == "ok" and "of 80 GiB" in by_check["memory"]["message"]


def test_doctor_refuses_a_model_that_cannot_fit(tmp_path: Path, smollm2_dir: Path) -> None:
    small = tmp_path / "l4.yaml"
    small.write_text(
        yaml.safe_dump(
            {
                "name": "l4-trtllm",
                "backend": "tensorrt_llm",
                "device": "cuda",
                "gpu": "l4",
                "sm": "sm89",
                "gpu_memory_gib": 24,
                "work_pool": "kiln-l4-trtllm",
                "limits": {
                    "max_batch_size": 512,
                    "max_input_len": 4096,
                    "max_seq_len": 8192,
                    "max_num_tokens": 8192,
                },
            }
        )
    )
    code, report = _json(["--target", str(small), "--recipe", "fp8", "--model", str(smollm2_dir)])
    assert code == 1
    memory = [f for f in report["findings"] if f["check"] == "memory"]
    assert memory[0]["level"] == "error" and "the target's GPU has 24 GiB" in memory[0]["message"]


def test_doctor_checks_tp_pp_against_the_workers_gpus(tmp_path: Path) -> None:
    wide = tmp_path / "wide.yaml"
    wide.write_text(
        yaml.safe_dump(
            {
                "name": "wide",
                "backend": "tensorrt_llm",
                "device": "cuda",
                "sm": "sm90",
                "gpus_per_worker": 2,
                "limits": {"tp_size": 2, "pp_size": 2},
            }
        )
    )
    code, report = _json(["--target", str(wide)])
    assert code == 1
    assert any(
        f["check"] == "parallelism" and "gpus_per_worker is 2" in f["message"] for f in report["findings"]
    )


def test_unknown_target_is_an_input_error() -> None:
    result = runner.invoke(app, ["doctor", "--target", "h200-nope"])
    assert result.exit_code == 2
    assert "no target named 'h200-nope'" in result.output and "h100-trtllm" in result.output


def test_recipe_without_target_is_an_input_error() -> None:
    assert runner.invoke(app, ["doctor", "--recipe", "fp8"]).exit_code == 2


def test_doctor_command_line(kiln_home: Path) -> None:
    """The installed entry point, as a user runs it on a machine: a table and exit code 1 for a target it
    cannot run."""
    env = {**os.environ, "KILN_PROFILES_DIR": str(ROOT / "profiles"), "COLUMNS": "200"}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("kiln")), "doctor", "--target", "a100-trtllm", "--recipe", "fp8"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "pre-flight for target a100-trtllm on this machine" in done.stdout
    assert "fp8 needs SM >= 89" in done.stdout


def test_version_short_help_and_doctor_show_what_runs_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from importlib.metadata import version

    assert runner.invoke(app, ["--version"]).output.strip() == f"kiln {version('kiln-llm')}"
    assert "Usage" in runner.invoke(app, ["-h"]).output
    monkeypatch.chdir(tmp_path)  # outside the repo: the installed library still serves `--target cpu`
    monkeypatch.delenv("KILN_PROFILES_DIR", raising=False)
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")
    result = runner.invoke(app, ["doctor", "--target", "cpu"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert all(name in text for name in ("kiln", "prefect", "mlflow", "KILN_HOME", str(tmp_path / "home")))
    assert "recipe/target library:" in text and "installed with kiln" in text, result.output
    from kiln.families import FAMILIES

    assert all(family.name in text for family in FAMILIES)
