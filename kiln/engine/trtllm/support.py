"""Where TensorRT-LLM runs each kiln recipe: per artifact (engine / hf_checkpoint) and per SM, read from the
contract.

The contract's ``support`` section (``kiln/contracts/tensorrt_llm-<series>.json``) holds one fact per
(artifact, QuantAlgo or kv_cache_quant_algo, SM class): ``supported`` true / false / null (null = UNVERIFIED)
with its reason and the sources it was read from. Pre-flight asks :func:`recipe_problem` for every
tensorrt_llm target (kiln's torch backend keeps its own rules in :mod:`kiln.recipes`), and
``docs/TRTLLM_SUPPORT.md`` is :func:`support_markdown`, so the document cannot drift from what pre-flight
does. kiln refuses a pair the contract does not confirm: a build that fails after calibration costs more than
a
refusal that names the missing fact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.engine.trtllm import api
from kiln.profiles import Recipe, Target
from kiln.recipes import KV_SCHEMES, SCHEMES, scheme

SM_COLUMNS = ("sm80", "sm89", "sm90", "sm100", "sm120")
"""The SM classes of the contract, in the order the document shows them."""
ARTIFACT_LABELS = {"engine": "engine (trtllm-build)", "hf_checkpoint": "HF checkpoint (PyTorch backend)"}
DOC_COLUMNS = (("engine", "1.2"), ("hf_checkpoint", "1.3"))
"""(artifact, contract series) per group of columns: the engine path is 1.2's, the HF checkpoint path >=
1.3's."""
DOC_PATH = Path(__file__).resolve().parents[3] / "docs" / "TRTLLM_SUPPORT.md"
NO_QUANT = "NO_QUANT"
QUANT, KV = "quant_algo", "kv_cache_quant_algo"


@dataclass(frozen=True)
class Verdict:
    """One contract fact: can ``algo`` run as ``artifact`` on an SM of ``sm_class``."""

    supported: bool | None
    reason: str | None
    evidence: tuple[str, ...]
    """Keys of the contract's ``support.sources``."""
    where: str
    """The fact's path in the contract, e.g. ``support.engine.quant_algo.FP8.sm80``."""
    sm_class: str | None = None

    @property
    def label(self) -> str:
        return {True: "yes", False: "no", None: "unverified"}[self.supported]


def _support(contract: api.Contract) -> dict[str, Any]:
    return contract.data.get("support") or {}


def sm_classes(contract: api.Contract) -> dict[str, list[int]]:
    """SM class -> the SMs it covers (e.g. ``sm100`` -> [100, 103])."""
    return {
        name: list(entry.get("sms") or [])
        for name, entry in (_support(contract).get("sm_classes") or {}).items()
    }


def sm_class(contract: api.Contract, sm: int) -> str | None:
    """The contract's SM class of ``sm`` (None: the contract records no fact for that SM)."""
    return next((name for name, sms in sm_classes(contract).items() if sm in sms), None)


def verdict(contract: api.Contract, artifact: str, kind: str, algo: str | None, sm: int) -> Verdict:
    """The fact for ``algo`` (a QuantAlgo, or a kv_cache_quant_algo when ``kind`` is ``kv_cache_quant_algo``)
    on ``sm``."""
    if kind == KV and algo is None:
        # an unquantized KV cache needs no fact
        return Verdict(True, None, (), f"support.{artifact}.{KV}", None)
    key = algo or NO_QUANT
    where = f"support.{artifact}.{kind}.{key}"
    cls = sm_class(contract, sm)
    if cls is None:
        known = ", ".join(f"sm{s}" for sms in sm_classes(contract).values() for s in sms) or "none"
        return Verdict(
            None,
            f"UNVERIFIED: {contract.source} records no fact for sm{sm} (SMs it knows: {known})",
            (),
            where,
            None,
        )
    table = ((_support(contract).get(artifact) or {}).get(kind) or {}).get(key)
    entry = (table or {}).get(cls)
    if entry is None:
        return Verdict(None, f"UNVERIFIED: {contract.source} has no {where}.{cls}", (), f"{where}.{cls}", cls)
    return Verdict(
        entry.get("supported"), entry.get("reason"), tuple(entry.get("evidence") or ()), f"{where}.{cls}", cls
    )


def supported_sms(contract: api.Contract, artifact: str, kind: str, algo: str | None) -> list[int]:
    """Every SM the contract knows on which ``algo`` runs as ``artifact``."""
    return sorted(
        sm
        for sms in sm_classes(contract).values()
        for sm in sms
        if verdict(contract, artifact, kind, algo, sm).supported is True
    )


def sm_range(contract: api.Contract, artifact: str, kind: str, algo: str | None) -> tuple[int, int] | None:
    """(min SM, max SM) of :func:`supported_sms` (None: no SM)."""
    sms = supported_sms(contract, artifact, kind, algo)
    return (sms[0], sms[-1]) if sms else None


