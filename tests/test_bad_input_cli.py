"""`python -m bert_demo` against bad input: exit status 2, a message naming the flag or
file:line, no traceback, and nothing on disk lost or half-written (issue 11, items 3-9).

Every case runs the CLI in-process on the tiny model and data of demo_fixtures.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from demo_fixtures import write_tiny_data, write_tiny_model

from bert_demo.cli import main
from bert_demo.config import TrainConfig
from bert_demo.training.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(root / "model"), write_tiny_data(root / "data")


def tiny_args(tiny: tuple[Path, Path], out: Path, *, steps_per_epoch: int = 2,
              epochs: int = 1) -> list[str]:
    model_dir, data_dir = tiny
    return ["--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
            "--batch-sst", "3", "--batch-para", "2", "--batch-sts", "2", "--max-length", "16",
            "--epochs", str(epochs), "--steps-per-epoch", str(steps_per_epoch),
            "--eval-batch-size", "4", "--log-every", "1", "--no-progress"]


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag``'s value replaced (or the flag appended)."""
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``python -m bert_demo ARGV``, run in-process."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], *names: str) -> str:
    """Run the CLI, expect exit 2 with every one of ``names`` in the message, no traceback."""
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    for name in names:
        assert name in err, (name, err)
    return err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and a hash of its bytes."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-step run, copied by the tests that damage it.

    It keeps its checkpoint (a finished run deletes it otherwise) so that --resume
    can extend it and the damaged-checkpoint cases have one to damage.
    """
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *tiny_args(tiny, run), "--keep-checkpoint"]) == 0
    return run


def interrupted_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of the run as it was before it finished: checkpoint.pt is all it has, so
    every command (evaluate, predict, --resume) reads the checkpoint."""
    run = copy_run(trained_run, tmp_path)
    for name in ("final.json", "model.safetensors", "best.safetensors"):
        (run / name).unlink()
    return run


def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def copy_data(tiny: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny[1], tmp_path / "data"))


# --------------------------------------------------------------------------- item 3


NUMERIC_FIELDS = [f.name for f in fields(TrainConfig)
                  if f.type in ("int", "float", "int | None", "float | None")]


@pytest.mark.parametrize("name", NUMERIC_FIELDS)
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_every_numeric_setting_is_checked_at_the_cli(tiny, tmp_path, capsys, name, value) -> None:
    """nan and inf are never a setting; -1 is out of range for every one of them."""
    out = tmp_path / "run"
    flag = "--" + name.replace("_", "-")
    refused(["train", *with_flag(tiny_args(tiny, out), flag, value)], capsys, f"argument {flag}")
    assert not out.exists()


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--lr", "nan", "must be a finite number"),
        ("--lr", "inf", "must be a finite number"),
        ("--smart-lambda", "nan", "must be a finite number"),
        ("--weight-decay", "-1", "must be >= 0"),
        ("--head-lr", "0", "must be > 0"),
        ("--encoder-dropout", "1", "must be in [0, 1)"),
        ("--max-eval-examples", "0", "must be >= 1"),
    ],
)
@pytest.mark.parametrize("methods", [[], ["--pcgrad", "--smart"]])
def test_reported_invalid_hyperparameters(tiny, tmp_path, capsys, flag, value, expected,
                                          methods) -> None:
    out = tmp_path / "run"
    refused(["train", *with_flag(tiny_args(tiny, out), flag, value), *methods], capsys,
            f"argument {flag}: {expected}")
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["evaluate", "--run", "RUN", "--max-eval-examples", "0"], "--max-eval-examples"),
        (["analyze", "--run", "RUN", "--top", "0"], "--top"),
    ],
)
def test_other_commands_check_their_numbers(argv, flag, capsys) -> None:
    refused(argv, capsys, f"argument {flag}: must be >= 1")


@pytest.mark.parametrize("pcgrad", [False, True])
def test_a_run_that_diverges_fails_and_keeps_its_checkpoint(tiny, tmp_path, capsys,
                                                            pcgrad) -> None:
    """A finite but absurd lr: the first checkpoint is written, then the loss turns NaN."""
    run = tmp_path / "run"
    args = [*tiny_args(tiny, run, steps_per_epoch=1, epochs=4), "--lr", "1e30", "--head-lr", "1e30"]
    code, _, err = run_cli(["train", *args, *(["--pcgrad"] if pcgrad else [])], capsys)
    assert code == 1
    assert "training diverged at step" in err and "not finite" in err and "Traceback" not in err
    assert "checkpoint.pt keeps step 1" in err
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (run / "final.json").exists()
    assert not list(run.glob("*.tmp"))


