"""The ablation's figure: every row's paired difference against the finetune baseline.

One panel per metric (SST, Quora, STS, overall), one line per row: the mean over
seeds of (row - finetune) with its two 95% intervals as error bars, over seeds
(Student t) and over dev examples (paired bootstrap), a line at zero, and the
report's own difference (its row minus its finetune row) where it gives both
numbers. The differences are the result, so each panel's axis spans our intervals
rather than the scores' 0-1 range; a paper difference far outside them (the frozen
encoder's) sits at the panel's edge as an arrow labelled with its value.

:func:`plot_differences` reads ``ablation.json``'s ``rows`` (``summary`` in
:func:`bert_demo.ablation.ablate.write_outputs`) and returns what it drew, read back from
the plot, so a test can hold the figure to the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert_demo.ablation.ablate import (
    HEADERS,
    METRICS,
    PAPER_DEV_SCORES,
    REFERENCE_ROW,
    paper_overall,
)
from bert_demo.run_folder.safe_write import atomic_write

DIFFERENCES_FIGURE = "differences.png"
# A paper difference may widen a panel's axis to at most this many times the span
# of our own intervals; beyond that it would squeeze them flat (the frozen row's
# paper Quora difference is -0.200 where ours span a few hundredths).
PAPER_AXIS_STRETCH = 2.5
SEED_COLOR, EXAMPLE_COLOR, PAPER_COLOR = "tab:blue", "tab:orange", "black"


@dataclass(frozen=True)
class DrawnDifference:
    """One row's difference in one panel, as drawn (read back from the artists)."""

    row: str
    metric: str
    mean: float
    seed_interval: tuple[float, float] | None
    example_interval: tuple[float, float] | None
    paper: float | None  # the report's difference; None where it lacks a number
    paper_clipped: bool  # drawn as an arrow at the panel's edge
    filled: bool  # its markers are filled: both intervals exclude 0 on one side


def paper_difference(slug: str, metric: str) -> float | None:
    """The report's row minus its finetune row, or None where it gives no number."""
    row, reference = PAPER_DEV_SCORES.get(slug, {}), PAPER_DEV_SCORES[REFERENCE_ROW]
    if metric == "overall":
        ours, theirs = paper_overall(row), paper_overall(reference)
        return None if ours is None or theirs is None else ours - theirs
    if metric not in row:
        return None
    return row[metric] - reference[metric]


def _axis_limits(ours: list[float], paper: list[float]) -> tuple[float, float]:
    """Our intervals and zero, plus the paper differences that do not squeeze them."""
    low, high = min([*ours, 0.0]), max([*ours, 0.0])
    span = max(high - low, 0.01)
    shown = [v for v in paper if max(high, v) - min(low, v) <= PAPER_AXIS_STRETCH * span]
    low, high = min([low, *shown]), max([high, *shown])
    pad = 0.08 * (high - low) or 0.005
    return low - pad, high + pad


def _interval_of(container: Any) -> tuple[float, tuple[float, float], bool]:
    """(mean, (low, high), filled) of an ``ax.errorbar`` drawn with xerr, from its artists."""
    (segment,) = container.lines[2][0].get_segments()
    from matplotlib.colors import to_rgba

    marker = container.lines[0]
    filled = to_rgba(marker.get_markerfacecolor()) != to_rgba("white")
    return (float(marker.get_xdata()[0]), (float(segment[0][0]), float(segment[1][0])),
            filled)


def _draw_paper(ax: Any, y: float, paper: float, low: float, high: float) -> bool:
    """The report's difference at height ``y``; an arrow at the edge if off the axis."""
    if low <= paper <= high:
        ax.plot([paper], [y], "D", color=PAPER_COLOR, markersize=6, markerfacecolor="none",
                markeredgewidth=1.5)
        return False
    left = paper < low
    nudge = 0.012 * (high - low)
    ax.plot([low + nudge if left else high - nudge], [y], "<" if left else ">",
            color=PAPER_COLOR, markersize=7)
    ax.annotate(f"paper {paper:+.3f}", (low if left else high, y),
                xytext=(6 if left else -6, -11), textcoords="offset points", fontsize=7,
                ha="left" if left else "right")
    return True


