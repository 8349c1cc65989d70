"""Calibration and held-out token sets: versioned inputs, disjoint by construction and checked.

A corpus is a list of documents: fortune cookies, paragraphs of a text file, JSONL rows, dataset rows. Each
document belongs to the calibration part or the held-out part by the hash of its normalised text, the same
for every seed, recipe and corpus name, so held-out perplexity is measured on text the quantizer never saw.
``heldout_set`` still checks every held-out window against the exact calibration samples (shared token
n-grams) instead of assuming it. Each ``TokenSet`` carries the sha256 of its exact token ids.

Dataset references: ``builtin:fortunes`` (Debian ``fortunes``), ``builtin:jargon`` (Debian ``jargon-text``),
``file:PATH`` (``.txt``: blank-line separated paragraphs; ``.jsonl``: a ``text`` field per line) and
``hf:REPO@REVISION[:SPLIT[:COLUMN]]`` (a dataset repo already in the local hub cache, read with ``datasets``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from kiln import constants
from kiln.assets import fortunes_files
from kiln.errors import CalibrationDataError
from kiln.profiles import Calibration, Evaluation

HELDOUT_ONE_IN = 5
"""One document in five (by text hash) is held out for evaluation; the rest may calibrate."""

SHINGLE_WORDS = 6
"""Documents sharing this many words in a row are near-duplicates and land on the same side of the split."""

OVERLAP_NGRAM = 24
"""Tokens a held-out window may share in a row with a calibration sample before it counts as overlap."""

JARGON_TEXT = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
DOCUMENT_SEPARATOR = "\n\n"
_TOKENIZE_BATCH = 64


@dataclass(frozen=True)
class TokenSet:
    """Token windows plus the sha256 of their exact ids (what lineage files and cache keys record)."""

    token_ids: list[list[int]]
    sha256: str
    source: str

    @property
    def num_tokens(self) -> int:
        return sum(len(window) for window in self.token_ids)


def token_sha256(token_ids: Sequence[Sequence[int]]) -> str:
    """sha256 of the token ids as compact JSON (``[[1,2],[3]]``): easy to reproduce outside kiln."""
    return hashlib.sha256(
        json.dumps([list(w) for w in token_ids], separators=(",", ":")).encode()
    ).hexdigest()


@dataclass(frozen=True)
class Corpus:
    """Deduplicated documents of one dataset reference, each assigned to calibration or held-out."""

    name: str
    documents: tuple[str, ...]

    @cached_property
    def _keys(self) -> list[str]:
        """Split key per document: shared by every document of a near-duplicate cluster."""
        cluster = _near_duplicate_clusters(self.documents)
        own = [_document_key(doc) for doc in self.documents]
        cluster_key: dict[int, str] = {}
        for index, root in enumerate(cluster):
            cluster_key[root] = min(cluster_key.get(root, own[index]), own[index])
        return [cluster_key[root] for root in cluster]

    @cached_property
    def calibration_part(self) -> list[str]:
        return [doc for doc, key in zip(self.documents, self._keys, strict=True) if not _is_heldout(key)]

    @cached_property
    def heldout_part(self) -> list[str]:
        """Held-out documents ordered by their hash, which mixes the corpus' files and sections."""
        pairs = sorted(
            (key, doc) for doc, key in zip(self.documents, self._keys, strict=True) if _is_heldout(key)
        )
        return [doc for _, doc in pairs]

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256("\0".join(self.documents).encode()).hexdigest()


