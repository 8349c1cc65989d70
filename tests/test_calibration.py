"""kiln.calibration on real text (Debian fortunes, files, a dataset repo in the hub cache) and SmolLM2's
tokenizer."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from kiln import constants
from kiln.calibration import (
    JARGON_TEXT,
    TokenSet,
    calibration_set,
    check_disjoint,
    heldout_set,
    load_corpus,
)
from kiln.errors import CalibrationDataError
from kiln.hub import load_tokenizer
from kiln.profiles import Calibration, Evaluation
from tests.fixtures.hub import LocalHub


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def fortunes_documents() -> list[str]:
    return list(load_corpus("builtin:fortunes").documents)


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def test_calibration_is_deterministic_by_seed_and_hashes_the_exact_ids(tokenizer):
    cal = Calibration(dataset="builtin:fortunes", num_samples=8, seq_len=64, seed=3)
    first, second = calibration_set(cal, tokenizer), calibration_set(cal, tokenizer)

    assert first == second
    assert [len(w) for w in first.token_ids] == [64] * 8
    expected = hashlib.sha256(json.dumps(first.token_ids, separators=(",", ":")).encode()).hexdigest()
    assert first.sha256 == expected
    assert "builtin:fortunes" in first.source and "seed=3" in first.source


def test_seed_changes_the_samples_and_the_sha(tokenizer):
    base = Calibration(num_samples=8, seq_len=64, seed=0)
    zero = calibration_set(base, tokenizer)
    one = calibration_set(base.model_copy(update={"seed": 1}), tokenizer)

    assert zero.sha256 != one.sha256
    assert zero.token_ids != one.token_ids


def test_corpus_split_keeps_near_duplicates_on_one_side(tmp_path):
    quote = "The only thing we have to fear is fear itself, and perhaps the dark and the dentist"
    texts = [f"{quote}.\n\t\t-- variant {i}" for i in range(40)]
    texts += [
        f"Unrelated paragraph number {i} about {w} and other things"
        for i, w in enumerate(["boats", "trains", "cats", "rain", "bread"] * 20)
    ]
    corpus = load_corpus(f"file:{_write_jsonl(tmp_path / 'c.jsonl', texts)}")

    calibration, heldout = set(corpus.calibration_part), set(corpus.heldout_part)
    assert calibration and heldout and not calibration & heldout
    assert calibration | heldout == set(corpus.documents)
    variants = {t for t in corpus.documents if t.startswith(quote)}
    assert variants <= calibration or variants <= heldout


def test_default_heldout_is_seed_independent_and_passes_the_overlap_check(tokenizer):
    evaluation = Evaluation()
    heldout_a = heldout_set(evaluation, tokenizer, exclude=calibration_set(Calibration(seed=0), tokenizer))
    heldout_b = heldout_set(evaluation, tokenizer, exclude=calibration_set(Calibration(seed=1), tokenizer))

    assert heldout_a == heldout_b
    assert heldout_a.num_tokens == evaluation.heldout_tokens
    assert all(len(w) <= 512 for w in heldout_a.token_ids)


def test_overlap_check_catches_calibration_text_in_heldout(tokenizer, fortunes_documents, tmp_path):
    calibration = calibration_set(Calibration(num_samples=4, seq_len=128, seed=0), tokenizer)
    leaked = tokenizer.decode(calibration.token_ids[2])
    # Documents sharing the leaked sample form one cluster: pick a heading that the split holds out.
    held_file = tmp_path / "held.jsonl"
    for attempt in range(200):
        _write_jsonl(held_file, [f"Note {attempt}.{i}: {leaked}" for i in range(3)])
        if load_corpus(f"file:{held_file}").heldout_part:
            break
    evaluation = Evaluation(heldout=f"file:{held_file}", heldout_tokens=256)

    assert heldout_set(evaluation, tokenizer).num_tokens == 256  # fine on its own
    with pytest.raises(CalibrationDataError, match=r"repeats 24 tokens of calibration sample 2"):
        heldout_set(evaluation, tokenizer, exclude=calibration)


def test_check_disjoint_compares_token_runs():
    calibration = TokenSet([[1, 2, 3, 4, 5, 6]], "x", "cal")
    check_disjoint(TokenSet([[9, 2, 3, 9, 4, 5, 9, 6]], "y", "held"), calibration, ngram=3)
    with pytest.raises(CalibrationDataError, match="held-out window 1"):
        check_disjoint(TokenSet([[7, 7], [0, 4, 5, 6]], "y", "held"), calibration, ngram=3)


def test_file_sources_txt_and_jsonl(tokenizer, fortunes_documents, tmp_path):
    texts = fortunes_documents[:400]
    jsonl = _write_jsonl(tmp_path / "corpus.jsonl", texts)
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(" ".join(t.split()) for t in texts))
    cal = Calibration(num_samples=4, seq_len=64)

    from_jsonl = calibration_set(cal.model_copy(update={"dataset": f"file:{jsonl}"}), tokenizer)
    from_txt = calibration_set(cal.model_copy(update={"dataset": f"file:{txt}"}), tokenizer)

    assert from_jsonl.source.startswith(f"file:{jsonl}#calibration")
    assert len(from_jsonl.token_ids) == len(from_txt.token_ids) == 4
    decoded = tokenizer.decode(from_jsonl.token_ids[0])
    assert any(" ".join(t.split())[:40] in " ".join(decoded.split()) for t in texts)


def test_bad_inputs_fail_before_calibration(tokenizer, tmp_path):
    small = _write_jsonl(
        tmp_path / "small.jsonl", [f"Sentence {i} of a very short corpus." for i in range(30)]
    )
    with pytest.raises(CalibrationDataError, match=r"calibration.num_samples: .* yields only \d+ windows"):
        calibration_set(Calibration(dataset=f"file:{small}", num_samples=64, seq_len=256), tokenizer)
    with pytest.raises(CalibrationDataError, match=r"calibration.dataset: file .*missing.txt does not exist"):
        calibration_set(Calibration(dataset=f"file:{tmp_path / 'missing.txt'}"), tokenizer)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(CalibrationDataError, match="is empty"):
        calibration_set(Calibration(dataset=f"file:{tmp_path / 'empty.txt'}"), tokenizer)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(CalibrationDataError, match=r"bad.jsonl:2: each line needs a string field 'text'"):
        calibration_set(Calibration(dataset=f"file:{tmp_path / 'bad.jsonl'}"), tokenizer)
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(CalibrationDataError, match=r"must be .txt .* or .jsonl"):
        calibration_set(Calibration(dataset=f"file:{tmp_path / 'data.csv'}"), tokenizer)
    with pytest.raises(
        CalibrationDataError, match="unknown built-in corpus 'shakespeare'; built-ins: fortunes"
    ):
        calibration_set(Calibration(dataset="builtin:shakespeare"), tokenizer)
    with pytest.raises(CalibrationDataError, match="evaluation.heldout_tokens: the held-out part"):
        heldout_set(Evaluation(heldout=f"file:{small}", heldout_tokens=4096), tokenizer)
    with pytest.raises(CalibrationDataError, match="evaluation.heldout: 'wiki' is not a dataset reference"):
        heldout_set(Evaluation(heldout="wiki"), tokenizer)
    with pytest.raises(CalibrationDataError, match="pinned revision"):
        calibration_set(Calibration(dataset="hf:org/corpus"), tokenizer)


@pytest.mark.skipif(not JARGON_TEXT.is_file(), reason="Debian jargon-text not installed")
def test_builtin_jargon_is_a_second_domain(tokenizer):
    jargon = calibration_set(Calibration(dataset="builtin:jargon", num_samples=2, seq_len=64), tokenizer)
    fortunes = calibration_set(Calibration(num_samples=2, seq_len=64), tokenizer)
    assert jargon.sha256 != fortunes.sha256 and jargon.source.startswith("builtin:jargon#")


def test_hf_dataset_is_read_pinned_from_the_offline_cache(
    local_hub: LocalHub, tokenizer, fortunes_documents, monkeypatch, tmp_path
):
    from huggingface_hub import snapshot_download

    rows = "".join(json.dumps({"text": t, "label": 0}) + "\n" for t in fortunes_documents[:600])
    sha = local_hub.create_repo(
        "kiln-test/corpus",
        {"data/train.jsonl": rows.encode(), "README.md": b"# corpus\n"},
        repo_type="dataset",
    )
    reference = f"hf:kiln-test/corpus@{sha}:train:text"
    with pytest.raises(
        CalibrationDataError, match=r"not in the offline cache .*hf download kiln-test/corpus"
    ):
        calibration_set(Calibration(dataset=reference, num_samples=4, seq_len=64), tokenizer)

    snapshot_download(
        "kiln-test/corpus",
        repo_type="dataset",
        revision="main",
        cache_dir=constants.hf_cache_dir(),
        endpoint=local_hub.url,
    )  # what `hf download` does on a connected machine
    local_hub.requests.clear()
    first = calibration_set(Calibration(dataset=reference, num_samples=4, seq_len=64), tokenizer)
    by_branch = calibration_set(
        Calibration(dataset="hf:kiln-test/corpus@main", num_samples=4, seq_len=64), tokenizer
    )
    as_file = calibration_set(
        Calibration(
            dataset=f"file:{_write_jsonl(tmp_path / 'same.jsonl', fortunes_documents[:600])}",
            num_samples=4,
            seq_len=64,
        ),
        tokenizer,
    )

    assert local_hub.requests == []  # read from the cache only
    assert first.source.startswith(f"hf:kiln-test/corpus@{sha}:train:text#calibration")
    assert first.token_ids == by_branch.token_ids == as_file.token_ids
    with pytest.raises(CalibrationDataError, match="has no column 'body'; columns: text, label"):
        calibration_set(Calibration(dataset=f"hf:kiln-test/corpus@{sha}:train:body"), tokenizer)

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(CalibrationDataError, match=r"pip install 'kiln-llm\[datasets\]'"):
        calibration_set(Calibration(dataset=reference), tokenizer)
