"""Validation table for SmolLM2-135M on CPU: build every CPU recipe, then record the report and validation
time.

Run by hand (minutes per recipe on 2 cores):
    .venv/bin/python bench/validation_smollm2.py [--recipes none,fp8,int8-wo,...] [--heldout-tokens 2048]
Writes bench/results/validation_smollm2.{json,md}: the build's results.json rows plus the wall time of each
step (validation's share of the build). Uses a fresh KILN_HOME under /tmp (the SmolLM2 dir is linked in).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "examples" / "tiny-cpu-quant.yaml"
ASSET = Path.home() / ".kiln" / "assets" / "SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recipes", help="comma-separated recipe names from the example profile (default: all)"
    )
    parser.add_argument("--heldout-tokens", type=int, default=2048)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument(
        "--home", type=Path, help="KILN_HOME to use (default: a fresh one; an earlier run's reuses its steps)"
    )
    parser.add_argument(
        "--no-gates", action="store_true", help="drop the profile's gates so every recipe is validated"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "validation_smollm2")
    args = parser.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="kiln-bench-validation-"))
    (home / "assets").mkdir(parents=True, exist_ok=True)
    if not (home / "assets" / ASSET.name).exists():
        (home / "assets" / ASSET.name).symlink_to(ASSET)
    os.environ.update(
        KILN_HOME=str(home),
        PREFECT_HOME=str(home / "prefect"),
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
    )
    profile = yaml.safe_load(PROFILE.read_text())
    profile["model"]["local_dir"] = str(home / "assets" / ASSET.name)
    if args.recipes:
        wanted = args.recipes.split(",")
        profile["recipes"] = [
            r for r in profile["recipes"] if (r if isinstance(r, str) else r["name"]) in wanted
        ]
    # A dict profile has no file to find profiles/{recipes,targets}.yaml from: inline the named entries.
    for kind in ("recipes", "targets"):
        library = {
            e["name"]: e for e in yaml.safe_load((PROFILE.parents[1] / f"{kind}.yaml").read_text())[kind]
        }
        profile[kind] = [library[e] if isinstance(e, str) else e for e in profile[kind]]
    if args.no_gates:  # a table of every recipe: gates would stop the over-budget ones before compile
        profile.pop("gates", None)
        for recipe in profile["recipes"]:
            recipe.pop("gates", None)
    profile["evaluation"]["heldout_tokens"] = args.heldout_tokens
    profile["evaluation"]["concurrency"] = [int(c) for c in args.concurrency.split(",")]

    from kiln.flows.build import build
    from kiln.tasks import progress

    steps: list[dict] = []
    started = time.perf_counter()
    with progress.listening(
        lambda e: (
            steps.append(
                {
                    "step": e.step,
                    "detail": e.detail,
                    "status": e.status,
                    "seconds": round(e.seconds, 2),
                    "note": e.note,
                }
            )
            if e.status != "running"
            else None
        )
    ):
        build(profile=profile)
    total = time.perf_counter() - started
    results = json.loads((home / "reports" / profile["name"] / "results.json").read_text())
    validate_s = sum(s["seconds"] for s in steps if s["step"] == "validate")
    doc = {
        "command": "bench/validation_smollm2.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v and k not in ("out", "home")
        ),
        "build_wall_s": round(total, 1),
        "validate_s": round(validate_s, 1),
        "steps": steps,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    from kiln.validation.report import BuildResults, markdown

    text = markdown(BuildResults.model_validate(results))
    text += (
        f"\nBuild wall time {total:.0f} s, of which validation {validate_s:.0f} s "
        f"({100 * validate_s / total:.0f} %). Machine: 2 shared CPU cores.\n"
    )
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
