"""The checkpoint gate in a build: a recipe over ``max_ppl_increase_pct`` on its fake-quant checkpoint is
reported with its numbers, never compiled or registered, and the others still build; the verdict is cached."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

LIMITS = {"max_batch_size": 2, "max_input_len": 64, "max_seq_len": 128, "max_num_tokens": 256}
EVALUATION = {"heldout_tokens": 128, "prompts": 2, "max_new_tokens": 4, "concurrency": [1]}


@pytest.fixture(scope="module")
def fitted_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A tiny Llama with SmolLM2's tokenizer, fitted a few steps to the build's held-out text.

    On a random model's near-uniform predictions, 4-bit rounding moves perplexity by noise of either sign;
    once the weights carry what the text needs, quantizing them costs perplexity, as on a trained model.
    """
    import torch
    from transformers import LlamaForCausalLM

    from kiln.calibration import heldout_set
    from kiln.hub import load_tokenizer
    from kiln.profiles import Evaluation
    from tests.fixtures.hub import TOKENIZER_FILES
    from tests.fixtures.models import make_tiny_llama

    out = make_tiny_llama(tmp_path_factory.mktemp("fitted") / "tiny", vocab=49152, hidden=32, tie=True)
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).is_file():
            shutil.copy2(smollm2_dir / name, out / name)
    heldout = heldout_set(Evaluation(**EVALUATION), load_tokenizer(out))
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor(heldout.token_ids)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    return out


def _profile(model_dir: Path, int4_limit: float) -> dict:
    return {
        "name": "ckgate",
        "model": {"local_dir": str(model_dir)},
        "recipes": [
            {"name": "int8", "quantization": "int8_wo"},
            {
                "name": "int4",
                "quantization": "int4_wo",
                "group_size": 32,
                "gates": {"max_ppl_increase_pct": int4_limit},
            },
        ],
        "targets": [{"name": "cpu", "dtype": "float32", "limits": LIMITS}],
        "gates": {"max_ppl_increase_pct": 1000.0},
        "evaluation": EVALUATION,
        "registry": {"model_name": "ckgate"},
    }


def test_a_recipe_over_its_checkpoint_gate_is_reported_and_never_compiled_while_others_build(
    prefect_harness, kiln_home: Path, fitted_model_dir: Path
) -> None:
    from mlflow import MlflowClient

    from kiln import progress
    from kiln.flows.build import build

    seen: list[tuple[str, str, str]] = []
    with progress.listening(
        lambda e: seen.append((e.step, e.detail, e.status)) if e.status != "running" else None
    ):
        outcomes = {o.recipe: o for o in build(profile=_profile(fitted_model_dir, 0.0))}

    assert outcomes["int8"].status == "registered" and outcomes["int8"].version
    bad = outcomes["int4"]
    assert bad.status == "failed-gates" and bad.version is None and bad.uri is None and not bad.recommended
    increase = bad.metrics["ppl_increase_pct"]
    assert increase > 0.0 and bad.metrics["baseline_perplexity"] > 1
    assert bad.metrics["perplexity"] == pytest.approx(
        bad.metrics["baseline_perplexity"] * (1 + increase / 100)
    )
    assert bad.verdict.startswith(
        f"fail: checkpoint max_ppl_increase_pct: ppl_increase_pct {increase:.4g} % > 0 %"
    )
    assert f"fake-quant perplexity {bad.metrics['perplexity']:.4g} vs unquantized" in bad.verdict

    # nothing was exported, compiled or registered for int4; int8 went the whole way
    assert ("compile", "int4 x cpu", "skipped") in seen and ("compile", "int8 x cpu", "done") in seen
    assert not any(step in {"validate", "register"} and detail.startswith("int4") for step, detail, _ in seen)
    engines = [json.loads(p.read_text()) for p in (kiln_home / "cache" / "compile").glob("*/record.json")]
    assert sorted(e["recipe"] for e in engines) == ["baseline", "int8"]
    checkpoints = {
        r["recipe"]: r
        for r in (json.loads(p.read_text()) for p in (kiln_home / "cache" / "quantize").glob("*/record.json"))
    }
    assert (
        checkpoints["int4"]["trtllm_dirs"] == {}
        and checkpoints["int4"]["perplexity"]["increase_pct"] == increase
    )
    assert not any("int4" in str(p.relative_to(kiln_home)) for p in (kiln_home / "store").rglob("*"))
    client = MlflowClient(tracking_uri=f"sqlite:///{kiln_home / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'ckgate.cpu'")
    assert [(v.tags["kiln.recipe"], str(v.version)) for v in versions] == [("int8", outcomes["int8"].version)]

    # the report names the gate, its stage and the numbers
    report = kiln_home / "reports" / "ckgate"
    rows = {r["recipe"]: r for r in json.loads((report / "results.json").read_text())["rows"]}
    assert rows["int4"]["passed"] is False and rows["int4"]["metrics"]["ppl_increase_pct"] == increase
    assert "  - checkpoint max_ppl_increase_pct: ppl_increase_pct" in (report / "report.md").read_text()

    # a rerun with identical inputs calibrates nothing and gives the same verdict from the cached numbers
    seen.clear()
    with progress.listening(
        lambda e: seen.append((e.step, e.detail, e.status)) if e.status != "running" else None
    ):
        again = {o.recipe: o for o in build(profile=_profile(fitted_model_dir, 0.0))}
    assert again["int4"].verdict == bad.verdict and again["int8"].version == outcomes["int8"].version
    assert {d: s for st, d, s in seen if st == "quantize"} == {
        "baseline": "reused",
        "int8": "reused",
        "int4": "reused",
    }


