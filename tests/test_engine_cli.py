"""``kiln compile`` and ``kiln generate`` end to end on a tiny model with SmolLM2's real tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kiln.cli import app
from kiln.engine.base import GenerationRequest, SamplingParams
from kiln.engine.torch import TorchBackend
from tests.fixtures.engine import export_checkpoint
from tests.fixtures.models import make_tiny_llama

runner = CliRunner()
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    hf = make_tiny_llama(root / "hf", vocab=49152)  # SmolLM2's vocabulary, so its tokenizer fits
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).is_file():
            shutil.copy2(smollm2_dir / name, hf / name)
    checkpoint, _ = export_checkpoint(hf, root / "ckpt", "none")
    profile = root / "targets.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "targets": [
                    {
                        "name": "cpu-small",
                        "backend": "torch",
                        "device": "cpu",
                        "dtype": "float32",
                        "limits": {"max_batch_size": 2, "max_input_len": 32, "max_seq_len": 64},
                    }
                ]
            }
        )
    )
    engine = root / "engine"
    result = runner.invoke(
        app,
        [
            "compile",
            str(checkpoint),
            "--profile",
            str(profile),
            "--target",
            "cpu-small",
            "--output",
            str(engine),
            "--tokenizer",
            str(hf),
        ],
    )
    assert result.exit_code == 0, result.output
    return {"root": root, "hf": hf, "checkpoint": checkpoint, "profile": profile, "engine": engine}


def test_compile_writes_engine_dir(workspace: dict[str, Path]) -> None:
    manifest = json.loads((workspace["engine"] / "kiln-engine.json").read_text())
    assert manifest["target"] == "cpu-small" and manifest["limits"]["max_seq_len"] == 64
    assert (workspace["engine"] / "tokenizer.json").is_file()


def test_generate_json_matches_python_api(workspace: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    result = runner.invoke(
        app,
        [
            "generate",
            str(workspace["engine"]),
            "--prompt",
            "Once upon a time",
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "6",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in rows] == ["Once upon a time", "The capital of France is"]
    tok = AutoTokenizer.from_pretrained(workspace["engine"])
    engine = TorchBackend().load(workspace["engine"])
    for row in rows:
        prompt = tok(row["prompt"])["input_ids"]
        expected = engine.generate(
            [GenerationRequest(prompt, SamplingParams(max_new_tokens=6, stop_token_ids=(tok.eos_token_id,)))]
        )[0].token_ids
        assert row["token_ids"] == expected
        assert row["text"] == tok.decode(expected, skip_special_tokens=True)


def test_generate_jsonl_input_and_sampling_flags(workspace: dict[str, Path]) -> None:
    prompts = workspace["root"] / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello there"}\n{"prompt": "Water boils at", "max_new_tokens": 3}\n')
    args = [
        "generate",
        str(workspace["engine"]),
        "--input",
        str(prompts),
        "--max-new-tokens",
        "5",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "7",
        "--json",
    ]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    rows = [json.loads(line) for line in first.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and len(rows[1]["token_ids"]) <= 3 and len(rows[0]["token_ids"]) <= 5
    assert first.stdout == second.stdout  # seeded sampling is reproducible
    plain = runner.invoke(
        app, ["generate", str(workspace["engine"]), "--prompt", "Hi", "--max-new-tokens", "2"]
    )
    assert plain.exit_code == 0 and "tokens/s" in plain.output


def _flat(output: str) -> str:
    return " ".join(output.split())  # rich wraps long messages


def test_cli_errors_exit_2(workspace: dict[str, Path]) -> None:
    missing = runner.invoke(
        app,
        [
            "compile",
            str(workspace["checkpoint"]),
            "--profile",
            str(workspace["profile"]),
            "--target",
            "h100",
            "--output",
            str(workspace["root"] / "x"),
        ],
    )
    assert missing.exit_code == 2 and "no target 'h100'; targets: cpu-small" in _flat(missing.output)
    long_prompt = " ".join(["word"] * 60)
    too_long = runner.invoke(app, ["generate", str(workspace["engine"]), "--prompt", long_prompt])
    assert too_long.exit_code == 2 and "exceeds max_input_len 32" in _flat(too_long.output)
    bad = workspace["root"] / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    bad_input = runner.invoke(app, ["generate", str(workspace["engine"]), "--input", str(bad)])
    assert bad_input.exit_code == 2 and "bad.jsonl:1" in _flat(bad_input.output)
    assert not (workspace["root"] / "x").exists()


def test_generate_under_a_launcher_runs_a_pipeline_parallel_engine(workspace: dict[str, Path]) -> None:
    """`torchrun --nproc-per-node 2 kiln generate` on a pp_size 2 engine: every rank joins the process group
    from the launcher's environment, rank 0 alone prints, and the tokens are the single-rank engine's."""
    import sys

    from tests.fixtures.parallel import launch_ranks

    root = workspace["root"]
    checkpoint, _ = export_checkpoint(workspace["hf"], root / "ckpt-pp2", "none", pp_size=2)
    profile = root / "targets-pp2.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "targets": [
                    {
                        "name": "cpu-pp2",
                        "backend": "torch",
                        "device": "cpu",
                        "dtype": "float32",
                        "limits": {"max_batch_size": 2, "max_input_len": 32, "max_seq_len": 64, "pp_size": 2},
                    }
                ]
            }
        )
    )
    engine = root / "engine-pp2"
    built = runner.invoke(
        app,
        [
            "compile",
            str(checkpoint),
            "--profile",
            str(profile),
            "--target",
            "cpu-pp2",
            "--output",
            str(engine),
            "--tokenizer",
            str(workspace["hf"]),
        ],
    )
    assert built.exit_code == 0, built.output
    args = [
        "generate",
        str(engine),
        "--prompt",
        "Once upon a time",
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "6",
        "--json",
    ]
    outputs = launch_ranks([sys.executable, "-c", "from kiln.cli import app; app()", *args], world=2)
    rows = [json.loads(line) for line in outputs[0].splitlines() if line.startswith("{")]
    assert not [line for line in outputs[1].splitlines() if line.startswith("{")]
    single = runner.invoke(app, ["generate", str(workspace["engine"]), *args[2:]])
    assert single.exit_code == 0, single.output
    assert rows == [json.loads(line) for line in single.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and all(len(r["token_ids"]) == 6 or r["finish_reason"] == "stop" for r in rows)
