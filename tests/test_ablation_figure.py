"""The ablation's differences figure draws the table's numbers and the paper's differences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bert_demo.ablation.figure import (
    DrawnDifference,
    _axis_limits,
    paper_difference,
    plot_differences,
)

RESULTS = Path(__file__).resolve().parent.parent / "results"
PNG = b"\x89PNG"


def _committed(folder: str) -> tuple[dict, str]:
    path = RESULTS / folder
    if not (path / "ablation.json").is_file():
        pytest.skip(f"results/{folder} is not in this tree")
    return (json.loads((path / "ablation.json").read_text())["rows"],
            (path / "ablation.md").read_text())


FOLDERS = ("ablation", "precision-bf16")


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> dict[str, tuple[dict, str, list[DrawnDifference]]]:
    """Each committed ablation's rows and table, and its figure drawn once (~3 s each)."""
    found = {}
    for folder in FOLDERS:
        rows, table = _committed(folder)
        figure = tmp_path_factory.mktemp(folder) / "differences.png"
        found[folder] = rows, table, plot_differences(rows, figure)
        assert figure.read_bytes()[:4] == PNG
    return found


def _table_cell(table: str, row: str, column: int) -> str:
    """The ``column``-th metric cell of ``row`` in the paired-differences table."""
    differences = table.split("## Paired differences", 1)[1]
    line = next(li for li in differences.splitlines() if li.startswith(f"| {row} |"))
    return line.split(" | ")[1 + column]


def _shown(bounds: tuple[float, float] | None) -> str:
    return "n/a" if bounds is None else f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]"


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_figure_draws_the_tables_numbers(committed, folder: str) -> None:
    rows, table, drawn = committed[folder]
    expected = {(name, metric): c for name, entry in rows.items()
                for metric, c in entry.get("vs_finetune", {}).items()}
    assert sorted((d.row, d.metric) for d in drawn) == sorted(expected)  # each exactly once
    columns = ("sst_acc", "para_acc", "sts_pearson", "overall")
    for d in drawn:
        c = expected[d.row, d.metric]
        # Read back from the artists: an error bar is drawn as mean - (mean - low).
        assert d.mean == pytest.approx(c["mean"], abs=1e-12)
        for key, got in (("seed_interval", d.seed_interval),
                         ("example_interval", d.example_interval)):
            if c[key] is None:
                assert got is None
            else:
                assert got == pytest.approx(c[key], abs=1e-12), (d.row, d.metric, key)
        # Filled where the table says better or worse, hollow where unclear.
        assert d.filled == (c["verdict"] in ("better", "worse")), (d.row, d.metric)
        # The same numbers as the markdown table's cell, as it rounds them.
        cell = _table_cell(table, d.row, columns.index(d.metric))
        assert cell.startswith(f"{d.mean:+.3f} seeds {_shown(d.seed_interval)} "
                               f"examples {_shown(d.example_interval)} "), cell


def test_the_paper_differences_are_the_reports() -> None:
    # ../shared/paper-results.md: finetune 0.511 / 0.750 / 0.345, SMART 0.502 / 0.759 /
    # 0.371, single-task SST 0.515 (SST only); overall = mean(SST, Quora, (r + 1) / 2).
    assert paper_difference("smart", "sst_acc") == pytest.approx(0.502 - 0.511)
    assert paper_difference("smart", "sts_pearson") == pytest.approx(0.371 - 0.345)
    assert paper_difference("smart", "overall") == pytest.approx(
        (0.502 - 0.511 + 0.759 - 0.750 + (0.371 - 0.345) / 2) / 3)
    assert paper_difference("single-sst", "sst_acc") == pytest.approx(0.004)
    assert paper_difference("single-sst", "para_acc") is None
    assert paper_difference("single-sst", "overall") is None
    assert paper_difference("smart-upgrad-stsaug", "sst_acc") is None  # beyond the paper


def test_the_committed_figure_marks_the_papers_differences(committed) -> None:
    drawn = {(d.row, d.metric): d for d in committed["ablation"][2]}
    assert drawn["SMART", "overall"].filled  # worse: both intervals below 0
    assert not drawn["PCGrad", "sst_acc"].filled  # unclear: the seeds' interval spans 0
    smart = drawn["SMART", "sts_pearson"]
    assert smart.paper == pytest.approx(0.026) and not smart.paper_clipped
    assert drawn["SMART + UPGrad + stsAug", "sst_acc"].paper is None
    # The frozen encoder's paper Quora difference (-0.200) would squeeze our
    # intervals (a few hundredths) flat: it is drawn at the edge, with its value.
    frozen = drawn["pretrained baseline (frozen encoder)", "para_acc"]
    assert frozen.paper == pytest.approx(0.550 - 0.750) and frozen.paper_clipped


def test_axis_limits_keep_small_differences_readable() -> None:
    ours = [-0.01, 0.004, 0.012]  # span 0.022: the paper may stretch it to 0.055
    low, high = _axis_limits(ours, [0.02, -0.2])
    assert low < -0.01 and high > 0.02  # 0.02 widens it to 0.03: shown
    assert low > -0.02  # -0.2 would widen it ~10x: clipped, not squeezing ours
    # Each paper value is judged against our intervals alone, not against the
    # axis an earlier one already widened: both of these are shown.
    low, high = _axis_limits(ours, [0.03, -0.03])
    assert low < -0.03 and high > 0.03
    assert _axis_limits([], []) == pytest.approx((-0.005, 0.005))


def test_rows_without_intervals_and_an_empty_ablation(tmp_path: Path) -> None:
    one_seed = {"metric": "sst_acc", "seeds": 1, "mean": 0.02, "seed_interval": None,
                "example_interval": None, "verdict": "unclear"}
    rows = {"finetune baseline": {"slug": "finetune"},
            "SMART": {"slug": "smart", "vs_finetune": {"sst_acc": one_seed}}}
    (drawn,) = plot_differences(rows, tmp_path / "one.png")
    assert drawn == DrawnDifference("SMART", "sst_acc", 0.02, None, None,
                                    pytest.approx(-0.009), False, False)
    assert plot_differences({"finetune baseline": {"slug": "finetune"}},
                            tmp_path / "none.png") == []
    assert (tmp_path / "none.png").read_bytes()[:4] == PNG

