"""PNG plots for MLflow and reports: latency vs throughput per recipe, and the accuracy/size/speed Pareto.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, thread-safe
enough for a worker), from the plain JSON forms of the results so a report can be re-plotted later.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kiln.validation.perf import PerfResult


def _perf_dict(perf: PerfResult | Mapping[str, Any]) -> Mapping[str, Any]:
    return perf.to_dict() if isinstance(perf, PerfResult) else perf


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def latency_throughput(
    curves: Mapping[str, PerfResult | Mapping[str, Any]], path: Path, title: str = "latency vs throughput"
) -> Path:
    """One line per recipe over its concurrency sweep: ITL p50 and TTFT p90 against output tokens/s."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    itl_ax, ttft_ax = fig.subplots(1, 2)
    for name, perf in curves.items():
        points = sorted(_perf_dict(perf)["points"], key=lambda p: p["concurrency"])
        if not points:
            continue
        speed = [p["output_tokens_per_s"] for p in points]
        for ax, key, q in ((itl_ax, "itl_ms", "p50"), (ttft_ax, "ttft_ms", "p90")):
            xs = [s for s, p in zip(speed, points, strict=True) if p[key]]
            ys = [p[key][q] for p in points if p[key]]
            (line,) = ax.plot(xs, ys, marker="o", label=name)
            for x, y, p in zip(xs, ys, [p for p in points if p[key]], strict=True):
                ax.annotate(
                    f"c{p['concurrency']}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=line.get_color(),
                )
    itl_ax.set(xlabel="output tokens/s", ylabel="inter-token latency p50 (ms)", title="decode")
    ttft_ax.set(xlabel="output tokens/s", ylabel="time to first token p90 (ms)", title="prefill")
    for ax in (itl_ax, ttft_ax):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def pareto_front(points: Sequence[tuple[float, float]], *, maximize_x: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower y is better; x is better low, or high if
    maximize_x)."""
    ordered = sorted(points, key=lambda p: (-p[0] if maximize_x else p[0], p[1]))
    front: list[tuple[float, float]] = []
    for x, y in ordered:
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def accuracy_pareto(
    rows: Sequence[Mapping[str, Any]], path: Path, title: str = "perplexity vs size and speed"
) -> Path:
    """Perplexity against engine size and against tokens/s for every recipe x target, with the Pareto fronts.

    ``rows`` carry ``recipe``, ``target``, ``metrics`` (perplexity, size_bytes, tokens_per_s), ``passed``
    and ``recommended``; failing engines are drawn hollow, recommended ones as stars.
    """
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    size_ax, speed_ax = fig.subplots(1, 2)
    for ax, key, scale, label, maximize in (
        (size_ax, "size_bytes", 1 / 2**20, "engine size (MiB)", False),
        (speed_ax, "tokens_per_s", 1.0, "output tokens/s (peak)", True),
    ):
        plotted = []
        for row in rows:
            metrics = row.get("metrics") or {}
            if metrics.get("perplexity") is None or metrics.get(key) is None:
                continue
            x, y = metrics[key] * scale, metrics["perplexity"]
            plotted.append((x, y))
            marker = "*" if row.get("recommended") else "o"
            style = {"color": "C0"} if row.get("passed", True) else {"facecolors": "none", "edgecolors": "C3"}
            ax.scatter([x], [y], marker=marker, s=140 if marker == "*" else 40, **style)
            ax.annotate(
                f"{row['recipe']}@{row['target']}",
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        front = pareto_front(plotted, maximize_x=maximize)
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), linestyle="--", color="C1", label="Pareto front")
            ax.legend(fontsize=8)
        ax.set(xlabel=label, ylabel="perplexity (lower is better)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)
