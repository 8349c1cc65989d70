"""The build report: rows, recommendation, markdown, rich table, plots, results.json and ``kiln report``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kiln.cli import app
from kiln.profiles import Gates
from kiln.steps import Outcome
from kiln.validation import plots
from kiln.validation.gates import decide
from kiln.validation.report import (
    BuildResults,
    curve_from_metrics,
    latest_build,
    load_results,
    mark_recommended,
    markdown,
    rows_from,
    write_report,
)

PNG = b"\x89PNG\r\n\x1a\n"


def sweep(base: float, size: float, ppl: float, ppl_pct: float, top1: float) -> dict[str, float]:
    metrics = {
        "perplexity": ppl,
        "ppl_increase_pct": ppl_pct,
        "kl_divergence": ppl_pct / 100,
        "top1_agreement": top1,
        "greedy_prefix_match": 0.9,
        "size_bytes": size,
        "ttft_p90_ms": 12.0,
    }
    for c, scale in ((1, 1.0), (4, 3.0)):
        metrics |= {
            f"tokens_per_s_c{c}": base * scale,
            f"itl_p50_ms_c{c}": 1000 / base * (1 + c / 10),
            f"ttft_p90_ms_c{c}": 10.0 * c,
            f"requests_per_s_c{c}": base * scale / 32,
        }
    metrics["tokens_per_s"] = base * 3.0
    return metrics


def outcomes() -> list[Outcome]:
    """A build's outcomes as the flow produces them: verdicts decided from metrics by the real gates."""
    gates = Gates(max_ppl_increase_pct=2.0, min_top1_agreement=0.9)
    table = {
        ("bf16", "cpu"): sweep(50, 260e6, 32.0, 0.0, 1.0),
        ("fp8", "cpu"): sweep(80, 140e6, 32.3, 0.9, 0.97),
        ("int4", "cpu"): sweep(120, 80e6, 36.0, 12.5, 0.81),
        ("int8", "cpu"): sweep(90, 140e6, 32.2, 0.6, 0.98),
    }
    result = []
    for (recipe, target), metrics in table.items():
        verdict = decide(gates, metrics)
        text = "pass" if verdict.passed else "fail: " + "; ".join(verdict.messages)
        status = "registered" if verdict.passed else "failed-gates"
        version = str(len(result) + 1) if verdict.passed else None
        result.append(
            Outcome(
                recipe,
                target,
                status,
                text,
                metrics,
                model_name="smol.cpu" if version else None,
                version=version,
            )
        )
    result.append(Outcome("nvfp4", "h100", "skipped", "skipped: needs SM >= 100"))
    return result


@pytest.fixture
def results() -> BuildResults:
    rows = mark_recommended(rows_from(outcomes()), "fastest")
    return BuildResults(build="smol-demo", model="SmolLM2-135M @ abc", select="fastest", rows=rows)


def test_recommended_is_fastest_passing_never_a_failing_engine(results: BuildResults) -> None:
    by = {r.recipe: r for r in results.rows}
    assert by["int4"].passed is False and by["int4"].recommended is False  # fastest, but fails accuracy
    assert by["int8"].recommended and not by["fp8"].recommended and not by["bf16"].recommended
    assert by["nvfp4"].passed is None and not by["nvfp4"].recommended
    smallest = {r.recipe: r.recommended for r in mark_recommended(results.rows, "smallest")}
    # tie: faster
    assert smallest == {"bf16": False, "fp8": False, "int8": True, "int4": False, "nvfp4": False}


def test_markdown_table_and_gate_failures(results: BuildResults) -> None:
    text = markdown(results)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| recipe"))
    assert "Δppl %" in header and "tok/s" in header and "verdict" in header
    int4 = next(line for line in lines if line.startswith("| int4"))
    assert "| +12.50 |" in int4 and "| 360.0 |" in int4 and "FAIL" in int4
    assert next(line for line in lines if line.startswith("| int8 ★")).count("pass") == 1
    failures = text.split("## Gate failures")[1]
    assert "int4 x cpu" in failures
    assert "max_ppl_increase_pct: ppl_increase_pct 12.5 % > 2 % (over by 10.5 %)" in failures
    assert "min_top1_agreement: top1_agreement 0.81 < 0.9 (short by 0.09)" in failures
    assert "nvfp4 x h100: skipped: needs SM >= 100" in text.split("## Skipped")[1]


def test_plots_are_pngs(tmp_path: Path, results: BuildResults) -> None:
    written = write_report(results, tmp_path)
    names = sorted(p.name for p in written.plots)
    assert names == ["latency_vs_throughput-cpu.png", "pareto.png"]  # h100 has no measured row
    for path in written.plots:
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    assert (tmp_path / "report.md").read_text() == written.markdown
    assert load_results(written.results_path) == results


def test_curve_from_metrics_and_pareto_front() -> None:
    curve = curve_from_metrics(sweep(50, 1, 1, 0, 1))
    assert [p["concurrency"] for p in curve["points"]] == [1, 4]
    assert curve["points"][1]["output_tokens_per_s"] == 150.0 and curve["points"][0]["itl_ms"]["p50"] == 22.0
    points = [(1.0, 30.0), (2.0, 20.0), (3.0, 25.0), (4.0, 10.0)]
    assert plots.pareto_front(points, maximize_x=False) == [(1.0, 30.0), (2.0, 20.0), (4.0, 10.0)]
    assert plots.pareto_front(points, maximize_x=True) == [(4.0, 10.0)]


