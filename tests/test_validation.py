"""Validation: accuracy vs the baseline, performance sweep, gates, the result document and its schema.

Engines here are real: ``HFEngine`` serves a real HF model's weights through the Engine protocol (a tiny
random Llama for the math, SmolLM2-135M for accuracy numbers), and degraded engines are the same
weights quantized to int4 (round to nearest, per group) or perturbed with seeded noise.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import jsonschema
import pytest
import torch

from kiln.engine.base import Engine, GenerationRequest, GenerationResult
from kiln.errors import CalibrationDataError, GenerationLimitError
from kiln.profiles import Evaluation, Gates
from kiln.validation.accuracy import (
    common_prefix,
    evaluate_accuracy,
    prompts_from,
    rolling_windows,
    window_stats,
)
from kiln.validation.gates import GATES, decide, recommend
from kiln.validation.perf import DecodeCost, Percentiles, measure_performance, roofline_pct, seeded_prompts
from kiln.validation.results import build_document, flat_metrics, validate_document
from tests.fixtures.models import make_tiny_llama


class HFEngine:
    """The Engine protocol over a loaded HF causal LM: batched greedy decode with its KV cache."""

    def __init__(self, model: torch.nn.Module, engine_dir: Path, max_batch_size: int | None = None) -> None:
        self.model = model.eval()
        self.engine_dir = engine_dir
        self.max_batch_size = max_batch_size
        self.calls = 0

    @torch.no_grad()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        self.calls += 1
        return self.model(torch.tensor([token_ids])).logits[0].float()

    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if self.max_batch_size is not None and len(requests) > self.max_batch_size:
            raise GenerationLimitError(f"{len(requests)} requests > max_batch_size {self.max_batch_size}")
        results: list[GenerationResult | None] = [None] * len(requests)
        by_len: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            assert r.sampling.temperature == 0.0, "HFEngine decodes greedily only"
            by_len.setdefault(len(r.prompt_token_ids), []).append(i)
        submitted = time.perf_counter()
        for indices in by_len.values():
            steps = max(requests[i].sampling.max_new_tokens for i in indices)
            ids = torch.tensor([requests[i].prompt_token_ids for i in indices])
            out = self.model(ids, use_cache=True)
            tokens, times = [], []
            for step in range(steps):
                nxt = out.logits[:, -1].argmax(-1)
                tokens.append(nxt)
                times.append(time.perf_counter() - submitted)
                if step + 1 < steps:
                    out = self.model(nxt[:, None], cache=out.cache, use_cache=True)
            generated = torch.stack(tokens, 1).tolist()
            for row, i in enumerate(indices):
                n = requests[i].sampling.max_new_tokens
                results[i] = GenerationResult(generated[row][:n], "length", times[0], times[:n])
        return results  # type: ignore[return-value]

    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def close(self) -> None:
        pass


def load_hf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def int4_rtn(model: torch.nn.Module, group: int = 32) -> torch.nn.Module:
    """A copy with every decoder Linear weight quantized to symmetric int4 per group (round to nearest)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                w = module.weight
                g = w.reshape(-1, group)
                scale = g.abs().amax(1, keepdim=True).clamp(min=1e-8) / 7
                w.copy_((torch.round(g / scale).clamp(-8, 7) * scale).reshape(w.shape))
    return model


