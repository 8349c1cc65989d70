"""Cold build vs no-op rebuild of the demo profile on the embedded default (run by hand).

    .venv/bin/python bench/orchestration_rebuild.py [--profile profiles/examples/tiny-cpu.yaml]

Runs ``kiln build PROFILE`` twice with a fresh KILN_HOME (the SmolLM2 assets are linked in, not
re-converted) and records each run's wall time and the per-step timings (wall minus steps is the CLI's
imports plus Prefect's ephemeral server start), then checks the rebuild created no new model version. Writes
``bench/results/orchestration_rebuild.{json,md}`` and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILN = str(Path(sys.executable).with_name("kiln"))
STEP_LINE = re.compile(
    r"^(?P<mark>[✓↺\-✗]) (?P<step>\S+)(?: (?P<detail>.+?))?(?P<reused> reused)?(?: \(.*\))? (?P<s>[\d.]+)s$"
)


def run_build(profile: str, env: dict[str, str]) -> dict:
    load = os.getloadavg()[0]  # other work on the machine skews every number: record it
    started = time.perf_counter()
    proc = subprocess.run(
        [KILN, "build", profile], env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"kiln build failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    steps = [m.groupdict() for line in proc.stdout.splitlines() if (m := STEP_LINE.match(line.strip()))]
    step_s = sum(float(s["s"]) for s in steps)
    return {
        "wall_s": round(wall, 2),
        "steps_s": round(step_s, 2),
        "load_avg_1m_at_start": round(load, 1),
        "steps": steps,
        "stdout_tail": proc.stdout[-1500:],
    }


def model_versions(home: Path) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    return sum(
        len(client.search_model_versions(f"name = '{m.name}'")) for m in client.search_registered_models()
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="profiles/examples/tiny-cpu.yaml")
    parser.add_argument("--assets", default=str(Path.home() / ".kiln" / "assets"))
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    (home / "assets").symlink_to(Path(args.assets).resolve())
    env = {
        **os.environ,
        "KILN_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "COLUMNS": "200",
    }
    for name in ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "KILN_STORE_URI"):
        env.pop(name, None)
    cold = run_build(args.profile, env)
    versions_after_cold = model_versions(home)
    noop = run_build(args.profile, env)
    versions_after_noop = model_versions(home)
    result = {
        "profile": args.profile,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "cold": cold,
        "noop": noop,
        "noop_over_cold": round(noop["wall_s"] / cold["wall_s"], 4),
        "noop_steps_over_cold_steps": round(noop["steps_s"] / cold["steps_s"], 4)
        if cold["steps_s"]
        else None,
        "model_versions": {"after_cold": versions_after_cold, "after_noop": versions_after_noop},
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "orchestration_rebuild.json").write_text(json.dumps(result, indent=1) + "\n")
    table = "\n".join(
        [
            "| run | wall (s) | sum of steps (s) | model versions |",
            "|---|---|---|---|",
            f"| cold | {cold['wall_s']} | {cold['steps_s']} | {versions_after_cold} |",
            f"| no-op | {noop['wall_s']} | {noop['steps_s']} | {versions_after_noop} |",
            "",
            f"no-op / cold wall: {result['noop_over_cold']:.1%}; steps only: "
            f"{result['noop_steps_over_cold_steps']:.1%}",
        ]
    )
    steps = "\n".join(
        f"| {s['step']} {s['detail'] or ''} | {c['s']} | {s['s']} {'(reused)' if s['reused'] else ''} |"
        for c, s in zip(cold["steps"], noop["steps"], strict=False)
    )
    (out / "orchestration_rebuild.md").write_text(
        "# Cold build vs no-op rebuild\n\n`.venv/bin/python bench/orchestration_rebuild.py --profile "
        f"{args.profile}` on {result['machine']}; fresh KILN_HOME, embedded ephemeral Prefect server, `kiln "
        f"build` as a subprocess.\n\n{table}\n\n| step | cold (s) | no-op (s) |\n|---|---|---|\n{steps}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
