"""Validation end to end on kiln's torch engines: compiled engine dirs, measured against their baseline.

A tiny random Llama exported by ModelOpt (unquantized, and int4 weight-only) and compiled by the torch
backend: ``measure_engine`` loads both dirs, writes a schema-valid ``validation.json`` and the latency
plot, and the gates judge the int4 engine from those metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.calibration import TokenSet, token_sha256
from kiln.errors import EngineMismatchError
from kiln.profiles import Evaluation, Gates, Target
from kiln.validation.gates import decide
from kiln.validation.measure import LATENCY_PLOT, RESULT_FILE, measure_engine
from kiln.validation.results import validate_document
from tests.fixtures.models import make_tiny_llama

TARGET = Target(
    name="cpu-test", dtype="float32", limits={"max_batch_size": 4, "max_input_len": 32, "max_seq_len": 48}
)
EVALUATION = Evaluation(heldout_tokens=64, prompts=3, max_new_tokens=4, prompt_len=8, concurrency=[1, 4, 8])


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from kiln.engine.base import get_backend
    from tests.fixtures.engine import export_checkpoint

    root = tmp_path_factory.mktemp("val-engine")
    hf = make_tiny_llama(root / "hf")
    backend = get_backend("torch")
    out = {}
    for quant in ("none", "int4_wo"):
        ckpt, _ = export_checkpoint(hf, root / f"ckpt-{quant}", quant, group_size=32)
        out[quant] = backend.compile(
            ckpt, TARGET, root / f"engine-{quant}", {"model_sha": "abc", "recipe": quant}
        )
    return out


@pytest.fixture(scope="module")
def heldout() -> TokenSet:
    import torch

    gen = torch.Generator().manual_seed(3)
    ids = [
        torch.randint(0, 256, (60,), generator=gen).tolist(),
        torch.randint(0, 256, (40,), generator=gen).tolist(),
    ]
    return TokenSet(ids, token_sha256(ids), "test#random")


def test_measure_torch_engines(engines: dict[str, Path], heldout: TokenSet, tmp_path: Path) -> None:
    metrics, docs = measure_engine(
        engines["none"], engines["none"], heldout, EVALUATION, output_dir=tmp_path / "base"
    )
    assert metrics["ppl_increase_pct"] == 0.0 and metrics["top1_agreement"] == 1.0
    assert metrics["greedy_exact_match"] == 1.0
    written = json.loads((tmp_path / "base" / RESULT_FILE).read_text())
    validate_document(written)
    assert written == json.loads(json.dumps(docs[RESULT_FILE]))
    perf = written["performance"]
    assert [p["concurrency"] for p in perf["points"]] == [1, 4]
    assert [p["requests"] for p in perf["points"]] == [4, 4]  # the cpu default: 4 timed requests per level
    assert perf["skipped"] == [{"concurrency": 8, "reason": "above the engine's max_batch_size (4)"}]
    assert perf["prompt_len"] == 8 and perf["gen_len"] == 4 and perf["peak_memory_bytes"] > 0
    assert written["accuracy"]["window"] == 48 and written["accuracy"]["num_tokens"] == 98
    assert written["heldout"]["sha256"] == heldout.sha256
    assert (tmp_path / "base" / LATENCY_PLOT).read_bytes().startswith(b"\x89PNG")

    q_metrics, q_docs = measure_engine(engines["int4_wo"], engines["none"], heldout, EVALUATION)
    assert q_metrics["kl_divergence"] > 0 and q_metrics["top1_agreement"] < 1.0
    assert q_metrics["baseline_perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-5)
    assert q_metrics["size_bytes"] < metrics["size_bytes"]
    validate_document(q_docs[RESULT_FILE])
    verdict = decide(Gates(max_kl_divergence=q_metrics["kl_divergence"] / 2), q_metrics)
    assert not verdict.passed and verdict.failures[0].observed == pytest.approx(q_metrics["kl_divergence"])


def test_measure_refuses_dir_without_manifest(
    engines: dict[str, Path], heldout: TokenSet, tmp_path: Path
) -> None:
    with pytest.raises(EngineMismatchError, match="no kiln-engine.json"):
        measure_engine(tmp_path, engines["none"], heldout, EVALUATION)


def test_decode_cost_of_a_torch_engine_counts_what_a_step_reads(engines: dict[str, Path]) -> None:
    """The roofline's bytes: every weight a decode step reads (not the embedding table) and the KV per
    token."""
    from kiln.engine.torch import TorchBackend
    from kiln.validation.perf import decode_cost_from_dir

    engine = TorchBackend().load(engines["none"])
    try:
        spec, embedding = engine.model.spec, engine.model.embedding
        cost = decode_cost_from_dir(engines["none"])
        # every tensor the engine computes with but the embedding table (and the RoPE tables it derives at
        # load)
        linears = [m for m in engine.model.modules() if hasattr(m, "kind")]
        norms = [
            engine.model.final_norm,
            *(t for layer in engine.model.layers for t in (layer.input_norm, layer.post_norm)),
        ]
        expected = sum(
            t.numel() * t.element_size() for m in linears for t in (m.weight, m.bias) if t is not None
        )
        expected += sum(t.numel() * t.element_size() for t in norms)
        assert embedding.numel() > 0 and cost.weight_bytes == expected
        # float32 cache
        assert cost.kv_bytes_per_token == 2 * spec.num_layers * spec.num_kv_heads * spec.head_size * 4
    finally:
        engine.close()