# --------------------------------------------------------------------------- item 4


def test_too_few_dev_rows_for_pearson_is_refused_before_training(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    refused(["train", *tiny_args(tiny, out), "--max-eval-examples", "1"], capsys,
            "sts-dev.csv", "--max-eval-examples 1", "sts_pearson needs at least 2")
    assert not out.exists()


@pytest.mark.parametrize("command", ["evaluate", "analyze"])
def test_too_few_dev_rows_for_pearson_after_training(trained_run, tmp_path, capsys,
                                                     command) -> None:
    run = copy_run(trained_run, tmp_path)
    before = snapshot(run)
    refused([command, "--run", str(run), "--max-eval-examples", "1"], capsys,
            "sts-dev.csv", "--max-eval-examples 1", "sts_pearson needs at least 2")
    assert snapshot(run) == before


@pytest.mark.parametrize("name", ["sts-dev.csv", "ids-sst-dev.csv", "quora-dev.csv"])
def test_a_header_only_dev_file_is_refused_before_training(tiny, tmp_path, capsys, name) -> None:
    data = copy_data(tiny, tmp_path)
    header = (data / name).read_text().splitlines()[0]
    (data / name).write_text(header + "\n")
    out = tmp_path / "run"
    refused(["train", *with_flag(tiny_args(tiny, out), "--data", str(data))], capsys,
            str(data / name), "0 dev row(s)")
    assert not out.exists()


def test_an_evaluation_error_keeps_the_trained_weights(tiny, tmp_path, monkeypatch) -> None:
    """The checkpoint is written before the epoch-end evaluation, which may still fail."""
    model_dir, data_dir = tiny
    config = TrainConfig(model=str(model_dir), data=str(data_dir), batch_sst=3, batch_para=2,
                         batch_sts=2, max_length=16, epochs=1, steps_per_epoch=2,
                         eval_batch_size=4)
    trainer = Trainer(config, tmp_path / "run", progress=False)

    def broken_evaluation() -> dict[str, float]:
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(trainer, "evaluate", broken_evaluation)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        trainer.run()
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    trained = trainer.model.state_dict()
    assert all(torch.equal(state["model"][k], trained[k]) for k in trained)


# --------------------------------------------------------------------------- item 7


def test_a_field_over_the_csv_limit_names_file_and_line(tiny, tmp_path, capsys,
                                                       trained_run) -> None:
    data = copy_data(tiny, tmp_path)
    train_file = data / "ids-sst-train.csv"
    rows = train_file.read_text().splitlines()
    rows.insert(3, "99\tlong\t" + "y" * 140_000 + "\t2")
    train_file.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    refused(["train", *with_flag(tiny_args(tiny, out), "--data", str(data))], capsys,
            f"{train_file}:4:", "field larger than field limit")
    assert not out.exists()
    # predict on such a file
    run = copy_run(trained_run, tmp_path)
    before = snapshot(run)
    refused(["predict", "--run", str(run), "--input", str(train_file)], capsys,
            f"{train_file}:4:")
    assert snapshot(run) == before


def test_a_header_only_training_file_names_the_file(tiny, tmp_path, capsys) -> None:
    data = copy_data(tiny, tmp_path)
    train_file = data / "quora-train.csv"
    train_file.write_text(train_file.read_text().splitlines()[0] + "\n")
    out = tmp_path / "run"
    refused(["train", *with_flag(tiny_args(tiny, out), "--data", str(data))], capsys,
            f"{train_file}: no training rows")
    assert not out.exists()


def test_non_utf8_data_names_file_and_line(tiny, tmp_path, capsys) -> None:
    data = copy_data(tiny, tmp_path)
    train_file = data / "sts-train.csv"
    lines = train_file.read_bytes().split(b"\n")
    lines[4] = lines[4].replace(b"a", b"\xff", 1)
    train_file.write_bytes(b"\n".join(lines))
    refused(["train", *with_flag(tiny_args(tiny, tmp_path / "run"), "--data", str(data))],
            capsys, f"{train_file}:5: not UTF-8")


@pytest.mark.parametrize("damage", ["truncated", "junk", "foreign"])
@pytest.mark.parametrize("command", ["evaluate", "predict", "resume"])
def test_a_damaged_checkpoint_names_the_file(tiny, trained_run, tmp_path, capsys, damage,
                                             command) -> None:
    run = interrupted_copy(trained_run, tmp_path)
    checkpoint = run / "checkpoint.pt"
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    elif damage == "junk":
        checkpoint.write_bytes(b"not a checkpoint at all")
    else:
        torch.save({"weights": torch.zeros(2)}, checkpoint)
    before = snapshot(run)
    argv = {"evaluate": ["evaluate", "--run", str(run)],
            "predict": ["predict", "--run", str(run)],
            "resume": ["train", "--out", str(run), "--resume", "--no-progress"]}[command]
    refused(argv, capsys, str(checkpoint))
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", ["truncated", "junk", "foreign"])
@pytest.mark.parametrize(("command", "weights"), [
    ("evaluate", "best"), ("evaluate", "last"), ("predict", "best"), ("export", "last")])
def test_damaged_run_weights_name_the_file(trained_run, tmp_path, capsys, damage, command,
                                           weights) -> None:
    """best.safetensors / model.safetensors of a finished run, read by every command."""
    from safetensors.torch import save_file

    run = copy_run(trained_run, tmp_path)
    damaged = run / {"best": "best.safetensors", "last": "model.safetensors"}[weights]
    if damage == "truncated":
        damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    elif damage == "junk":
        damaged.write_bytes(b"not weights at all")
    else:
        save_file({"weights": torch.zeros(2)}, str(damaged))  # safetensors, not a run's
    before = snapshot(run)
    argv = {"evaluate": ["evaluate", "--run", str(run)],
            "predict": ["predict", "--run", str(run)],
            "export": ["export", "--run", str(run), "--out", str(tmp_path / "exported")],
            }[command]
    refused([*argv, "--weights", weights], capsys, str(damaged))
    assert snapshot(run) == before
    assert not (tmp_path / "exported").exists()


def test_a_corrupt_model_safetensors_names_the_file(tiny, tmp_path, capsys) -> None:
    model = Path(shutil.copytree(tiny[0], tmp_path / "model"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = tmp_path / "run"
    refused(["train", *with_flag(tiny_args(tiny, out), "--model", str(model))], capsys,
            str(weights))
    assert not out.exists()


def test_a_bad_model_config_json_names_file_and_line(tiny, tmp_path, capsys) -> None:
    model = Path(shutil.copytree(tiny[0], tmp_path / "model"))
    config = model / "config.json"
    config.write_text('{\n  "hidden_size": 16,\n  "num_hidden_layers": ,\n}\n')
    out = tmp_path / "run"
    refused(["train", *with_flag(tiny_args(tiny, out), "--model", str(model))], capsys,
            f"{config}:3: not valid JSON")
    assert not out.exists()


@pytest.mark.parametrize("where", ["existing file", "under a file"])
def test_out_where_no_folder_can_be(tiny, tmp_path, capsys, where) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("keep me\n")
    out = blocker if where == "existing file" else blocker / "run"
    refused(["train", *tiny_args(tiny, out)], capsys, f"--out {out}")
    assert blocker.read_text() == "keep me\n"


def test_out_on_a_read_only_folder(tiny, tmp_path, capsys, monkeypatch) -> None:
    """A read-only filesystem (simulated: root ignores permission bits)."""
    out = tmp_path / "readonly" / "run"
    original_mkdir = Path.mkdir

    def read_only_mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self == out or (out.is_relative_to(self) and self != tmp_path):
            raise OSError(30, "Read-only file system", str(self))
        original_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    refused(["train", *tiny_args(tiny, out)], capsys, f"--out {out}", "Read-only file system")


@pytest.mark.parametrize("where", ["existing file", "under a file"])
def test_predict_output_where_no_folder_can_be(trained_run, tmp_path, capsys, where) -> None:
    run = copy_run(trained_run, tmp_path)
    blocker = tmp_path / "taken"
    blocker.write_text("keep me\n")
    output = blocker if where == "existing file" else blocker / "predictions"
    before = snapshot(run)
    refused(["predict", "--run", str(run), "--output", str(output)], capsys,
            f"--output {output}")
    assert blocker.read_text() == "keep me\n"
    assert snapshot(run) == before


@pytest.mark.parametrize("command", ["train", "evaluate", "predict"])
def test_an_unknown_device_names_the_flag(tiny, trained_run, tmp_path, capsys,
                                          command) -> None:
    argv = {"train": ["train", *tiny_args(tiny, tmp_path / "new")],
            "evaluate": ["evaluate", "--run", str(trained_run)],
            "predict": ["predict", "--run", str(trained_run)]}[command]
    refused([*argv, "--device", "tpu9"], capsys, "--device tpu9")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(("key", "value"), [("lr", "fast"), ("epochs", 1.5), ("tasks", "sst")])
def test_a_wrongly_typed_saved_setting_names_config_json(trained_run, tmp_path, capsys, key,
                                                         value) -> None:
    run = copy_run(trained_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config[key] = value
    (run / "config.json").write_text(json.dumps(config))
    before = snapshot(run)
    refused(["train", "--out", str(run), "--resume", "--no-progress"], capsys,
            str(run / "config.json"), key)
    assert snapshot(run) == before


# --------------------------------------------------------------------------- item 8


def test_predict_answers_rows_with_an_empty_question(trained_run, tmp_path, capsys) -> None:
    run = copy_run(trained_run, tmp_path)
    questions = tmp_path / "quora-empty.csv"
    questions.write_text("\tid\tsentence1\tsentence2\n"
                         "0\tq0\thow do i learn to cook ?\t\n"
                         "1\tq1\t\tis the film good ?\n"
                         "2\tq2\tis the film good ?\tis the film boring ?\n")
    output = tmp_path / "predictions.csv"
    code, _, err = run_cli(["predict", "--run", str(run), "--input", str(questions),
                            "--task", "para", "--output", str(output)], capsys)
    assert code == 0, err
    rows = output.read_text().splitlines()
    assert rows[0] == "id,predicted_is_duplicate,prob_is_duplicate"
    assert [r.split(",")[0] for r in rows[1:]] == ["q0", "q1", "q2"]
    assert all(0.0 <= float(r.split(",")[2]) <= 1.0 for r in rows[1:])


def test_training_skips_empty_questions_with_one_warning_at_the_data_file(
    tiny, tmp_path, capsys
) -> None:
    data = copy_data(tiny, tmp_path)
    train_file = data / "quora-train.csv"
    lines = train_file.read_text().splitlines()
    first = lines[2].split("\t")
    first[3] = ""  # line 3: an empty sentence2
    lines[2] = "\t".join(first)
    label = lines[5].split("\t")
    label[4] = ""  # line 6: an empty label
    lines[5] = "\t".join(label)
    train_file.write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run_cli(["train", *with_flag(tiny_args(tiny, tmp_path / "run"),
                                                    "--data", str(data))], capsys)
    assert code == 0, err
    about_file = [w for w in caught if str(train_file) in str(w.message)]
    assert len(about_file) == 1
    warning = about_file[0]
    assert "empty 'sentence2' (line 3)" in str(warning.message)
    assert "empty 'is_duplicate' label (line 6)" in str(warning.message)
    # Shown as located in the data file, not in bert_demo's source.
    assert (warning.filename, warning.lineno) == (str(train_file), 3)


# --------------------------------------------------------------------------- item 9


def test_resume_refuses_a_changed_setting(trained_run, tmp_path, capsys) -> None:
    run = copy_run(trained_run, tmp_path)
    before = snapshot(run)
    refused(["train", "--out", str(run), "--resume", "--no-progress", "--lr", "5"], capsys,
            "--lr 5", "refusing")
    refused(["train", "--out", str(run), "--resume", "--no-progress", "--preset", "paper"],
            capsys, "--preset")
    assert snapshot(run) == before


def test_resume_refuses_other_numerics_but_not_other_threads(trained_run, tmp_path,
                                                            capsys) -> None:
    """--precision and --adamw-impl change the numbers a run computes, so a resumed run
    keeps them; --threads only changes how fast it computes them."""
    run = copy_run(trained_run, tmp_path)
    saved = json.loads((run / "config.json").read_text())
    other_precision = "bf16" if saved["precision"] != "bf16" else "fp32"
    other_impl = "foreach" if saved["adamw_impl"] != "foreach" else "for-loop"
    before = snapshot(run)
    refused(["train", "--out", str(run), "--resume", "--no-progress", "--precision",
             other_precision], capsys, f"--precision {other_precision}", "refusing")
    refused(["train", "--out", str(run), "--resume", "--no-progress", "--adamw-impl",
             other_impl], capsys, f"--adamw-impl {other_impl}", "refusing")
    assert snapshot(run) == before
    threads = torch.get_num_threads()
    try:
        code, _, err = run_cli(["train", "--out", str(run), "--resume", "--no-progress",
                                "--threads", str(threads + 1)], capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert snapshot(run) == before  # finished with its checkpoint kept: nothing to redo


def test_resume_applies_more_steps_and_says_so(trained_run, tmp_path, capsys) -> None:
    run = copy_run(trained_run, tmp_path)
    code, out, err = run_cli(["train", "--out", str(run), "--resume", "--no-progress",
                              "--max-steps", "3", "--epochs", "2", "--keep-checkpoint"], capsys)
    assert code == 0, err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 3
    assert "--max-steps 3 (was none)" in out and "--epochs 2 (was 1)" in out
    assert json.loads((run / "final.json").read_text())["step"] == 3
    assert json.loads((run / "config.json").read_text())["max_steps"] == 3
    # Fewer steps than the checkpoint has done cannot be honoured.
    refused(["train", "--out", str(run), "--resume", "--no-progress", "--max-steps", "2"],
            capsys, "past the 2 steps")


def test_resume_of_a_finished_run_without_its_checkpoint(tiny, tmp_path, capsys) -> None:
    """Nothing to do with its own settings; more steps need the deleted checkpoint."""
    run = tmp_path / "run"
    assert main(["train", *tiny_args(tiny, run)]) == 0
    assert not (run / "checkpoint.pt").exists()
    capsys.readouterr()
    before = snapshot(run)
    code, out, err = run_cli(["train", "--out", str(run), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads(out[out.index("{"):])["out"] == str(run)
    assert snapshot(run) == before
    refused(["train", "--out", str(run), "--resume", "--no-progress", "--max-steps", "3"],
            capsys, "--max-steps", "finished at step 2", "checkpoint.pt was deleted",
            "--keep-checkpoint")
    refused(["train", "--out", str(run), "--resume", "--no-progress", "--lr", "5"], capsys,
            "--lr 5", "refusing")
    assert snapshot(run) == before


def test_resume_of_a_finished_run_that_kept_its_checkpoint_changes_nothing(
    trained_run, tmp_path, capsys
) -> None:
    run = copy_run(trained_run, tmp_path)
    before = snapshot(run)
    code, _, err = run_cli(["train", "--out", str(run), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert snapshot(run) == before  # the kept checkpoint included


def test_resume_after_a_crash_leaves_no_duplicate_metrics(tiny, tmp_path, capsys) -> None:
    """A crash after the step-2 checkpoint logged step 3; the resumed run logs it again."""
    straight = tmp_path / "straight"
    args = tiny_args(tiny, straight, steps_per_epoch=2, epochs=2)
    assert main(["train", *args]) == 0
    config = TrainConfig.from_dict(json.loads((straight / "config.json").read_text()))
    crashed = tmp_path / "crashed"

    def crash(step: int) -> None:
        if step == 3:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        Trainer(config, crashed, progress=False, on_step=crash).run()
    steps = [json.loads(line)["step"] for line in (crashed / "metrics.jsonl").open()]
    assert steps[-1] == 3 and torch.load(crashed / "checkpoint.pt", weights_only=True)["step"] == 2

    assert main(["train", "--out", str(crashed), "--resume", "--no-progress"]) == 0
    capsys.readouterr()

    def records(run: Path) -> list[dict[str, object]]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"}
                for line in lines]

    assert records(crashed) == records(straight)  # bit for bit, without duplicates
