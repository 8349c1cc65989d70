"""``kiln doctor``'s report: this machine's facts (:mod:`kiln.host`), where the recipe/target library is, and
the model-family table (``docs/FAMILIES.md`` is generated from it).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from kiln import host
from kiln.host import HostReport

__all__ = ["collect", "family_rows", "families_markdown"]


def collect() -> HostReport:
    """:func:`kiln.host.collect`, with where kiln's home and its recipe/target library are."""
    from kiln import constants
    from kiln.profiles import library_roots

    report = host.collect()
    report.components[0] = replace(report.components[0], detail=f"KILN_HOME {constants.kiln_home()}")
    roots = library_roots(Path.cwd() / "profiles" / "_")
    report.notes.append(
        "recipe/target library: " + (" over ".join(f"{p} ({label})" for label, p in roots) or "none")
    )
    return report


def family_rows() -> list[dict[str, str]]:
    """Per model family: architectures, the export the torch engine compiles, recipes (and why not the
    others), and which TensorRT-LLM artifacts load it per kiln's contracts (1.2: engine, 1.3: HF
    checkpoint)."""
    from kiln.engine.trtllm import api
    from kiln.families import FAMILIES

    def trtllm(series: str, artifact: str, architectures: tuple[str, ...]) -> str:
        facts = (api.load_contract(series).data.get("architectures") or {}).get(artifact) or {}
        answers = {(facts.get(a) or {}).get("supported") for a in architectures}
        if answers == {True}:
            return "yes"
        return "no" if answers == {False} else "unverified" if None in answers else "partly"

    rows = []
    for family in FAMILIES:
        rows.append(
            {
                "family": family.name,
                "architectures": ", ".join(family.architectures),
                "summary": family.summary,
                "export": "TensorRT-LLM checkpoint + HF" if family.modelopt_decoder else "HF checkpoint only",
                "recipes": ", ".join(family.recipes),
                "refused": "; ".join(
                    f"{', '.join(q for q, w in family.refused.items() if w == why)}: {why}"
                    for why in dict.fromkeys(family.refused.values())
                ),
                "torch": "yes",
                "tensorrt_llm engine (1.2)": trtllm("1.2", "engine", family.architectures)
                if family.modelopt_decoder
                else "no (no TensorRT-LLM checkpoint export)",
                "tensorrt_llm hf_checkpoint (>= 1.3)": trtllm("1.3", "hf_checkpoint", family.architectures),
            }
        )
    return rows


FAMILY_COLUMNS = (
    "family",
    "architectures",
    "export",
    "recipes",
    "torch",
    "tensorrt_llm engine (1.2)",
    "tensorrt_llm hf_checkpoint (>= 1.3)",
)


def families_markdown() -> str:
    """docs/FAMILIES.md: the family table, generated from the registry and the contracts so it cannot
    drift."""
    rows = family_rows()
    lines = [
        "# Model families",
        "",
        "Generated from `kiln.families` and `kiln/contracts/` by `kiln.doctor.families_markdown()` "
        "(a test keeps this file equal to it). `kiln doctor` prints the same table.",
        "",
        "| " + " | ".join(FAMILY_COLUMNS) + " |",
        "|" + "---|" * len(FAMILY_COLUMNS),
    ]
    lines += ["| " + " | ".join(row[c] for c in FAMILY_COLUMNS) + " |" for row in rows]
    lines += ["", "Refused recipes, with the reason pre-flight gives:", ""]
    lines += [f"- {row['family']}: {row['refused']}" for row in rows if row["refused"]]
    lines += ["", "What sets each family apart:", ""]
    lines += [f"- {row['family']}: {row['summary']}" for row in rows]
    return "\n".join(lines) + "\n"
