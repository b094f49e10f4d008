"""Every script in examples/ runs, at a tiny size, and its printed training loss falls.

The scripts run in this process (runpy, as `python examples/NAME.py ...` would
run them) so that torch, transformers and Lightning are imported once for all.
"""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LOSS_LINE = re.compile(r"^step\s+(\d+)\s+loss\s+([0-9.]+)", re.MULTILINE)


def run_example(name: str, args: list[str], capsys: pytest.CaptureFixture[str],
                monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the scripts import toy_tasks beside them
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def assert_loss_falls(out: str, lines: int) -> None:
    losses = [float(loss) for _, loss in LOSS_LINE.findall(out)]
    assert len(losses) == lines, out
    # Each printed loss is the mean task loss over the last --log-every steps.
    assert losses[-1] < 0.9 * losses[0], losses


def test_two_head_mlp(one_thread, capsys, monkeypatch) -> None:
    out = run_example("two_head_mlp.py", ["--steps", "40", "--log-every", "10"], capsys, monkeypatch)
    assert_loss_falls(out, 4)


def test_hf_bert_pcgrad_smart(one_thread, capsys, monkeypatch) -> None:
    pytest.importorskip("transformers")
    out = run_example("hf_bert_pcgrad_smart.py", ["--steps", "30", "--log-every", "10"],
                      capsys, monkeypatch)
    assert_loss_falls(out, 3)
    # SMART ran at its configured radius (epsilon 1e-4): printed as |delta|max.
    assert re.findall(r"\|delta\|max ([0-9.e+-]+)", out) == ["1.0e-04"] * 3, out


def test_hf_trainer_recipe(one_thread, capsys, monkeypatch) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer needs it
    out = run_example("hf_trainer.py", ["--steps", "30", "--log-every", "10"], capsys, monkeypatch)
    assert_loss_falls(out, 3)
    before, after = map(float, re.findall(
        r"before clipping up to ([0-9.]+), after up to ([0-9.]+)", out)[-1])
    assert before > 1.0, "the clip was never exercised; the test would not see it fail"
    assert after <= 1.0 + 1e-4  # the Trainer's max_grad_norm clip acted on PCGrad's gradient


@pytest.mark.filterwarnings("ignore:.*treespec.*")  # Lightning's own use of a torch API it wraps
def test_lightning_recipe(one_thread, capsys, monkeypatch) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    out = run_example("lightning_manual.py", ["--steps", "30", "--log-every", "10"], capsys, monkeypatch)
    assert_loss_falls(out, 3)


@pytest.mark.parametrize(
    "choice", [["--aggregator", "upgrad"], ["--weighting", "uncertainty"], ["--weighting", "dwa"]]
)
def test_shared_batch(choice: list[str], one_thread, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    out = run_example("shared_batch.py", ["--steps", "40", "--log-every", "10", *choice], capsys, monkeypatch)
    assert_loss_falls(out, 4)
