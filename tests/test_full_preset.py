"""`--preset full` (issue 24 item 5): the quick preset at the converged length; `make demo`
stays quick."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bert_demo.cli import DEFAULT_PRESET, build_parser, config_from_args
from bert_demo.config import FULL_PRESET, PRESETS, QUICK_PRESET, preset_config
from bert_demo.training.train import total_steps

REPO = Path(__file__).resolve().parent.parent


def test_full_is_the_quick_preset_for_three_epochs() -> None:
    assert PRESETS["full"] is FULL_PRESET
    assert {k: v for k, v in FULL_PRESET.items() if k != "epochs"} == {
        k: v for k, v in QUICK_PRESET.items() if k != "epochs"}
    assert (QUICK_PRESET["epochs"], FULL_PRESET["epochs"]) == (1, 3)
    full = config_from_args(build_parser().parse_args(["train", "--preset", "full"]))
    assert full == preset_config("quick", epochs=3)
    # 3 epochs of 267 steps, the linear schedule's warm-up and decay spread over all 801.
    assert total_steps(full, full.steps_per_epoch or 0) == 801
    # Flags still override it.
    assert config_from_args(build_parser().parse_args(
        ["train", "--preset", "full", "--epochs", "2"])).epochs == 2


def test_help_names_the_full_presets_epochs(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    train = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    text = " ".join(train.format_help().split())
    assert "passes over the largest task (default: 1; full preset: 3; paper preset: 10)" in text
    assert "{full,paper,quick}" in text


@pytest.mark.skipif(not (REPO / "results" / "learning-curve" / "README.md").is_file(),
                    reason="the learning curve is not in this tree")
def test_its_length_is_the_learning_curves_choice() -> None:
    text = (REPO / "results" / "learning-curve" / "README.md").read_text()
    (epochs,) = re.findall(r"\*\*L = (\d+) epochs\*\*", text)
    assert FULL_PRESET["epochs"] == int(epochs)


def test_make_demo_stays_quick() -> None:
    assert DEFAULT_PRESET == "quick"
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "-m bert_demo train $(ARGS)" in recipe and "--preset" not in recipe
    assert re.search(r"^ARGS \?=\s*$", makefile, re.MULTILINE)
