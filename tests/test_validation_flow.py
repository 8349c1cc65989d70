"""Acceptance of validation in a build: a tight accuracy gate fails a recipe, shows its numbers, registers
nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

LIMITS = {"max_batch_size": 2, "max_input_len": 64, "max_seq_len": 128, "max_num_tokens": 256}


# a whole build (2 recipes, Prefect harness, MLflow): ~1 min alone, more on a shared machine
@pytest.mark.slow
def test_tight_accuracy_gate_fails_recipe_and_nothing_is_registered_for_it(
    prefect_harness, kiln_home: Path, tiny_hub_model_dir: Path
) -> None:
    from mlflow import MlflowClient

    from kiln.flows.build import build

    profile = {
        "name": "gatetest",
        "model": {"local_dir": str(tiny_hub_model_dir)},
        "recipes": [
            {"name": "none", "quantization": "none"},
            {
                "name": "int4",
                "quantization": "int4_wo",
                "group_size": 32,
                "gates": {"max_kl_divergence": 1e-6, "min_top1_agreement": 0.9999},
            },
        ],
        "targets": [{"name": "cpu", "dtype": "float32", "limits": LIMITS}],
        "gates": {"max_ppl_increase_pct": 1000.0},
        "evaluation": {"heldout_tokens": 128, "prompts": 2, "max_new_tokens": 4, "concurrency": [1, 2]},
        "registry": {"model_name": "gatetest"},
    }
    outcomes = {o.recipe: o for o in build(profile=profile)}
    assert outcomes["none"].status == "registered" and outcomes["none"].recommended
    bad = outcomes["int4"]
    assert bad.status == "failed-gates" and bad.version is None and not bad.recommended
    kl = bad.metrics["kl_divergence"]
    assert kl > 1e-6 and f"max_kl_divergence: kl_divergence {kl:.4g} nats > 1e-06 nats" in bad.verdict

    client = MlflowClient(tracking_uri=f"sqlite:///{kiln_home / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'gatetest.cpu'")
    assert len(versions) == 1 and str(versions[0].version) == outcomes["none"].version
    # The passing version's run holds the validation document and its latency plot.
    files = {a.path for a in client.list_artifacts(versions[0].run_id)}
    files |= {a.path for d in list(files) for a in client.list_artifacts(versions[0].run_id, d)}
    assert any(p.endswith("validation.json") for p in files), files
    assert any(p.endswith(".png") for p in files), files

    report = kiln_home / "reports" / "gatetest"
    results = json.loads((report / "results.json").read_text())
    assert {r["recipe"]: r["passed"] for r in results["rows"]} == {"none": True, "int4": False}
    assert "## Gate failures (not registered)" in (report / "report.md").read_text()
    assert (report / "pareto.png").read_bytes().startswith(b"\x89PNG")
    assert (report / "latency_vs_throughput-cpu.png").read_bytes().startswith(b"\x89PNG")