def perturbed(model: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    """A copy with seeded Gaussian noise (``scale`` x each tensor's std) on every weight matrix."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    path = make_tiny_llama(tmp_path_factory.mktemp("val") / "tiny", vocab=256)
    return load_hf(path), path


@pytest.fixture(scope="module")
def heldout() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (70, 45)]


# --- accuracy math -----------------------------------------------------------------------------------


@pytest.mark.parametrize("length,window", [(10, 4), (9, 4), (2, 2), (100, 100), (101, 16)])
def test_rolling_windows_predict_every_token_once(length: int, window: int) -> None:
    seq = list(range(length))
    windows = rolling_windows(seq, window)
    assert all(2 <= len(w) <= window for w in windows)
    predicted = [t for w in windows for t in w[1:]]
    assert predicted == seq[1:]
    for a, b in zip(windows, windows[1:], strict=False):
        assert b[0] == a[-1]


def test_rolling_windows_refuse_window_below_two() -> None:
    with pytest.raises(ValueError, match="window must be >= 2"):
        rolling_windows([1, 2, 3], 1)


def test_window_stats_match_definitions() -> None:
    gen = torch.Generator().manual_seed(0)
    e, b = torch.randn(6, 11, generator=gen), torch.randn(6, 11, generator=gen)
    tokens = [3, 1, 4, 1, 5, 9]
    nll_e, nll_b, kl, agree = window_stats(e, b, tokens)
    pe, pb = e[:-1].softmax(-1), b[:-1].softmax(-1)
    assert nll_e == pytest.approx(-sum(math.log(pe[i, tokens[i + 1]]) for i in range(5)), rel=1e-5)
    assert nll_b == pytest.approx(-sum(math.log(pb[i, tokens[i + 1]]) for i in range(5)), rel=1e-5)
    manual_kl = (pb * (pb.log() - pe.log())).sum(-1)
    torch.testing.assert_close(kl, manual_kl, rtol=1e-5, atol=1e-6)
    assert agree == int((pe.argmax(-1) == pb.argmax(-1)).sum())
    with pytest.raises(ValueError, match="share a vocabulary"):
        window_stats(e, b[:, :10], tokens)


def test_common_prefix_and_prompts() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    prompts = prompts_from([list(range(50)), list(range(50, 60))], 4, 8)
    assert len(prompts) == 4 and all(len(p) == 8 for p in prompts)
    assert prompts[0] == list(range(8)) and prompts[-1] == list(range(52, 60))
    assert prompts_from([[1, 2]], 3, 8) == []


def test_identical_engines_agree_and_ppl_is_token_weighted(tiny, heldout, tmp_path: Path) -> None:
    model, path = tiny
    engine, baseline = HFEngine(model, path), HFEngine(copy.deepcopy(model), path)
    prompts = prompts_from(heldout, 3, 6)
    result = evaluate_accuracy(
        engine, baseline, heldout, window=16, prompts=prompts, max_new_tokens=5, batch_size=2
    )
    assert result.ppl_increase_pct == pytest.approx(0.0, abs=1e-6)
    assert result.kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert (
        result.top1_agreement == 1.0
        and result.greedy_exact_match == 1.0
        and result.greedy_prefix_match == 1.0
    )
    assert result.num_tokens == sum(len(s) - 1 for s in heldout)
    # Reference: the model's own loss with labels, token-weighted over whole sequences (no window limit).
    nll = sum(model(torch.tensor([s]), labels=torch.tensor([s])).loss.item() * (len(s) - 1) for s in heldout)
    full = evaluate_accuracy(engine, engine, heldout, window=128, prompts=[], max_new_tokens=1)
    assert full.perplexity == pytest.approx(math.exp(nll / full.num_tokens), rel=1e-4)
    assert full.num_windows == len(heldout) and math.isnan(full.greedy_exact_match)
    # Windows of 16 lose context, so perplexity differs, but every token is still counted exactly once.
    assert result.num_tokens == full.num_tokens and result.num_windows > full.num_windows


def test_degraded_engine_measures_worse(tiny, heldout) -> None:
    model, path = tiny
    base = HFEngine(model, path)
    prompts = prompts_from(heldout, 4, 8)
    small = evaluate_accuracy(
        HFEngine(perturbed(model, 0.05), path), base, heldout, window=32, prompts=prompts, max_new_tokens=6
    )
    large = evaluate_accuracy(
        HFEngine(perturbed(model, 0.5), path), base, heldout, window=32, prompts=prompts, max_new_tokens=6
    )
    assert 0 < small.kl_divergence < large.kl_divergence
    assert large.kl_divergence_p99 >= large.kl_divergence
    assert large.top1_agreement < 1.0 and large.top1_agreement <= small.top1_agreement
    assert large.greedy_prefix_match < 1.0
    assert small.baseline_perplexity == pytest.approx(large.baseline_perplexity)


def test_empty_heldout_is_a_clear_error(tiny) -> None:
    model, path = tiny
    engine = HFEngine(model, path)
    with pytest.raises(CalibrationDataError, match="heldout"):
        evaluate_accuracy(engine, engine, [[5]], window=8, prompts=[])
    assert engine.calls == 0


# --- gates -------------------------------------------------------------------------------------------


def test_gates_cover_every_profile_gate() -> None:
    assert set(GATES) == set(Gates.model_fields)


def test_degraded_engine_fails_accuracy_gate_with_numbers(tiny, heldout) -> None:
    model, path = tiny
    base = HFEngine(model, path)
    bad = evaluate_accuracy(
        HFEngine(perturbed(model, 0.5), path), base, heldout, window=32, prompts=[], max_new_tokens=1
    )
    # A random model's perplexity may even drop under noise: KL and top-1 are what show the damage here
    # (the perplexity gate on real weights is test_smollm2_int4_vs_baseline).
    tight = Gates(max_kl_divergence=0.001, min_top1_agreement=0.999)
    verdict = decide(tight, bad)
    assert not verdict.passed and not verdict.accuracy_passed
    by_gate = {f.gate: f for f in verdict.failures}
    assert set(by_gate) == {"max_kl_divergence", "min_top1_agreement"}
    kl = by_gate["max_kl_divergence"]
    assert kl.observed == pytest.approx(bad.kl_divergence) and kl.margin == pytest.approx(
        bad.kl_divergence - 0.001
    )
    top1 = by_gate["min_top1_agreement"]
    assert top1.margin == pytest.approx(0.999 - bad.top1_agreement)
    message = "; ".join(verdict.messages)
    assert "kl_divergence" in message and "0.001" in message and f"{bad.kl_divergence:.4g}" in message
    assert "top1_agreement" in message and f"{bad.top1_agreement:.4g}" in message
    # The same engine passes loose gates; the baseline against itself passes the tight ones.
    assert decide(Gates(max_kl_divergence=1e6, min_top1_agreement=0.0), bad).passed
    same = evaluate_accuracy(base, base, heldout, window=32, prompts=[], max_new_tokens=1)
    assert decide(tight.merged(Gates(max_ppl_increase_pct=0.01)), same).passed


def test_unmeasured_gate_fails_and_speed_gate_keeps_accuracy_pass() -> None:
    metrics = {"ppl_increase_pct": 0.5, "top1_agreement": 0.99, "tokens_per_s": 80.0}
    verdict = decide(Gates(max_ppl_increase_pct=1.0, min_tokens_per_s=100, max_ttft_p90_ms=50), metrics)
    assert not verdict.passed and verdict.accuracy_passed
    failures = {f.gate: f for f in verdict.failures}
    assert failures["min_tokens_per_s"].margin == pytest.approx(20.0)
    assert failures["max_ttft_p90_ms"].observed is None and "not measured" in str(failures["max_ttft_p90_ms"])
    assert verdict.checked == {
        "max_ppl_increase_pct": 1.0,
        "min_tokens_per_s": 100.0,
        "max_ttft_p90_ms": 50.0,
    }
    assert decide(Gates(), {}).passed


def test_recommend_fastest_or_smallest() -> None:
    cands = {
        "fp8": {"tokens_per_s": 90.0, "size_bytes": 200.0},
        "int4": {"tokens_per_s": 90.0, "size_bytes": 100.0},
        "bf16": {"tokens_per_s": 50.0, "size_bytes": 400.0},
        "nospeed": {"size_bytes": 50.0},
    }
    assert recommend(cands, "fastest") == "int4"  # tie on speed: smaller wins
    assert recommend(cands, "smallest") == "nospeed"
    assert recommend({}, "fastest") is None


# --- performance -------------------------------------------------------------------------------------


def test_performance_sweep(tiny) -> None:
    model, path = tiny
    engine = HFEngine(model, path, max_batch_size=4)
    evaluation = Evaluation(concurrency=[1, 4, 16], max_new_tokens=4)
    levels = []
    perf = measure_performance(
        engine,
        evaluation,
        prompt_len=6,
        gen_len=4,
        max_batch_size=None,
        min_requests=4,
        on_level=levels.append,
    )
    assert levels == [1, 4, 16]
    assert [p.concurrency for p in perf.points] == [1, 4] and 16 in perf.skipped
    assert "max_batch_size" in perf.skipped[16]
    for p in perf.points:
        assert p.requests == 4 and p.output_tokens == 4 * 4
        assert p.output_tokens_per_s == pytest.approx(p.output_tokens / p.wall_s)
        assert p.ttft_ms.p50 <= p.ttft_ms.p90 <= p.ttft_ms.p99
        assert p.itl_ms is not None and p.itl_ms.p50 > 0
        assert p.roofline_pct is None  # CPU: no bandwidth roofline
    assert perf.best_tokens_per_s == max(p.output_tokens_per_s for p in perf.points)
    assert perf.ttft_p90_ms == perf.points[0].ttft_ms.p90
    assert perf.peak_memory_bytes == engine.memory_bytes()
    # max_batch_size known up front: skipped without calling the engine.
    perf2 = measure_performance(
        engine, Evaluation(concurrency=[2, 8]), prompt_len=3, gen_len=1, max_batch_size=2, min_requests=2
    )
    assert [p.concurrency for p in perf2.points] == [2] and perf2.points[0].itl_ms is None
    with pytest.raises(ValueError, match="gen_len"):
        measure_performance(engine, evaluation, prompt_len=4, gen_len=0)


def test_seeded_prompts_and_roofline() -> None:
    assert seeded_prompts(3, 5, 100, 1) == seeded_prompts(3, 5, 100, 1) != seeded_prompts(3, 5, 100, 2)
    assert Percentiles.of([]) is None and Percentiles.of([1.0, 3.0]).mean == 2.0
    cost = DecodeCost(weight_bytes=1000, kv_bytes_per_token=10)
    assert cost.bytes_per_step(2, 50) == 2000
    # 2000 bytes in 1 s on a 4000 B/s device is half the roofline.
    assert roofline_pct(cost, 2, 50, 1.0, 4000.0) == pytest.approx(50.0)


# --- the result document -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def document(tiny, heldout) -> dict:
    model, path = tiny
    engine, base = HFEngine(perturbed(model, 0.1), path), HFEngine(model, path)
    acc = evaluate_accuracy(
        engine, base, heldout, window=32, prompts=prompts_from(heldout, 2, 6), max_new_tokens=3
    )
    perf = measure_performance(
        engine, Evaluation(concurrency=[1, 2]), prompt_len=6, gen_len=3, min_requests=2
    )
    verdict = decide(Gates(max_ppl_increase_pct=0.0), acc, perf)
    return build_document(
        engine={"engine_dir": str(path), "backend": "hf-test", "device": "cpu", "size_bytes": 123},
        baseline={"engine_dir": str(path)},
        heldout={"num_sequences": 2, "num_tokens": 115},
        accuracy=acc,
        perf=perf,
        timings_s={"total": 1.0},
        verdict=verdict.to_dict(),
    )


def test_document_validates_against_schema(document: dict) -> None:
    import json

    validate_document(json.loads(json.dumps(document)))  # what is written to disk, not the Python objects
    m = document["metrics"]
    assert {
        "perplexity",
        "kl_divergence",
        "top1_agreement",
        "tokens_per_s",
        "ttft_p90_ms",
        "itl_p99_ms_c2",
        "requests_per_s_c1",
        "size_bytes",
        "peak_memory_bytes",
    } <= set(m)
    assert m["size_bytes"] == 123 and document["gates"]["passed"] is False


@pytest.mark.parametrize(
    "path,value",
    [
        (("accuracy", "top1_agreement"), 1.5),
        (("accuracy", "kl_divergence"), -0.1),
        (("performance", "points", 0, "ttft_ms"), {"p50": 1.0}),
        (("metrics", "Bad-Name"), 1.0),
        (("schema",), "kiln.validation-result/0"),
        (("surprise",), 1),
    ],
)
def test_schema_rejects_broken_documents(document: dict, path: tuple, value: object) -> None:
    broken = copy.deepcopy(document)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate_document(broken)


def test_nan_becomes_null_not_invalid_json(tiny, heldout) -> None:
    model, path = tiny
    engine = HFEngine(model, path)
    acc = evaluate_accuracy(engine, engine, heldout, window=32, prompts=[], max_new_tokens=1)
    doc = build_document(
        engine={"engine_dir": "e"},
        baseline={"engine_dir": "e"},
        heldout={"num_sequences": 2, "num_tokens": 115},
        accuracy=acc,
        perf=None,
        timings_s={},
    )
    assert doc["accuracy"]["greedy_exact_match"] is None and "greedy_exact_match" not in doc["metrics"]
    validate_document(doc)
    assert flat_metrics(None, None, 5) == {"size_bytes": 5.0}


# --- real model: SmolLM2-135M ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path):
    from transformers import AutoTokenizer

    from kiln.calibration import heldout_set

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    held = heldout_set(Evaluation(heldout_tokens=512), tok, window_len=256)
    return load_hf(smollm2_dir), smollm2_dir, held


@pytest.mark.slow  # ~30 s alone on 2 cores, minutes when the machine is shared
def test_smollm2_int4_vs_baseline(smollm2) -> None:
    """Real weights, real text: int4 round-to-nearest is measurably worse and fails a tight accuracy gate."""
    model, path, held = smollm2
    base = HFEngine(model, path)
    prompts = prompts_from(held.token_ids, 2, 16)
    same = evaluate_accuracy(
        base,
        HFEngine(copy.deepcopy(model), path),
        held.token_ids,
        window=256,
        prompts=prompts,
        max_new_tokens=8,
    )
    assert same.top1_agreement == 1.0 and same.greedy_exact_match == 1.0
    # a trained model on English prose, not a random one (~vocab size)
    assert 5 < same.baseline_perplexity < 100
    q = evaluate_accuracy(
        HFEngine(int4_rtn(model), path), base, held.token_ids, window=256, prompts=prompts, max_new_tokens=8
    )
    assert q.baseline_perplexity == pytest.approx(same.baseline_perplexity, rel=1e-6)
    assert q.ppl_increase_pct > 1.0 and q.kl_divergence > 0.01 and q.top1_agreement < 0.99
    verdict = decide(Gates(max_ppl_increase_pct=1.0), q)
    assert not verdict.passed
    assert verdict.messages == [
        f"max_ppl_increase_pct: ppl_increase_pct {q.ppl_increase_pct:.4g} % > 1 % "
        f"(over by {q.ppl_increase_pct - 1.0:.3g} %)"
    ]


def test_engine_protocol_is_satisfied(tiny) -> None:
    model, path = tiny
    assert isinstance(HFEngine(model, path), Engine)


def test_sweep_settings_cheaper_on_cpu() -> None:
    from kiln.validation.perf import sweep_settings

    evaluation = Evaluation(max_new_tokens=32)
    assert sweep_settings(evaluation, "cuda") == (8, 32)
    assert sweep_settings(evaluation, "cuda:1") == (8, 32)
    assert sweep_settings(evaluation, "cpu") == (4, 16)
    assert sweep_settings(Evaluation(max_new_tokens=8), "cpu") == (4, 8)
    assert sweep_settings(Evaluation(perf_requests=12, perf_max_new_tokens=24), "cpu") == (12, 24)
