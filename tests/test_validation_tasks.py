"""lm-eval-harness task evals on kiln engines (``evaluation.tasks``), with the real lm-eval.

A tiny random Llama with a small byte-level BPE tokenizer (trained here on fortunes text) is compiled by
the torch backend; the local multiple-choice task in ``tests/fixtures/lm_eval`` runs on it through the
adapter, and its accuracy must equal the one computed independently from ``engine.logits``. Missing
lm-eval and missing task data are real conditions (a subprocess with lm_eval hidden, HF offline mode, a
data file that is not there), recorded as ``skipped`` with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.errors import ProfileError, UnsupportedCombinationError
from kiln.profiles import Evaluation, Target, load_request
from kiln.validation.lm_eval_tasks import lm_eval_available
from tests.fixtures.models import make_tiny_llama

needs_lm_eval = pytest.mark.skipif(
    not lm_eval_available(), reason="lm-eval is not installed: pip install 'kiln-llm[eval]'"
)

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"
TASK_YAML = FIXTURES / "facts_mc.yaml"
MISSING_DATA_YAML = FIXTURES / "missing_data.yaml"
MAX_SEQ_LEN = 48
TARGET = Target(
    name="cpu-tasks",
    dtype="float32",
    limits={"max_batch_size": 4, "max_input_len": 32, "max_seq_len": MAX_SEQ_LEN},
)
EOS = "<|endoftext|>"


def make_tiny_tokenizer(out_dir: Path, vocab_size: int = 320) -> None:
    """A byte-level BPE tokenizer trained on fortunes text (falls back to the fixture questions)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fortunes = Path("/usr/share/games/fortunes/fortunes")
    lines = fortunes.read_text(errors="ignore").splitlines()[:2000] if fortunes.is_file() else []
    lines += [json.loads(line)["question"] for line in (FIXTURES / "facts_mc.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS).save_pretrained(out_dir)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kiln.engine.base import get_backend
    from tests.fixtures.engine import export_checkpoint

    root = tmp_path_factory.mktemp("tasks-engine")
    hf = make_tiny_llama(root / "hf", vocab=320)
    make_tiny_tokenizer(hf)
    ckpt, _ = export_checkpoint(hf, root / "ckpt", "none")
    return get_backend("torch").compile(
        ckpt, TARGET, root / "engine", {"model_sha": "abc", "recipe": "none", "tokenizer_dir": str(hf)}
    )


def expected_accuracy(engine, tokenizer, docs: list[dict]) -> tuple[float, int]:
    """Multiple-choice accuracy from engine.logits alone: argmax over sum log p(" choice" | question).

    Contexts that do not fit are cut from the left to the last ``MAX_SEQ_LEN`` tokens (+1 predicted).
    Returns (accuracy, number of truncated inputs).
    """
    import torch

    correct, truncated = 0, 0
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            context = tokenizer.encode(doc["question"], add_special_tokens=False)
            whole = tokenizer.encode(doc["question"] + " " + choice, add_special_tokens=False)
            continuation = whole[len(context) :]
            truncated += len(whole) > MAX_SEQ_LEN + 1
            window = whole[-(MAX_SEQ_LEN + 1) :][:-1]
            logprobs = torch.log_softmax(engine.logits(window), dim=-1)[-len(continuation) :]
            scores.append(float(logprobs.gather(1, torch.tensor(continuation)[:, None]).sum()))
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return correct / len(docs), truncated


@needs_lm_eval
def test_task_accuracy_matches_engine_logits(engine_dir: Path) -> None:
    from kiln.engine.base import get_backend
    from kiln.hub import load_tokenizer
    from kiln.validation.lm_eval_tasks import run_tasks

    docs = [json.loads(line) for line in (FIXTURES / "facts_mc.jsonl").read_text().splitlines()]
    engine = get_backend("torch").load(engine_dir)
    try:
        evals = run_tasks(
            engine,
            engine_dir,
            Evaluation(tasks=[str(TASK_YAML)]),
            max_seq_len=MAX_SEQ_LEN,
            max_input_len=32,
            batch_size=4,
        )
        want, truncated = expected_accuracy(engine, load_tokenizer(engine_dir), docs)
        limited = run_tasks(
            engine,
            engine_dir,
            Evaluation(tasks=[str(TASK_YAML)], task_limit=3),
            max_seq_len=MAX_SEQ_LEN,
            max_input_len=32,
        )
        want_limited, _ = expected_accuracy(engine, load_tokenizer(engine_dir), docs[:3])
    finally:
        engine.close()
    result = evals["facts_mc"]
    assert result.status == "ran", result.reason
    assert 0.0 <= result.metrics["acc"] <= 1.0
    assert result.metrics["acc"] == pytest.approx(want)
    assert result.samples == len(docs) and result.reason is None
    assert truncated > 0 and result.truncated_inputs == truncated  # the long fortune was cut from the left
    assert limited["facts_mc"].samples == 3 and limited["facts_mc"].metrics["acc"] == pytest.approx(
        want_limited
    )


@needs_lm_eval
def test_measure_engine_records_tasks(engine_dir: Path, tmp_path: Path) -> None:
    from kiln.calibration import TokenSet, token_sha256
    from kiln.validation.measure import RESULT_FILE, measure_engine
    from kiln.validation.results import validate_document

    ids = [[(7 * i) % 300 for i in range(60)]]
    evaluation = Evaluation(
        heldout_tokens=64,
        prompts=2,
        max_new_tokens=4,
        prompt_len=8,
        concurrency=[1],
        tasks=[str(TASK_YAML), str(MISSING_DATA_YAML)],
    )
    metrics, docs = measure_engine(
        engine_dir, engine_dir, TokenSet(ids, token_sha256(ids), "test"), evaluation, output_dir=tmp_path
    )
    document = json.loads((tmp_path / RESULT_FILE).read_text())
    validate_document(document)
    tasks = document["accuracy"]["task_evals"]
    assert tasks["facts_mc"]["status"] == "ran"
    assert metrics["task_facts_mc_acc"] == tasks["facts_mc"]["metrics"]["acc"]
    assert document["metrics"]["task_facts_mc_acc"] == metrics["task_facts_mc_acc"]
    missing = tasks["missing_data"]
    assert missing["status"] == "skipped" and missing["metrics"] == {}
    assert "task data is not available" in missing["reason"] and "no_such_file.jsonl" in missing["reason"]
    assert not any(k.startswith("task_missing_data") for k in metrics)
    assert document["timings_s"]["tasks"] >= 0


def _run_hidden(code: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tasks_skipped_without_lm_eval(engine_dir: Path) -> None:
    # A real interpreter where `import lm_eval` fails, validating a real engine end to end.
    code = f"""
import json, sys
sys.modules["lm_eval"] = None
from kiln.calibration import TokenSet
from kiln.profiles import Evaluation
from kiln.validation.measure import measure_engine
ids = [[(7 * i) % 300 for i in range(60)]]
ev = Evaluation(heldout_tokens=64, prompts=1, max_new_tokens=2, prompt_len=8, concurrency=[1],
                tasks=["hellaswag", {str(TASK_YAML)!r}])
metrics, docs = measure_engine({str(engine_dir)!r}, {str(engine_dir)!r}, TokenSet(ids, None, "t"), ev)
print(json.dumps({{"tasks": docs["validation.json"]["accuracy"]["task_evals"], "metrics": sorted(metrics)}}))
"""
    out = _run_hidden(code)
    from kiln.validation.lm_eval_tasks import LM_EVAL_MISSING

    assert set(out["tasks"]) == {"hellaswag", "facts_mc"}
    for entry in out["tasks"].values():
        assert entry["status"] == "skipped" and entry["reason"] == LM_EVAL_MISSING and entry["metrics"] == {}
    assert not any(name.startswith("task_") for name in out["metrics"])
    assert "perplexity" in out["metrics"]


@needs_lm_eval
def test_builtin_task_skipped_when_data_not_cached(engine_dir: Path, tmp_path: Path) -> None:
    # HF offline mode and an empty datasets cache: arc_easy is a known task whose data is not here.
    code = f"""
import json
from kiln.engine.base import get_backend
from kiln.profiles import Evaluation
from kiln.validation.lm_eval_tasks import run_tasks
engine = get_backend("torch").load({str(engine_dir)!r})
evals = run_tasks(engine, {str(engine_dir)!r}, Evaluation(tasks=["arc_easy"]), max_seq_len=48, max_input_len=32)
print(json.dumps({{k: v.to_dict() for k, v in evals.items()}}))
"""  # noqa: E501 (the script run in a subprocess, kept as it is)
    out = _run_hidden(
        code,
        {
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
            "HF_HOME": str(tmp_path / "hf"),
        },
    )
    entry = out["arc_easy"]
    assert entry["status"] == "skipped" and entry["metrics"] == {}
    assert "not available offline" in entry["reason"] and "ai2_arc" in entry["reason"]


def test_profile_rejects_missing_task_yaml(tmp_path: Path) -> None:
    base = {
        "name": "t",
        "model": {"local_dir": str(tmp_path)},
        "recipes": [{"name": "none"}],
        "targets": [{"name": "cpu"}],
        "registry": {"model_name": "m"},
    }
    profile = tmp_path / "p.yaml"
    profile.write_text(json.dumps({**base, "evaluation": {"tasks": ["tasks/mine.yaml"], "task_limit": 5}}))
    with pytest.raises(
        ProfileError, match=r"evaluation\.tasks: .*\[0\]: task YAML .*tasks/mine\.yaml' does not exist"
    ):
        load_request(profile)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.yaml").write_text(TASK_YAML.read_text())
    request = load_request(profile)  # relative to the profile file, not the current directory
    assert request.evaluation.tasks == [str(tmp_path / "tasks" / "mine.yaml")]
    assert request.evaluation.task_limit == 5
    with pytest.raises(ProfileError, match=r"evaluation\.task_limit"):
        load_request({**base, "evaluation": {"tasks": ["hellaswag"], "task_limit": 0}})


@needs_lm_eval
def test_preflight_rejects_unknown_task_name() -> None:
    from kiln.preflight import check_request, check_request_static

    request = load_request(
        {
            "name": "t",
            "model": {"repo_id": "org/model"},
            "recipes": [{"name": "none"}],
            "targets": [{"name": "cpu"}],
            "registry": {"model_name": "m"},
            "evaluation": {"tasks": ["hellaswag", "hellaswg", str(TASK_YAML)]},
        }
    )
    with pytest.raises(ProfileError) as info:  # the profile-only check every build path runs first
        check_request_static(request, "p.yaml")
    message = str(info.value)
    assert message.startswith("p.yaml: evaluation.tasks[1]: unknown lm-eval task 'hellaswg'")
    assert "did you mean hellaswag" in message and "tasks[0]" not in message and "tasks[2]" not in message
    with pytest.raises(UnsupportedCombinationError, match=r"\[tasks\] evaluation.tasks\[1\]: unknown"):
        check_request(request, "p.yaml", local_targets=False)


def test_report_lists_task_scores_and_skips() -> None:
    from kiln.validation.lm_eval_tasks import LM_EVAL_MISSING, TaskEval, task_metrics, task_notes
    from kiln.validation.report import BuildResults, ReportRow, markdown

    evals = {
        "facts_mc": TaskEval("ran", "facts_mc.yaml", metrics={"acc": 0.5, "acc_norm": 0.25}),
        "hellaswag": TaskEval("skipped", "hellaswag", LM_EVAL_MISSING),
    }
    metrics = {"perplexity": 3.0, **task_metrics(evals)}
    assert metrics == {"perplexity": 3.0, "task_facts_mc_acc": 0.5, "task_facts_mc_acc_norm": 0.25}
    row = ReportRow(
        recipe="none", target="cpu", verdict="pass", metrics=metrics, task_notes=task_notes(evals)
    )
    text = markdown(BuildResults(build="b", rows=[row]))
    assert "## Task evals (lm-eval)" in text
    assert "facts_mc_acc 0.5" in text and f"hellaswag: skipped: {LM_EVAL_MISSING}" in text
    assert "Task evals" not in markdown(
        BuildResults(build="b", rows=[ReportRow(recipe="none", target="cpu")])
    )


def test_min_task_score_gate() -> None:
    from kiln.profiles import Gates
    from kiln.validation.gates import decide

    gates = Gates(min_task_score={"facts_mc/acc": 0.5, "hellaswag/acc_norm": 0.3})
    verdict = decide(gates, {"task_facts_mc_acc": 0.4, "perplexity": 3.0})
    assert not verdict.passed and verdict.checked == {
        "task_facts_mc_acc": 0.5,
        "task_hellaswag_acc_norm": 0.3,
    }
    messages = verdict.messages
    assert messages[0].startswith("min_task_score: task_facts_mc_acc 0.4 < 0.5 (short by 0.1")
    # skipped task
    assert messages[1] == "min_task_score: task_hellaswag_acc_norm was not measured (threshold 0.3)"
    assert decide(gates, {"task_facts_mc_acc": 0.5, "task_hellaswag_acc_norm": 0.31}).passed
    with pytest.raises(ProfileError, match=r"gates\.min_task_score: .*TASK/METRIC"):
        load_request(
            {
                "name": "t",
                "model": {"repo_id": "org/model"},
                "recipes": [{"name": "none"}],
                "targets": [{"name": "cpu"}],
                "registry": {"model_name": "m"},
                "gates": {"min_task_score": {"hellaswag": 0.3}},
            }
        )


@needs_lm_eval
def test_cache_inputs_cover_task_files(tmp_path: Path) -> None:
    import shutil

    from kiln.validation.lm_eval_tasks import cache_inputs

    assert cache_inputs(Evaluation()) == {}
    for name in ("facts_mc.yaml", "facts_mc.jsonl"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    evaluation = Evaluation(tasks=[str(tmp_path / "facts_mc.yaml"), "hellaswag"])
    before = cache_inputs(evaluation)
    assert before["lm_eval"] is not None
    assert set(before["files"]) == {str(tmp_path / "facts_mc.yaml"), str(tmp_path / "facts_mc.jsonl")}
    with (tmp_path / "facts_mc.jsonl").open("a") as handle:  # new data: a new cache key
        handle.write('{"question": "Ice is", "choices": ["cold", "hot"], "answer": 0}\n')
    assert cache_inputs(evaluation) != before
