"""`python -m bert_demo`: clear errors for bad arguments, and the commands end to end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from demo_fixtures import tiny_args, write_tiny_data, write_tiny_model

from bert_demo.cli import build_parser, config_from_args, main
from bert_demo.config import PAPER_PRESET, QUICK_PRESET

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(root / "model"), write_tiny_data(root / "data")



def fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--lr", "-1"], "argument --lr: must be > 0, got '-1'"),
        (["train", "--epochs", "0"], "argument --epochs: must be >= 1, got '0'"),
        (["train", "--tasks", "nli"], "invalid choice: 'nli'"),
        (["train", "--tasks", "sst", "--pcgrad"], "pcgrad needs at least two tasks"),
        (["train", "--tasks", "sst", "para", "--sts-aug"], "sts_aug needs the sts task"),
        (["train", "--warmup", "1.5"], "argument --warmup: must be in [0, 1), got '1.5'"),
        (["train", "--optimizer", "sgd"], "invalid choice: 'sgd'"),
        (["train", "--preset", "huge"], "invalid choice: 'huge'"),
        (["train", "--batch-sst", "two"], "invalid int value: 'two'"),
        (["train", "--threads", "0"], "--threads must be >= 1"),
        (["ablate", "--seeds", "0"], "--seeds must be >= 1"),
        (["ablate", "--rows", "everything"], "unknown row(s) ['everything']"),
        (["evaluate", "--run", "/nonexistent/run"], "no checkpoint at /nonexistent/run"),
    ],
)
def test_bad_arguments_give_clear_errors(argv, message, capsys) -> None:
    assert message in fails(argv, capsys)


def test_bad_data_or_device_or_resume(tiny, tmp_path, capsys) -> None:
    args = tiny_args(tiny, tmp_path / "run")
    data_at = args.index("--data") + 1
    bad_data = [*args[:data_at], "/nonexistent/data", *args[data_at + 1 :]]
    assert "/nonexistent/data" in fails(["train", *bad_data], capsys)
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start
    assert "holds no run to resume" in fails(["train", *args, "--resume"], capsys)
    if not torch.cuda.is_available():
        assert "CUDA is not available" in fails(["train", *args, "--device", "cuda"], capsys)


def test_presets_and_flag_overrides() -> None:
    parser = build_parser()
    quick = config_from_args(parser.parse_args(["train"]))
    assert (quick.lr, quick.batch_sst, quick.epochs) == (QUICK_PRESET["lr"], QUICK_PRESET["batch_sst"],
                                                         QUICK_PRESET["epochs"])
    paper = config_from_args(parser.parse_args(
        ["train", "--preset", "paper", "--smart", "--sts-aug", "--lr", "3e-5", "--tasks", "sst",
         "sts"]))
    assert (paper.batch_sst, paper.batch_para, paper.batch_sts) == (2, 20, 2)
    assert (paper.smart_lambda, paper.smart_epsilon, paper.smart_sigma, paper.bregman_mu,
            paper.smart_eta) == (5.0, 1e-4, 1e-4, 1.0, 1e-2)
    assert paper.epochs == PAPER_PRESET["epochs"] == 10
    assert paper.smart and paper.sts_aug and not paper.pcgrad
    assert paper.lr == 3e-5 and paper.tasks == ("sst", "sts")
    assert (paper.encoder_dropout, paper.head_dropout) == (0.1, 0.3)


def test_train_evaluate_predict_analyze_resume(tiny, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", *tiny_args(tiny, run), "--smart", "--pcgrad", "--sts-aug"]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{"):])
    final = json.loads((run / "final.json").read_text())
    assert final["step"] == 2 and final["config"]["aggregator"] == "pcgrad"
    assert printed["out"] == str(run) and printed["overall"] == final["dev"]["overall"]
    assert printed["best_step"] == final["best"]["step"] == 2

    # A finished run keeps model-only weights; its optimizer checkpoint is gone.
    assert (run / "model.safetensors").is_file() and not (run / "checkpoint.pt").exists()
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run)]) == 0
    assert "sst:" in capsys.readouterr().err  # a progress bar by default
    metrics = json.loads((run / "eval.json").read_text())
    assert {k: metrics[k] for k in final["dev"]} == pytest.approx(final["dev"])
    # eval.json also says what was measured: which weights at which step, on which rows.
    assert (metrics["step"], metrics["weights"]) == (2, "best.safetensors")
    assert metrics["precision"] == final["precision"] == "fp32"  # the run's own by default
    assert metrics["examples"] == {"sst": 6, "para": 5, "sts": 5}
    assert metrics["data_files"]["para"] == str(tiny[1] / "quora-dev.csv")
    assert main(["evaluate", "--run", str(run), "--weights", "last", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert json.loads((run / "eval.json").read_text())["weights"] == "model.safetensors"

    assert main(["predict", "--run", str(run)]) == 0
    assert len(list((run / "predictions").glob("*.csv"))) == 5
    assert main(["analyze", "--run", str(run), "--top", "2"]) == 0
    assert (run / "analysis" / "sst_confusion.png").is_file()

    # Resuming a finished run has nothing left to do and changes nothing.
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    again = json.loads((run / "final.json").read_text())
    assert (again["step"], again["dev"]) == (final["step"], final["dev"])
    # Training again into the same folder without --resume is refused.
    assert "already holds a run" in fails(["train", *tiny_args(tiny, run)], capsys)


def test_module_entry_point_reports_errors() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bert_demo", "train", "--lr", "-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "argument --lr: must be > 0" in result.stderr


def test_ctrl_c_saves_a_checkpoint_after_the_current_step(tiny, tmp_path) -> None:
    """A real SIGINT: the step in flight finishes, the checkpoint is saved, exit code 130."""
    run = tmp_path / "run"
    args = tiny_args(tiny, run)
    args[args.index("--steps-per-epoch") + 1] = "100000"  # far more than the test waits for
    process = subprocess.Popen(
        [sys.executable, "-m", "bert_demo", "train", *args, "--log-every", "1", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() and process.poll() is None:
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "continue with --resume" in out
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert state["step"] >= 1 and state["step"] == logged[-1]


def test_every_flag_says_its_default() -> None:
    """Help text of every option of every command, with its default (issue 13)."""
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, command in commands.items():
        for action in command._actions:
            if action.dest == "help" or action.required:  # --run, export --out: no default
                continue
            text = action.help or ""
            assert "default" in text, (name, action.option_strings, text)


def test_flags_come_from_train_config_fields() -> None:
    """A TrainConfig field is a flag with its metadata's help and the field's default."""
    from dataclasses import fields

    from bert_demo.config import TrainConfig

    train = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    flags: dict[str, Any] = {}
    for action in train._actions:  # the field's own flag (--pcgrad is an alias of --aggregator)
        flags.setdefault(action.dest, action)
    for spec in fields(TrainConfig):
        if spec.name == "extra":
            continue
        assert spec.name in flags, spec.name
        assert spec.metadata["help"] in flags[spec.name].help
    assert "(default: 0.00015; paper preset: 1e-05)" in flags["lr"].help
    assert "(default: mean; paper preset: cls)" in flags["pooling"].help


def test_ablate_exits_1_naming_a_failed_run(monkeypatch, capsys, tmp_path) -> None:
    import bert_demo.ablation.ablate

    seen: dict[str, object] = {}

    def failing(base, out, seeds, **kwargs):
        seen.update(kwargs)
        raise bert_demo.ablation.ablate.AblationFailed("1 ablation run(s) failed: smart/seed0 (boom)")

    monkeypatch.setattr(bert_demo.ablation.ablate, "run_ablation", failing)
    code = main(["ablate", "--out", str(tmp_path), "--jobs", "2", "--threads", "2",
                 "--no-progress"])
    assert code == 1
    assert "smart/seed0 (boom)" in capsys.readouterr().err
    assert seen["jobs"] == 2 and seen["threads"] == 2
    assert "must be >= 1, got '0'" in fails(["ablate", "--jobs", "0"], capsys)