def _draw_row(ax: Any, y: float, name: str, comparison: Mapping[str, Any],
              paper: float | None, limits: tuple[float, float]) -> DrawnDifference:
    """One row's mean and intervals at height ``y``, and the paper's difference."""
    mean = comparison["mean"]
    # Both intervals on one side of zero (the table's better/worse): filled markers.
    filled = comparison["verdict"] in ("better", "worse")
    drawn: dict[str, tuple[float, tuple[float, float], bool]] = {}
    for key, color, offset in (("seed_interval", SEED_COLOR, -0.14),
                               ("example_interval", EXAMPLE_COLOR, 0.14)):
        bounds = comparison[key]
        if bounds is not None:
            # The mean comes from the runs' dev scores, the example interval from the saved
            # predictions; two rows that predict alike can give an interval [0, 0] beside a
            # mean of a rounding's size, which matplotlib refuses as a negative error.
            below, above = max(0.0, mean - bounds[0]), max(0.0, bounds[1] - mean)
            drawn[key] = _interval_of(ax.errorbar(
                mean, y + offset, xerr=[[below], [above]], fmt="o",
                color=color, markersize=5, capsize=3, elinewidth=2,
                markerfacecolor=color if filled else "white"))
    if not drawn:  # one seed and no saved predictions: the mean alone
        ax.plot([mean], [y], "o", color="0.4", markersize=5)
    means = [m for m, _, _ in drawn.values()]
    clipped = paper is not None and _draw_paper(ax, y, paper, *limits)
    return DrawnDifference(
        row=name, metric=comparison["metric"], mean=means[0] if means else mean,
        seed_interval=drawn["seed_interval"][1] if "seed_interval" in drawn else None,
        example_interval=drawn["example_interval"][1] if "example_interval" in drawn else None,
        paper=paper, paper_clipped=clipped, filled=any(f for *_, f in drawn.values()))


def plot_differences(rows: Mapping[str, Any], path: Path,
                     title: str | None = None) -> list[DrawnDifference]:
    """Draw every row's ``vs_finetune`` comparisons to ``path``; return what was drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import AutoMinorLocator

    names = [name for name, entry in rows.items() if entry.get("vs_finetune")]
    height = 1.0 + 2 * (0.9 + 0.36 * max(len(names), 1))  # inches: header, two panels
    # Any: the matplotlib type stubs here lag its real signatures.
    fig: Any
    axes: Any
    fig, axes = plt.subplots(2, 2, sharey=True, figsize=(14, height))
    fig.set_layout_engine("constrained")  # room for the legend below and the title above
    drawn: list[DrawnDifference] = []
    for ax, metric, header in zip(axes.flat, METRICS, HEADERS, strict=True):
        shown = [(i, name, rows[name]["vs_finetune"][metric],
                  paper_difference(rows[name].get("slug", ""), metric))
                 for i, name in enumerate(names) if metric in rows[name]["vs_finetune"]]
        ours = [v for _, _, c, _ in shown
                for v in (c["mean"], *(c["seed_interval"] or ()), *(c["example_interval"] or ()))]
        limits = _axis_limits(ours, [p for *_, p in shown if p is not None])
        ax.set_xlim(*limits)
        ax.axvline(0.0, color="0.3", linewidth=1)
        drawn += [_draw_row(ax, i, name, c, paper, limits) for i, name, c, paper in shown]
        ax.set_title(f"{header}: row − {REFERENCE_ROW}", fontsize=10)
        ax.xaxis.set_minor_locator(AutoMinorLocator())
        ax.grid(axis="x", which="major", color="0.82")
        ax.grid(axis="x", which="minor", color="0.93", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.tick_params(axis="x", labelsize=8)
    seeds = {name: max(c["seeds"] for c in rows[name]["vs_finetune"].values()) for name in names}
    for ax in axes[:, 0]:
        ax.set_yticks(range(len(names)), [f"{n} (n={seeds[n]})" for n in names], fontsize=8)
    axes[0, 0].set_ylim(max(len(names), 1) - 0.5, -0.5)  # first row on top, as in the table
    if not names:
        axes[0, 0].text(0.5, 0.5, f"no row shares a seed with {REFERENCE_ROW}",
                        transform=axes[0, 0].transAxes, ha="center")
    legend = [
        Line2D([], [], color=SEED_COLOR, marker="o", linewidth=2,
               label="95% interval over seeds (Student t)"),
        Line2D([], [], color=EXAMPLE_COLOR, marker="o", linewidth=2,
               label="95% interval over dev examples (paired bootstrap)"),
        Line2D([], [], color="0.4", marker="o", markerfacecolor="white", linestyle="",
               label="hollow: unclear (an interval includes 0, or is missing)"),
        Line2D([], [], color=PAPER_COLOR, marker="D", markerfacecolor="none", linestyle="",
               label="paper's difference (bert-base, one run)"),
    ]
    fig.legend(handles=legend, loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    with atomic_write(path) as tmp:  # never through a link the run folder holds
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return drawn
