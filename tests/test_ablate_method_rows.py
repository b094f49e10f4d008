"""`ablate --rows agg-<name> weight-<name>`: a row for every aggregator and loss weighting."""

from __future__ import annotations

import json

import pytest
from demo_fixtures import write_tiny_data, write_tiny_model

from bert_demo.ablation.ablate import ROWS, method_rows, row_config, run_ablation, select_rows
from bert_demo.cli import build_parser
from bert_demo.config import TrainConfig
from bert_demo.training.train import train
from bert_demo.training.weighting import WEIGHTINGS
from gradtools.aggregation import available

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> TrainConfig:
    root = tmp_path_factory.mktemp("tiny")
    model_dir, data_dir = write_tiny_model(root / "model"), write_tiny_data(root / "data")
    return TrainConfig(model=str(model_dir), data=str(data_dir), batch_sst=3, batch_para=2,
                       batch_sts=2, max_length=16, epochs=1, steps_per_epoch=1, lr=1e-3,
                       eval_batch_size=4, pooling="mean", precision="fp32")


def test_every_aggregator_and_weighting_has_a_row() -> None:
    names = [f"agg-{n}" for n in available()] + [f"weight-{n}" for n in WEIGHTINGS]
    rows = select_rows(names)
    # A base with methods on: a row switches on its own method and nothing else.
    base = TrainConfig(smart=True, sts_aug=True, aggregator="mgda")
    for name, row in zip(names, rows, strict=True):
        config = row_config(base, row, seed=0)
        kind, method = name.split("-", 1)
        assert (config.aggregator, config.weighting) == (
            (method, None) if kind == "agg" else (None, method))
        assert not config.smart and not config.sts_aug and config.mode == "finetune"
        assert config.extra["ablation_row"] == row.name
    titles = {row.slug: row.name for row in rows}
    assert titles["agg-upgrad"] == "UPGrad" and titles["agg-alignedmtl"] == "AlignedMTL"
    assert titles["weight-uncertainty"] == "Uncertainty weighting"
    assert titles["weight-imtll"] == "IMTL-L"
    # PCGrad alone is the paper's row: the same runs, not trained twice.
    assert select_rows(["agg-pcgrad"]) == select_rows(["pcgrad"])
    assert "agg-pcgrad" not in {row.slug for row in method_rows()}
    # One name per row in the table (its rows are keyed by name) and one folder each.
    every = ROWS + method_rows()
    assert len({r.name for r in every}) == len({r.slug for r in every}) == len(every)
    # The default is still the fixed rows.
    assert select_rows(None) == ROWS


def test_an_unknown_method_row_lists_the_names(base) -> None:
    with pytest.raises(ValueError, match=r"--rows: unknown row\(s\) \['agg-adam'\].*agg-<agg"):
        select_rows(["agg-adam"])


def test_a_tiny_ablation_of_method_rows(base, tmp_path) -> None:
    rows = ["finetune", "agg-upgrad", "weight-uncertainty"]
    table = run_ablation(base, tmp_path, 1, rows=rows, progress=False, train=train)
    saved = json.loads((tmp_path / "agg-upgrad" / "seed0" / "config.json").read_text())
    assert saved["aggregator"] == "upgrad" and saved["weighting"] is None
    saved = json.loads((tmp_path / "weight-uncertainty" / "seed0" / "config.json").read_text())
    assert saved["weighting"] == "uncertainty" and saved["aggregator"] is None
    text = table.read_text()
    document = json.loads((tmp_path / "ablation.json").read_text())
    for name, slug in (("UPGrad", "agg-upgrad"), ("Uncertainty weighting", "weight-uncertainty")):
        entry = document["rows"][name]
        assert entry["slug"] == slug and entry["seeds"] == 1
        overall = entry["overall"]["mean"]
        # Its row in the table, with its own numbers, and the paper's cells empty.
        line = next(x for x in text.splitlines() if x.startswith(f"| {name} | "))
        cells = [c.strip() for c in line.split("|")[2:-1]]
        assert cells[3] == f"{overall:.3f}" and cells[4:8] == ["—"] * 4
        assert f"| {name} | " in text.split("## Paired differences", 1)[1]
    # The shared settings line does not name a row's method.
    settings = next(x for x in text.splitlines() if x.startswith("Settings shared"))
    assert "weighting" not in settings and "aggregator" not in settings


def test_a_method_row_that_cannot_run_is_refused_before_training(base, tmp_path) -> None:
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained a run")

    single = base.with_overrides(tasks=("sst",))
    with pytest.raises(ValueError, match="--rows weight-dwa: --weighting dwa needs at least two"):
        run_ablation(single, tmp_path, 1, rows=["weight-dwa"], progress=False,
                     train=no_training)
    assert not (tmp_path / "weight-dwa").exists()


def test_ablate_rows_help_names_the_method_rows(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    ablate = build_parser()._subparsers._group_actions[0].choices["ablate"]  # type: ignore[union-attr]
    text = " ".join(ablate.format_help().split())
    assert "agg-NAME (--aggregator NAME: " + ", ".join(available()) + ")" in text
    assert "weight-NAME (--weighting NAME: " + ", ".join(WEIGHTINGS) + ")" in text


def test_the_figure_draws_a_mean_outside_its_example_interval(tmp_path) -> None:
    # Two rows that predict every dev example alike: the bootstrap over examples is
    # [0, 0] while the dev scores differ by a rounding (the tiny ablation above met it).
    from bert_demo.ablation.figure import plot_differences

    alike = {"metric": "sts_pearson", "seeds": 1, "mean": -6e-5, "seed_interval": None,
             "example_interval": [0.0, 0.0], "verdict": "unclear"}
    rows = {"finetune baseline": {"slug": "finetune"},
            "Uncertainty weighting": {"slug": "weight-uncertainty",
                                      "vs_finetune": {"sts_pearson": alike}}}
    (drawn,) = plot_differences(rows, tmp_path / "alike.png")
    assert drawn.row == "Uncertainty weighting" and drawn.mean == pytest.approx(-6e-5)
