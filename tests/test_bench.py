"""``kiln bench`` on an engine dir and against a real ``kiln serve`` (``--url``), and the one measuring code
path it shares with validation's performance sweep; ``kiln generate`` warms up before it reports tokens/s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kiln.cli import app
from kiln.profiles import Evaluation
from tests.test_serve import API_KEY, KilnServer, start_kiln_serve, tiny_engine

runner = CliRunner()


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return tiny_engine(tmp_path_factory.mktemp("bench"), smollm2_dir, max_batch_size=4, max_seq_len=128)


def _bench(*args: str) -> dict:
    result = runner.invoke(app, ["bench", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_bench_engine_dir_reports_each_level_and_skips_what_the_engine_cannot_batch(
    engine_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    doc = _bench(
        str(engine_dir),
        "--concurrency",
        "1,2,8",
        "--input-len",
        "8",
        "--output-len",
        "5",
        "--requests",
        "2",
        "--output",
        str(out),
    )
    assert (
        doc["mode"] == "engine" and doc["device"] == "cpu" and (doc["prompt_len"], doc["gen_len"]) == (8, 5)
    )
    assert [p["concurrency"] for p in doc["points"]] == [1, 2]
    assert doc["skipped"] == [{"concurrency": 8, "reason": "above the engine's max_batch_size (4)"}]
    for point in doc["points"]:
        assert point["output_tokens"] == point["requests"] * 5 and point["requests"] == 2
        assert point["ttft_ms"]["p50"] > 0 and point["itl_ms"]["p99"] >= point["itl_ms"]["p50"] > 0
        assert point["output_tokens_per_s"] > 0 and point["roofline_pct"] is None  # no HBM roofline on CPU
    assert json.loads(out.read_text())["points"] == doc["points"]
    table = runner.invoke(
        app, ["bench", str(engine_dir), "-c", "1", "--input-len", "4", "--output-len", "2", "--requests", "1"]
    )
    assert table.exit_code == 0 and "out tok/s" in table.output and "roofline" in table.output


def test_bench_and_validation_measure_through_one_code_path(engine_dir: Path) -> None:
    """Validation's sweep and `kiln bench ENGINE_DIR` with the same settings: the same prompts, rounds and
    token counts at every level, and throughput of the same order (it is one function, timed twice)."""
    from kiln.engine.torch import TorchBackend
    from kiln.validation.perf import measure_performance

    engine = TorchBackend().load(engine_dir)
    validation = measure_performance(
        engine, Evaluation(concurrency=[1, 2]), prompt_len=8, gen_len=4, seed=3, min_requests=2
    ).to_dict()
    engine.close()
    bench = _bench(
        str(engine_dir),
        "-c",
        "1,2",
        "--input-len",
        "8",
        "--output-len",
        "4",
        "--requests",
        "2",
        "--seed",
        "3",
    )
    for key in ("prompt_len", "gen_len", "seed", "warmup_rounds", "device"):
        assert bench[key] == validation[key]
    for ours, theirs in zip(bench["points"], validation["points"], strict=True):
        assert {k: ours[k] for k in ("concurrency", "requests", "output_tokens")} == {
            k: theirs[k] for k in ("concurrency", "requests", "output_tokens")
        }
        assert set(ours) == set(theirs)
        assert 0.1 < ours["output_tokens_per_s"] / theirs["output_tokens_per_s"] < 10


@pytest.fixture(scope="module")
def served(engine_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    srv: KilnServer = start_kiln_serve(engine_dir, tmp_path_factory.mktemp("bench-serve"), api_key=API_KEY)
    try:
        yield srv
    finally:
        srv.process.stop(grace_s=30)


def test_bench_url_drives_kiln_serve_over_streaming_http(
    served: KilnServer, engine_dir: Path, tmp_path: Path
) -> None:
    generated_before = served.metric("kiln_generation_tokens_total")
    doc = _bench(
        "--url",
        served.url,
        "--api-key",
        API_KEY,
        "-c",
        "1,4",
        "--input-len",
        "8",
        "--output-len",
        "6",
        "--requests",
        "4",
        "--warmup-rounds",
        "1",
    )
    assert doc["mode"] == "url" and doc["source"].endswith(f"(model {served.model})")
    assert [p["concurrency"] for p in doc["points"]] == [1, 4]
    for point in doc["points"]:  # ignore_eos: every request makes exactly --output-len tokens
        assert point["requests"] == 4 and point["output_tokens"] == 24
        assert point["ttft_ms"]["p90"] > 0 and point["itl_ms"] is not None
    # warm-up (1 + 4 requests) and timed (4 + 4) requests all went through the server
    assert served.metric("kiln_generation_tokens_total") - generated_before == (1 + 4 + 4 + 4) * 6
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"prompt": "Once upon a time"}\n{"prompt": "Hello there", "max_tokens": 3}\n')
    over_http = _bench(
        "--url",
        served.url,
        "--api-key",
        API_KEY,
        "-c",
        "2",
        "--dataset",
        str(dataset),
        "--output-len",
        "4",
        "--requests",
        "2",
    )
    in_process = _bench(
        str(engine_dir), "-c", "2", "--dataset", str(dataset), "--output-len", "4", "--requests", "2"
    )
    assert over_http["points"][0]["output_tokens"] == in_process["points"][0]["output_tokens"] == 7
    refused = runner.invoke(app, ["bench", "--url", served.url, "--api-key", "wrong", "-c", "1"])
    assert refused.exit_code != 0 and "401" in refused.output


def test_generate_warms_up_before_it_reports_tokens_per_second(engine_dir: Path) -> None:
    args = [
        "generate",
        str(engine_dir),
        "--prompt",
        "Once upon a time",
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.9",
        "--seed",
        "5",
        "--json",
    ]
    warm, cold = runner.invoke(app, args), runner.invoke(app, [*args, "--no-warmup"])
    assert warm.exit_code == 0 and cold.exit_code == 0, warm.output
    assert warm.stdout == cold.stdout  # the warm-up changes no output, seeded sampling included
    plain = runner.invoke(app, ["generate", str(engine_dir), "--prompt", "Hi", "--max-new-tokens", "3"])
    assert plain.exit_code == 0 and "tokens/s" in plain.output
