"""TensorRT-LLM's per-SM, per-artifact support facts (contract ``support``), the generated
docs/TRTLLM_SUPPORT.md, and ``kiln profiles check`` giving exactly the document's answers for every shipped
recipe on the shipped
TensorRT-LLM targets (issue 18)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kiln.engine.trtllm import api, support
from kiln.profiles import Recipe, Target
from kiln.recipes import KV_SCHEMES, SCHEMES

REPO = Path(__file__).resolve().parents[1]
SOURCE = re.compile(
    r"(NVIDIA/TensorRT-LLM:[\w/.-]+@[0-9a-f]{7,40}|https://\S+|index file id \d+|nvidia-modelopt 0\.47)"
)
ACCEPTANCE_TARGETS = ("a100-trtllm", "h100-trtllm", "b200-trtllm", "h100-trtllm-hf", "b200-trtllm-hf")


def _cells(series: str):
    facts = api.load_contract(series).data["support"]
    for artifact in ("engine", "hf_checkpoint"):
        for kind in (support.QUANT, support.KV):
            for algo, row in facts[artifact][kind].items():
                for sm_class, entry in row.items():
                    yield f"{series}:{artifact}.{kind}.{algo}.{sm_class}", entry


@pytest.mark.parametrize("series", api.CONTRACT_SERIES)
def test_every_support_fact_cites_a_source_and_unconfirmed_ones_say_unverified(series: str) -> None:
    sources = api.load_contract(series).data["support"]["sources"]
    for key, text in sources.items():
        assert SOURCE.search(text), f"{key}: {text!r} names no file@commit, URL or index id"
    cells = dict(_cells(series))
    assert cells
    for where, entry in cells.items():
        assert entry["supported"] in (True, False, None), where
        assert entry["evidence"] and set(entry["evidence"]) <= set(sources), where
        if entry["supported"] is not True:
            assert entry.get("reason"), where
        if entry["supported"] is None:
            assert "UNVERIFIED" in entry["reason"], where


@pytest.mark.parametrize("series", api.CONTRACT_SERIES)
def test_every_kiln_algo_has_a_fact_on_every_sm_class(series: str) -> None:
    contract = api.load_contract(series)
    assert list(support.sm_classes(contract)) == list(support.SM_COLUMNS)
    algos = {s.quant_algo or support.NO_QUANT for s in SCHEMES.values()}
    kv_algos = {v[1] for v in KV_SCHEMES.values() if v[1]}
    facts = contract.data["support"]
    for artifact in ("engine", "hf_checkpoint"):
        assert algos <= set(facts[artifact][support.QUANT]), artifact
        assert kv_algos <= set(facts[artifact][support.KV]), artifact
        for table in (facts[artifact][support.QUANT], facts[artifact][support.KV]):
            for algo, row in table.items():
                assert set(row) == set(support.SM_COLUMNS), (artifact, algo)


@pytest.mark.parametrize(
    ("series", "artifact", "kind", "algo"),
    [
        ("1.2", "engine", "quant_algo", "W4A16_AWQ"),
        ("1.3", "hf_checkpoint", "quant_algo", "NO_QUANT"),
        ("1.2", "hf_checkpoint", "kv_cache_quant_algo", "FP8"),
    ],
)
def test_a_contract_without_a_support_fact_kiln_reads_is_flagged(
    tmp_path: Path, series: str, artifact: str, kind: str, algo: str
) -> None:
    import json

    data = json.loads(json.dumps(api.load_contract(series).data))  # a deep copy of the shipped contract
    del data["support"][artifact][kind][algo]
    path = tmp_path / f"tensorrt_llm-{series}.json"
    path.write_text(json.dumps(data))
    contract = api.load_contract(series, path)
    assert f"support fact {artifact}.{kind} {algo!r}" in api.missing_uses(contract)
    fact = support.verdict(contract, artifact, kind, algo, 90)
    assert fact.supported is None and "UNVERIFIED" in fact.reason  # and pre-flight refuses it


def test_the_committed_doc_is_the_generated_one() -> None:
    """docs/TRTLLM_SUPPORT.md cannot drift from the contracts: regenerate it with support.write_doc()."""
    assert support.DOC_PATH.read_text() == support.support_markdown()


def test_the_doc_table_shows_the_contract_verdicts() -> None:
    cells = support.table_cells(support.DOC_PATH.read_text())
    assert len(cells) == len(support.DOC_ROWS) * len(support.DOC_COLUMNS) * len(support.SM_COLUMNS)
    for label, kind, algo in support.DOC_ROWS:
        for artifact, series in support.DOC_COLUMNS:
            for column in support.SM_COLUMNS:
                assert (
                    cells[(label, artifact, column)]
                    == support.cell(series, artifact, kind, algo, column).label
                )


@pytest.mark.parametrize(
    ("artifact", "algo", "expected"),
    [
        ("engine", "W4A16_AWQ", (80, 90)),
        ("engine", "FP8", (89, 120)),
        ("engine", "NVFP4", (100, 120)),
        ("engine", "W8A8_SQ_PER_CHANNEL", (80, 90)),
        ("engine", "W8A16", None),
        ("hf_checkpoint", "W8A8_SQ_PER_CHANNEL", None),
        ("hf_checkpoint", "W4A8_AWQ", (89, 90)),
    ],
)
def test_sm_ranges_have_a_minimum_and_a_maximum(
    artifact: str, algo: str, expected: tuple[int, int] | None
) -> None:
    series = "1.2" if artifact == "engine" else "1.3"
    assert support.sm_range(api.load_contract(series), artifact, support.QUANT, algo) == expected


def test_kv_caches_per_artifact() -> None:
    engine, hf = api.load_contract("1.2"), api.load_contract("1.3")
    assert support.verdict(engine, "engine", support.KV, "FP8", 80).supported is True  # issue 18 item 4
    assert support.verdict(engine, "engine", support.KV, "INT8", 100).supported is False
    assert support.verdict(hf, "hf_checkpoint", support.KV, "INT8", 90).supported is False
    assert support.verdict(hf, "hf_checkpoint", support.KV, None, 90).supported is True


def test_a_1_3_engine_is_refused_on_every_sm() -> None:
    contract = api.load_contract("1.3")
    assert support.supported_sms(contract, "engine", support.QUANT, None) == []


def test_version_history_is_recorded_with_evidence() -> None:
    history = api.load_contract("1.3").data["history"]
    for entry in history["quant_algo"] + history["engine_path"]:
        assert SOURCE.search(entry["evidence"]), entry
    mxfp8 = next(
        e for e in history["quant_algo"] if "MXFP8" in e["members"] and e["members"].startswith("adds")
    )
    assert mxfp8["verified"] is None and "UNVERIFIED" in mxfp8["note"]
    assert "MXFP8" not in api.load_contract("1.3").quant_algos()  # not confirmed from a TensorRT-LLM source
    events = " ".join(e["event"] for e in history["engine_path"])
    assert "deprecated" in events and "removed" in events
    assert "UNVERIFIED" in history["engine_path_unverified"] and history["engine_path_kiln"]


# --- acceptance: `kiln profiles check` gives the document's answers -----------------------------------------


def _shipped(kind: str) -> dict[str, dict]:
    return {
        entry["name"]: entry
        for entry in yaml.safe_load((REPO / "profiles" / f"{kind}.yaml").read_text())[kind]
    }


def _expected(
    recipe: Recipe, target: Target, cells: dict[tuple[str, str, str], str]
) -> tuple[str, str] | None:
    """(the failing row's label, its cell) per the document, or None when the document says yes."""
    contract = api.load_contract(api.default_series(target))
    column = support.sm_class(contract, target.sm_number)
    rows = [recipe.quantization] + (
        [f"kv_cache_dtype {recipe.kv_cache_dtype}"] if recipe.kv_cache_dtype != "auto" else []
    )
    for row in rows:
        if cells[(row, target.artifact, column)] != "yes":
            return row, cells[(row, target.artifact, column)]
    return None


def test_profiles_check_refuses_exactly_what_the_document_says_with_its_reasons(tmp_path: Path) -> None:
    from kiln.cli import app

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for lib in ("recipes.yaml", "targets.yaml"):
        (profiles / lib).write_text((REPO / "profiles" / lib).read_text())
    recipes, targets = _shipped("recipes"), _shipped("targets")
    assert set(ACCEPTANCE_TARGETS) <= set(targets)
    request = profiles / "every-recipe.yaml"
    request.write_text(
        yaml.safe_dump(
            {
                "name": "every-recipe",
                "model": {"repo_id": "org/model", "revision": "main"},
                "recipes": list(recipes),
                "targets": list(ACCEPTANCE_TARGETS),
                "registry": {"model_name": "m"},
            }
        )
    )
    result = CliRunner().invoke(app, ["profiles", "check", str(request)])
    output = " ".join(result.output.split())  # rich wraps long lines
    pairs = {
        (r, t): why
        for r, t, why in re.findall(
            r"recipe '([\w-]+)' x target '([\w-]+)': (.*?)(?= recipe '[\w-]+' x target | Remove the pair|$)",
            output,
        )
    }
    cells = support.table_cells(support.DOC_PATH.read_text())
    expected = {}
    for rname, rentry in recipes.items():
        for tname in ACCEPTANCE_TARGETS:
            if why := _expected(Recipe.model_validate(rentry), Target.model_validate(targets[tname]), cells):
                expected[(rname, tname)] = why
    assert result.exit_code == 2, result.output
    assert set(pairs) == set(expected), set(pairs) ^ set(expected)
    assert f"{len(expected)} recipe x target pair(s) cannot run" in output
    contract_of = {
        t: api.load_contract(api.default_series(Target.model_validate(targets[t])))
        for t in ACCEPTANCE_TARGETS
    }
    for (rname, tname), (row, label) in expected.items():
        target = Target.model_validate(targets[tname])
        kind, algo = next((k, a) for lbl, k, a in support.DOC_ROWS if lbl == row)
        fact = support.verdict(contract_of[tname], target.artifact, kind, algo, target.sm_number)
        assert fact.label == label
        assert " ".join(fact.reason.split()) in pairs[(rname, tname)], (rname, tname)
        assert fact.where in pairs[(rname, tname)]
    # the cases, spelled out: B200 engines refuse INT8/INT4/SmoothQuant, the PyTorch backend INT8
    # SmoothQuant
    for rname in ("int8-sq", "int8-wo", "int4-wo", "int4-awq", "w4a8-awq"):
        assert "b200-trtllm" in {t for r, t in expected if r == rname}, rname
    assert {("int8-sq", "h100-trtllm-hf"), ("int8-sq", "b200-trtllm-hf")} <= set(expected)
    assert ("int8-sq", "h100-trtllm") not in expected and ("fp8", "b200-trtllm") not in expected