def _near_duplicate_clusters(documents: Sequence[str]) -> list[int]:
    """Cluster root per document; documents sharing a run of ``SHINGLE_WORDS`` words are one cluster.

    Real corpora repeat text with small changes (a quote under two attributions, a joke template); splitting
    such copies by their own hash would put the same sentences on both sides.
    """
    parent = list(range(len(documents)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    first_seen: dict[str, int] = {}
    for index, doc in enumerate(documents):
        words = re.findall(r"\w+", doc.lower())
        for start in range(max(1, len(words) - SHINGLE_WORDS + 1)):
            owner = first_seen.setdefault(" ".join(words[start : start + SHINGLE_WORDS]), index)
            if owner != index:
                parent[root(index)] = root(owner)
    return [root(index) for index in range(len(documents))]


def _document_key(text: str) -> str:
    # Case and whitespace differences must not send copies of one text to both sides.
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()


def _is_heldout(key: str) -> bool:
    return int(key[:8], 16) % HELDOUT_ONE_IN == 0


# --- corpora ----------------------------------------------------------------------------------------------


def load_corpus(reference: str, field: str = "calibration.dataset") -> Corpus:
    """Read a dataset reference into documents; ``field`` names the profile field in errors."""
    scheme, _, rest = reference.partition(":")
    if scheme == "builtin":
        documents = _builtin_documents(rest, field)
        name = reference
    elif scheme == "file":
        documents = _file_documents(Path(rest).expanduser(), field)
        name = reference
    elif scheme == "hf":
        name, documents = _hf_documents(rest, field)
    else:
        raise CalibrationDataError(
            f"{field}: {reference!r} is not a dataset reference; use builtin:fortunes, builtin:jargon, "
            "file:PATH (.txt or .jsonl) or hf:REPO@REVISION[:SPLIT[:COLUMN]]"
        )
    unique = list(dict.fromkeys(doc for doc in (d.strip() for d in documents) if doc))
    if not unique:
        raise CalibrationDataError(f"{field}: {reference!r} holds no text")
    return Corpus(name=name, documents=tuple(unique))


def _builtin_documents(name: str, field: str) -> list[str]:
    if name == "fortunes":
        documents = []
        for path in fortunes_files():
            text = path.read_text(encoding="utf-8", errors="replace")
            documents += re.split(r"(?m)^%\s*$", text)  # strfile format: cookies between lines of a lone '%'
        return documents
    if name == "jargon":
        if not JARGON_TEXT.is_file():
            raise CalibrationDataError(f"{field}: {JARGON_TEXT} is missing: `apt-get install -y jargon-text`")
        with gzip.open(JARGON_TEXT, "rt", encoding="utf-8", errors="replace") as handle:
            return _paragraphs(handle.read())
    raise CalibrationDataError(f"{field}: unknown built-in corpus {name!r}; built-ins: fortunes, jargon")


def _paragraphs(text: str) -> list[str]:
    return re.split(r"\n\s*\n", text)


def _file_documents(path: Path, field: str) -> list[str]:
    if not path.is_file():
        raise CalibrationDataError(
            f"{field}: file {path.resolve()} does not exist; point file: at a .txt or .jsonl file"
        )
    if path.suffix not in (".txt", ".jsonl"):
        raise CalibrationDataError(
            f"{field}: file:{path} must be .txt (paragraphs) or .jsonl (a 'text' field per line)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationDataError(f"{field}: cannot read {path} as UTF-8 text: {exc}") from None
    if not text.strip():
        raise CalibrationDataError(f"{field}: file:{path} is empty")
    if path.suffix == ".txt":
        return _paragraphs(text)
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise CalibrationDataError(f"{field}: {path}:{number}: not valid JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise CalibrationDataError(f"{field}: {path}:{number}: each line needs a string field 'text'")
        documents.append(row["text"])
    return documents


def _hf_documents(spec: str, field: str) -> tuple[str, list[str]]:
    """Rows of a dataset repo pinned to a revision, read offline from the hub cache with ``datasets``."""
    match = re.fullmatch(
        r"(?P<repo>[^@:]+)@(?P<revision>[^:]+)(?::(?P<split>[^:]+))?(?::(?P<column>[^:]+))?", spec
    )
    if not match:
        raise CalibrationDataError(
            f"{field}: 'hf:{spec}' must be hf:REPO@REVISION[:SPLIT[:COLUMN]] with a pinned "
            "revision, e.g. hf:org/corpus@<commit sha>:train:text"
        )
    repo, revision = match["repo"], match["revision"]
    split, column = match["split"] or "train", match["column"] or "text"
    try:
        import datasets
    except ImportError:
        raise CalibrationDataError(
            f"{field}: hf: datasets need the `datasets` package: pip install 'kiln-llm[datasets]'"
        ) from None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_dir = constants.hf_cache_dir()
    try:
        path = Path(
            snapshot_download(
                repo, repo_type="dataset", revision=revision, cache_dir=cache_dir, local_files_only=True
            )
        )
    except LocalEntryNotFoundError:
        raise CalibrationDataError(
            f"{field}: dataset {repo}@{revision} is not in the offline cache {cache_dir}; kiln never fetches "
            f"datasets at build time: download it once (`hf download {repo} --repo-type dataset --revision "
            f"{revision} --cache-dir {cache_dir}`)"
        ) from None
    try:
        table = datasets.load_dataset(
            str(path), split=split, cache_dir=str(constants.cache_dir() / "datasets")
        )
    except ValueError as exc:  # unknown split, no data files
        raise CalibrationDataError(f"{field}: dataset {repo}@{path.name}: {exc}") from None
    if column not in table.column_names:
        raise CalibrationDataError(
            f"{field}: dataset {repo}@{path.name} split {split!r} has no column {column!r}; "
            f"columns: {', '.join(table.column_names)}"
        )
    rows = [value for value in table[column] if isinstance(value, str)]
    return f"hf:{repo}@{path.name}:{split}:{column}", rows


# --- token sets -------------------------------------------------------------------------------------------


def _token_stream(documents: Sequence[str], tokenizer: Any, needed: int) -> Iterator[int]:
    """Token ids of the documents in order, ``DOCUMENT_SEPARATOR`` between them; tokenizes only what is
    used."""
    produced = 0
    for start in range(0, len(documents), _TOKENIZE_BATCH):
        batch = [doc + DOCUMENT_SEPARATOR for doc in documents[start : start + _TOKENIZE_BATCH]]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            yield from ids
            produced += len(ids)
        if produced >= needed:
            return


def calibration_set(cal: Calibration, tokenizer: Any) -> TokenSet:
    """``num_samples`` windows of ``seq_len`` tokens from the calibration part, chosen by ``seed``."""
    corpus = load_corpus(cal.dataset, "calibration.dataset")
    documents = list(corpus.calibration_part)
    random.Random(cal.seed).shuffle(documents)
    needed = cal.num_samples * cal.seq_len
    stream = list(_token_stream(documents, tokenizer, needed))
    if len(stream) < needed:
        raise CalibrationDataError(
            f"calibration.num_samples: {cal.dataset} yields only {len(stream) // cal.seq_len} windows of "
            f"seq_len={cal.seq_len} ({len(stream)} tokens in its calibration part, {len(documents)} "
            f"documents), {cal.num_samples} asked; lower num_samples or seq_len, or use a larger dataset"
        )
    windows = [stream[i * cal.seq_len : (i + 1) * cal.seq_len] for i in range(cal.num_samples)]
    source = (
        f"{corpus.name}#calibration seed={cal.seed} samples={cal.num_samples}x{cal.seq_len} "
        f"corpus={corpus.fingerprint[:16]}"
    )
    return TokenSet(token_ids=windows, sha256=token_sha256(windows), source=source)


def heldout_set(
    evaluation: Evaluation, tokenizer: Any, exclude: TokenSet | None = None, *, window_len: int = 512
) -> TokenSet:
    """``heldout_tokens`` tokens of the held-out part, in windows of ``window_len``; checked against
    ``exclude``."""
    corpus = load_corpus(evaluation.heldout, "evaluation.heldout")
    needed = evaluation.heldout_tokens
    stream = list(_token_stream(corpus.heldout_part, tokenizer, needed))[:needed]
    if len(stream) < needed:
        raise CalibrationDataError(
            f"evaluation.heldout_tokens: the held-out part of {evaluation.heldout} has only {len(stream)} "
            f"tokens ({len(corpus.heldout_part)} documents), {needed} asked; lower heldout_tokens or use a "
            "larger dataset"
        )
    windows = [stream[i : i + window_len] for i in range(0, needed, window_len)]
    heldout = TokenSet(
        token_ids=windows,
        sha256=token_sha256(windows),
        source=f"{corpus.name}#heldout tokens={needed} corpus={corpus.fingerprint[:16]}",
    )
    if exclude is not None:
        check_disjoint(heldout, exclude, tokenizer=tokenizer)
    return heldout


def check_disjoint(
    heldout: TokenSet, calibration: TokenSet, *, ngram: int = OVERLAP_NGRAM, tokenizer: Any = None
) -> None:
    """Raise CalibrationDataError if a held-out window shares ``ngram`` tokens in a row with a calibration
    sample."""
    seen: dict[tuple[int, ...], int] = {}
    for index, sample in enumerate(calibration.token_ids):
        for start in range(len(sample) - ngram + 1):
            seen.setdefault(tuple(sample[start : start + ngram]), index)
    for window_index, window in enumerate(heldout.token_ids):
        for start in range(len(window) - ngram + 1):
            gram = tuple(window[start : start + ngram])
            if gram in seen:
                text = tokenizer.decode(list(gram)) if tokenizer is not None else str(list(gram))
                raise CalibrationDataError(
                    f"held-out window {window_index} ({heldout.source}) repeats {ngram} tokens of "
                    f"calibration sample {seen[gram]} ({calibration.source}): {text!r}; accuracy on it would "
                    "be inflated. Use disjoint files for evaluation.heldout and calibration.dataset, or the "
                    "same corpus for both (kiln splits a corpus into disjoint calibration and held-out "
                    "documents)"
                )