def range_text(contract: api.Contract, sms: list[int]) -> str:
    """``>= 89`` / ``80-90`` / ``80, 86, 120``: the supported SMs in the fewest words that stay exact."""
    if not sms:
        return "(none)"
    known = sorted(s for group in sm_classes(contract).values() for s in group)
    lo, hi = sms[0], sms[-1]
    if [s for s in known if lo <= s <= hi] == sms:
        return f">= {lo}" if hi == known[-1] else f"{lo}-{hi}"
    return ", ".join(str(s) for s in sms)


def _subject(kind: str, recipe: Recipe) -> tuple[str, str | None]:
    if kind == QUANT:
        return recipe.quantization, scheme(recipe.quantization).quant_algo
    return f"kv_cache_dtype {recipe.kv_cache_dtype}", KV_SCHEMES[recipe.kv_cache_dtype][1]


def recipe_problem(recipe: Recipe, target: Target) -> str | None:
    """Why TensorRT-LLM cannot run ``recipe`` on ``target`` (its artifact, SM and contract series), or
    None."""
    sm = target.sm_number
    if sm is None:
        return None
    contract = api.load_contract(api.default_series(target))
    path = f"TensorRT-LLM {contract.series} {ARTIFACT_LABELS[target.artifact]}"
    for kind in (QUANT, KV):
        subject, algo = _subject(kind, recipe)
        fact = verdict(contract, target.artifact, kind, algo, sm)
        if fact.supported:
            continue
        sms = supported_sms(contract, target.artifact, kind, algo)
        name = f"({algo}) " if algo and kind == QUANT and recipe.quantization != "none" else ""
        where = f"[{contract.source}: {fact.where}]"
        if fact.supported is None:
            runs = f"; it runs on SM {range_text(contract, sms)}" if sms else ""
            return (
                f"{subject} {name}on {target.sm} is not confirmed for {path} ({fact.reason}){runs}; kiln "
                f"refuses what its contract does not confirm: target {target.name!r} is {target.sm} "
                f"({target.gpu or 'unknown GPU'}) {where}"
            )
        if not sms:
            return (
                f"{subject} {name}is not supported by {path} on any SM: {fact.reason}; target "
                f"{target.name!r} is {target.sm} ({target.gpu or 'unknown GPU'}) {where}"
            )
        return (
            f"{subject} needs SM {range_text(contract, sms)}; target {target.name!r} is {target.sm} "
            f"({target.gpu or 'unknown GPU'}): {path}: {fact.reason} {where}"
        )
    return None


def artifact_problem(
    contract: api.Contract,
    artifact: str,
    quant_algo: str | None,
    kv_cache_quant_algo: str | None,
    sm: int | None,
) -> str | None:
    """Why this series cannot run a checkpoint of ``quant_algo`` / ``kv_cache_quant_algo`` as ``artifact`` on
    ``sm`` (the same facts pre-flight reads, checked again where a checkpoint meets a worker: ``kiln
    compile``)."""
    if sm is None:
        return None
    for kind, algo in ((QUANT, quant_algo), (KV, kv_cache_quant_algo)):
        fact = verdict(contract, artifact, kind, algo, sm)
        if fact.supported is not True:
            label = "UNVERIFIED" if fact.supported is None else "not supported"
            return (
                f"{kind} {algo or NO_QUANT} on sm{sm} is {label} for TensorRT-LLM {contract.series} "
                f"{ARTIFACT_LABELS[artifact]}: {fact.reason} [{contract.source}: {fact.where}]"
            )
    return None


# --- the document -------------------------------------------------------------------------------------------

DOC_ROWS: tuple[tuple[str, str, str | None], ...] = tuple(
    [(name, QUANT, s.quant_algo) for name, s in SCHEMES.items()]
    + [(f"kv_cache_dtype {kv}", KV, algo) for kv, (_, algo, _) in KV_SCHEMES.items() if algo]
)
"""(row label, kind, algo): every kiln quantization (KV cache unquantized), then every quantized KV cache."""


def cell(series: str, artifact: str, kind: str, algo: str | None, column: str) -> Verdict:
    """The fact behind one cell of the table (``column`` is an SM class such as ``sm100``)."""
    contract = api.load_contract(series)
    return verdict(contract, artifact, kind, algo, sm_classes(contract)[column][0])