def test_load_results_errors(kiln_home: Path, tmp_path: Path) -> None:
    from kiln.errors import KilnInputError

    assert latest_build() is None
    with pytest.raises(KilnInputError, match="no build results .* known builds .*: none"):
        load_results("nope")
    with pytest.raises(KilnInputError, match="neither a build name"):
        load_results("../etc")
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "other"}')
    with pytest.raises(KilnInputError, match="not a kiln build results file"):
        load_results(bad)


def test_kiln_report_cli(kiln_home: Path, results: BuildResults) -> None:
    runner = CliRunner()
    empty = runner.invoke(app, ["report"])
    assert empty.exit_code == 2 and "no build results yet" in empty.output
    write_report(results)
    assert latest_build() == "smol-demo"
    shown = runner.invoke(app, ["report"], env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    for text in (
        "smol-demo",
        "int8 ★",
        "bf16",
        "nvfp4",
        "360.0",
        "FAIL",
        "gate failures",
        "int4 x cpu: max_ppl_increase_pct: ppl_increase_pct 12.5 % > 2 % (over by 10.5 %)",
    ):
        assert text in shown.output
    as_json = runner.invoke(app, ["report", "smol-demo", "--json"])
    assert as_json.exit_code == 0
    assert BuildResults.model_validate(json.loads(as_json.output)) == results
    md = runner.invoke(app, ["report", "smol-demo", "--markdown"])
    assert md.exit_code == 0 and md.output.strip() == markdown(results).strip()
    missing = runner.invoke(app, ["report", "other-build"])
    assert missing.exit_code == 2 and "known builds" in missing.output and "smol-demo" in missing.output
    replot = runner.invoke(
        app,
        [
            "report",
            str(kiln_home / "reports" / "smol-demo" / "results.json"),
            "--plots",
            str(kiln_home / "replot"),
        ],
    )
    assert replot.exit_code == 0 and (kiln_home / "replot" / "pareto.png").read_bytes().startswith(PNG)
    both = runner.invoke(app, ["report", "--json", "--markdown"])
    assert both.exit_code == 2 and "exclusive" in both.output


def test_report_logged_to_mlflow(kiln_home: Path, results: BuildResults) -> None:
    from mlflow import MlflowClient

    from kiln.validation.report import log_to_mlflow

    written = write_report(results)
    uri = f"sqlite:///{kiln_home / 'mlflow.db'}"
    run_id = log_to_mlflow(written, results, uri, "smol")
    assert log_to_mlflow(written, results, uri, "smol") == run_id  # same build, same run
    client = MlflowClient(tracking_uri=uri)
    files = {a.path for a in client.list_artifacts(run_id, "report")}
    assert files == {
        "report/report.md",
        "report/results.json",
        "report/pareto.png",
        "report/latency_vs_throughput-cpu.png",
    }
    run = client.get_run(run_id)
    assert (
        run.data.metrics["int4.cpu.ppl_increase_pct"] == 12.5
        and run.data.tags["kiln.verdict.int4.cpu"] == "FAIL"
    )
    local = Path(client.download_artifacts(run_id, "report/report.md", str(kiln_home)))
    assert local.read_text() == written.markdown
    assert run.info.status == "FINISHED" and run.info.end_time is not None  # not left RUNNING forever


def test_piped_report_is_full_width_and_machine_output_stays_clean(
    kiln_home: Path, results: BuildResults
) -> None:
    """Piped at 80 columns the table used to cut every cell to "rec…"; --json --plots printed "wrote …"
    first."""
    write_report(results)
    runner = CliRunner()
    shown = runner.invoke(app, ["report"], env={"COLUMNS": "80"})
    assert shown.exit_code == 0 and "…" not in shown.output
    assert "int8 ★" in shown.output and "nvfp4" in shown.output
    both = runner.invoke(app, ["report", "smol-demo", "--json", "--plots", str(kiln_home / "plots")])
    assert both.exit_code == 0
    assert BuildResults.model_validate(json.loads(both.stdout)) == results  # stdout: the JSON alone
    assert "wrote" in both.stderr and (kiln_home / "plots" / "pareto.png").is_file()


def test_engine_links_are_pages_a_browser_opens() -> None:
    """The Prefect UI cannot open file:// links: an http tracking server gets the MLflow version page, a local
    file store gets no link (its path is shown as text)."""
    from kiln.steps import Outcome
    from kiln.steps.report import engine_link

    local = Outcome(
        recipe="fp8",
        target="cpu",
        status="registered",
        verdict="pass",
        model_name="m.cpu",
        version="3",
        uri="file:///home/k/store/m/cpu/abc",
    )
    assert engine_link("sqlite:////home/k/mlflow.db", local) is None
    assert engine_link("http://127.0.0.1:5000/", local) == "http://127.0.0.1:5000/#/models/m.cpu/versions/3"


def test_a_table_too_wide_for_the_terminal_becomes_blocks_without_broken_words(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io

    from rich.console import Console
    from rich.table import Table

    from kiln.commands import _common

    out = io.StringIO()
    monkeypatch.setattr(
        _common, "console", Console(file=out, force_terminal=True, width=60, color_system=None)
    )
    table = Table(title="m: 1 version(s)")
    for column in ("registered model", "version", "recipe", "aliases", "gates", "state", "created", "uri"):
        table.add_column(column)
    table.add_row(
        "smollm2.cpu",
        "3",
        "int8-wo",
        "candidate, production",
        "passed",
        "published",
        "2026-12-02T15:04:35Z",
        "file:///home/k/store/smollm2/cpu/" + "ab" * 20,
    )
    _common.print_table(table)
    text = out.getvalue()
    assert "…" not in text
    for word in ("candidate,", "production", "published", "2026-12-02T15:04:35Z", "int8-wo"):
        assert word in text.split(), (word, text)  # whole, not folded across lines