def test_the_cached_gate_verdict_follows_the_threshold_and_recalibrates_only_when_it_must(
    kiln_home: Path, fitted_model_dir: Path, modelopt_calls: list[int]
) -> None:
    """The checkpoint key leaves gates out: a tighter gate re-decides from the cached numbers; a looser one
    than a stored refusal needs the export it never wrote, so that one recalibrates."""

    from kiln.calibration import heldout_set
    from kiln.hub import ModelSnapshot as Snapshot
    from kiln.hub import load_tokenizer
    from kiln.profiles import load_request
    from kiln.steps import Datasets
    from kiln.tasks.build import calibrate_and_quantize

    calls = modelopt_calls
    snapshot = Snapshot(path=fitted_model_dir, sha="fitted", source="local")

    def run(limit: float | None):
        profile = _profile(fitted_model_dir, 0.0)
        profile["recipes"] = [{"name": "int4", "quantization": "int4_wo", "group_size": 32}]
        profile["gates"] = {"max_ppl_increase_pct": limit}
        request = load_request(profile)
        data = Datasets(
            calibration={}, heldout=heldout_set(request.evaluation, load_tokenizer(fitted_model_dir))
        )
        return calibrate_and_quantize.fn(request, snapshot, request.recipes[0], data)

    loose = run(1000.0)  # passes: exported, numbers kept
    assert loose.passed and loose.trtllm_dirs and len(calls) == 1
    increase = loose.perplexity.increase_pct
    assert increase > 0
    tight = run(increase / 2)  # re-decided from the cache: refused, no calibration
    assert not tight.passed and tight.reused and len(calls) == 1
    assert (
        "checkpoint max_ppl_increase_pct" in tight.verdict and tight.metrics()["ppl_increase_pct"] == increase
    )

    # a fresh cache: the first (tight) run stores a refusal without exports
    shutil.rmtree(kiln_home / "cache")
    refused = run(increase / 2)
    assert not refused.passed and refused.trtllm_dirs == {} and len(calls) == 2
    assert not run(increase / 4).passed and len(calls) == 2  # still over: same verdict, no calibration
    relaxed = run(None)  # no gate: needs the export the refusal never wrote
    assert relaxed.passed and relaxed.trtllm_dirs and len(calls) == 3
    assert run(None).reused and len(calls) == 3


def test_asset_conversion_drops_the_gguf_quantization_config(tmp_path: Path) -> None:
    from kiln.assets import drop_gguf_quantization_config, prepare_smollm2

    converted = tmp_path / "SmolLM2"
    converted.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "model_type": "llama",
        "quantization_config": {"dequantize": False, "gguf_file": "x.gguf", "quant_method": "gguf"},
    }
    (converted / "config.json").write_text(json.dumps(config))
    (converted / "model.safetensors").write_bytes(b"weights")
    (converted / "tokenizer.json").write_text("{}")
    # a dir an older kiln converted is cleaned on reuse, every other field untouched
    assert prepare_smollm2(converted) == converted
    written = json.loads((converted / "config.json").read_text())
    assert written == {k: v for k, v in config.items() if k != "quantization_config"}
    assert drop_gguf_quantization_config(converted) is False  # idempotent

    real = tmp_path / "awq"
    real.mkdir()
    awq = {**config, "quantization_config": {"quant_method": "awq", "bits": 4}}
    (real / "config.json").write_text(json.dumps(awq))
    assert drop_gguf_quantization_config(real) is False  # a real quantized model keeps saying so
    assert json.loads((real / "config.json").read_text()) == awq


def test_quantize_refuses_a_config_that_says_gguf(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from kiln.errors import KilnInputError
    from kiln.profiles import Recipe
    from kiln.quantize import quantize

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    (tiny_llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(KilnInputError, match=r"already quantized \(gguf\).*delete quantization_config"):
        quantize(
            tiny_llama_dir,
            Recipe(name="w8", quantization="int8_wo"),
            layouts=[(1, 1)],
            output_dir=tmp_path / "out",
            dtype="float32",
            device="cpu",
            lineage={},
            calibration=None,
        )