def support_markdown() -> str:
    """docs/TRTLLM_SUPPORT.md, generated from the contracts (tests/test_trtllm_support.py keeps the file equal
    to it)."""
    notes: dict[tuple[str, tuple[str, ...]], int] = {}  # (reason, sources) -> its number under the table
    lines = [
        "# TensorRT-LLM: which kiln recipe runs where",
        "",
        "Generated by `kiln.engine.trtllm.support.support_markdown()` from the `support` section of",
        "`kiln/contracts/tensorrt_llm-1.2.json` (engine columns) and `tensorrt_llm-1.3.json` (HF checkpoint "
        "columns);",
        "`tests/test_trtllm_support.py` fails when this file differs from it. Regenerate with",
        "`.venv/bin/python -c 'from kiln.engine.trtllm.support import write_doc; write_doc()'`.",
        "",
        "Pre-flight (`kiln profiles check`, `kiln build`, `kiln doctor --target`) refuses every `no` and "
        "every",
        "`unverified` cell of a `tensorrt_llm` target before calibration, with the reason below; a recipe "
        "with a",
        "quantized KV cache (e.g. `fp8-kv`) needs both its row and its `kv_cache_dtype` row. kiln's torch "
        "backend",
        "keeps its own rules (`kiln/recipes.py`). Columns are SM classes: "
        + ", ".join(
            f"`{c}` = SM {', '.join(str(s) for s in sms)}"
            for c, sms in sm_classes(api.load_contract("1.2")).items()
        )
        + "; a target on another SM is refused as unverified.",
        "",
    ]
    header = ["recipe", "QuantAlgo"] + [
        f"{'engine 1.2' if a == 'engine' else 'HF ckpt >= 1.3'} {c}"
        for a, _ in DOC_COLUMNS
        for c in SM_COLUMNS
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, kind, algo in DOC_ROWS:
        cells = []
        for artifact, series in DOC_COLUMNS:
            for column in SM_COLUMNS:
                fact = cell(series, artifact, kind, algo, column)
                if fact.supported is True:
                    cells.append("yes")
                    continue
                number = notes.setdefault((fact.reason or "", fact.evidence), len(notes) + 1)
                cells.append(f"{fact.label} [{number}]")
        lines.append(f"| {label} | {algo or '-'} | " + " | ".join(cells) + " |")
    lines += ["", "## Reasons", ""]
    for (reason, evidence), number in notes.items():
        lines.append(f"{number}. {reason} (sources: {', '.join(evidence) or '-'})")
    sources = {
        **_support(api.load_contract("1.2")).get("sources", {}),
        **_support(api.load_contract("1.3")).get("sources", {}),
    }
    lines += ["", "## Sources", ""] + [f"- `{key}`: {text}" for key, text in sorted(sources.items())]
    lines += [
        "",
        "## SM ranges",
        "",
        "Lowest and highest SM each recipe runs on, per artifact (from the same facts):",
        "",
        "| recipe | engine 1.2 | HF ckpt >= 1.3 |",
        "|---|---|---|",
    ]
    for label, kind, algo in DOC_ROWS:
        spans = []
        for artifact, series in DOC_COLUMNS:
            contract = api.load_contract(series)
            spans.append(range_text(contract, supported_sms(contract, artifact, kind, algo)))
        lines.append(f"| {label} | " + " | ".join(spans) + " |")
    lines += _history_lines() + _reader_lines() + [""]
    return "\n".join(lines)


def _history_lines() -> list[str]:
    history = api.load_contract("1.3").data.get("history") or {}
    lines = [
        "",
        "## Versions",
        "",
        "QuantAlgo members (`kiln/contracts/tensorrt_llm-1.3.json` history.quant_algo):",
        "",
    ]
    for entry in history.get("quant_algo", []):
        status = {True: "verified", False: "refuted", None: "UNVERIFIED"}[entry.get("verified")]
        detail = str(entry.get("note") or entry["evidence"]).removeprefix("UNVERIFIED: ")
        lines.append(
            f"- {entry['members']} ({status}; version {entry.get('version') or 'not identified'}): {detail}"
        )
    lines += [
        "",
        f"kiln: {history.get('quant_algo_kiln', '')}",
        "",
        "The engine path (history.engine_path):",
        "",
    ]
    for entry in history.get("engine_path", []):
        lines.append(
            f"- {entry['date']}: {entry['event']} (first release: "
            f"{entry.get('first_release') or 'UNVERIFIED'}; {entry['evidence']})"
        )
    lines += [
        "",
        f"{history.get('engine_path_unverified', '')}",
        "",
        f"kiln: {history.get('engine_path_kiln', '')}",
    ]
    return lines


def _reader_lines() -> list[str]:
    reader = api.load_contract("1.2").data.get("checkpoint_reader") or {}
    if not reader:
        return []
    lines = [
        "",
        "## ModelOpt 0.47's checkpoint vs 1.2's trtllm-build",
        "",
        reader.get("about", ""),
        "",
        f"Verdict: {reader.get('verdict', '')}",
        "",
        "Still UNVERIFIED:",
        "",
    ]
    lines += [f"- {item}" for item in reader.get("unverified", [])]
    return lines


def write_doc(path: Path = DOC_PATH) -> Path:
    path.write_text(support_markdown())
    return path


def table_cells(markdown: str) -> dict[tuple[str, str, str], str]:
    """Parse the table of :func:`support_markdown` back: (row label, artifact, SM class) -> yes / no /
    unverified."""
    cells: dict[tuple[str, str, str], str] = {}
    columns = [(artifact, column) for artifact, _ in DOC_COLUMNS for column in SM_COLUMNS]
    for line in markdown.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) != 2 + len(columns) or parts[0] in ("recipe", "---"):
            continue
        for (artifact, column), value in zip(columns, parts[2:], strict=True):
            cells[(parts[0], artifact, column)] = re.sub(r"\s*\[\d+\]$", "", value)
    return cells
