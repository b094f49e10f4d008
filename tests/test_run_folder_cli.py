"""Run folders a user can trust (issue 21): what a run folder holds must not steer writes or
copies outside it, a full disk is one clear line, and the folder is left as it was."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from demo_fixtures import tiny_args, write_tiny_data, write_tiny_model

from bert_demo.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(root / "model"), write_tiny_data(root / "data")



@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run that kept its checkpoint (so it can be resumed with more epochs)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *tiny_args(tiny, run), "--keep-checkpoint"]) == 0
    return run


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy, symlinks=True)
    return copy


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the run (think ~/.bashrc) that nothing may overwrite or leak."""
    path = tmp_path / "outside" / "precious.txt"
    path.parent.mkdir()
    path.write_text("the user's own file\n")
    return path


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


# ---------------------------------------------------------------- 1. symbolic links


def test_evaluate_never_writes_through_a_planted_tmp_link(run, victim) -> None:
    (run / "eval.json.tmp").symlink_to(victim)
    assert main(["evaluate", "--run", str(run), "--no-progress"]) == 0
    assert victim.read_text() == "the user's own file\n"
    assert (run / "eval.json").is_file() and not (run / "eval.json").is_symlink()


def test_every_run_file_save_ignores_planted_tmp_links(tiny, run, victim) -> None:
    # config.json, checkpoint.pt, the safetensors files, final.json, the dev predictions:
    # a resumed run writes all of them; none may follow a link at a fixed temporary name.
    names = ("config.json", "checkpoint.pt", "best.safetensors", "model.safetensors",
             "final.json", "dev_predictions.csv.gz", "metrics.jsonl")
    for name in names:
        (run / f"{name}.tmp").symlink_to(victim)
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress",
                 "--keep-checkpoint"]) == 0
    assert victim.read_text() == "the user's own file\n"
    for name in names:
        assert (run / name).is_file() and not (run / name).is_symlink(), name


def test_a_linked_metrics_file_is_refused_naming_it(run, victim, capsys) -> None:
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(victim)
    assert _exit_code(["train", "--out", str(run), "--resume", "--epochs", "2",
                       "--no-progress"]) == 2
    assert f"{run / 'metrics.jsonl'} is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "the user's own file\n"


def test_analyze_refuses_a_linked_report(run, victim, capsys) -> None:
    (run / "analysis").mkdir()
    (run / "analysis" / "errors.md").symlink_to(victim)
    assert _exit_code(["analyze", "--run", str(run), "--no-progress"]) == 2
    assert f"{run / 'analysis' / 'errors.md'} is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "the user's own file\n"


def test_analyze_refuses_a_linked_analysis_folder(run, victim, capsys) -> None:
    (run / "analysis").symlink_to(victim.parent, target_is_directory=True)
    assert _exit_code(["analyze", "--run", str(run), "--no-progress"]) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert sorted(p.name for p in victim.parent.iterdir()) == ["precious.txt"]


def test_export_copies_only_the_files_it_knows(run, victim, tmp_path) -> None:
    (run / "encoder" / "notes.txt").symlink_to(victim)
    (run / "encoder" / "extra.json").write_text('{"private": true}')
    out = tmp_path / "exported"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "notes.txt" not in names and "extra.json" not in names
    assert not any("the user's own file" in p.read_text(errors="replace") for p in out.iterdir())
    assert {"config.json", "vocab.txt", "model.safetensors", "heads.safetensors"} <= set(names)


def test_export_refuses_a_linked_tokenizer_file(run, victim, tmp_path, capsys) -> None:
    vocab = run / "encoder" / "vocab.txt"
    vocab.unlink()
    vocab.symlink_to(victim)
    out = tmp_path / "exported"
    assert _exit_code(["export", "--run", str(run), "--out", str(out)]) == 2
    assert f"{vocab} is a symbolic link" in capsys.readouterr().err
    assert not out.exists()


def test_export_follows_the_umask(run, tmp_path) -> None:
    out = tmp_path / "exported"
    old = os.umask(0o022)
    try:
        assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        p.name: 0o644 for p in out.iterdir()}


# ---------------------------------------------------------------- 7. a full disk


@pytest.fixture
def full_disk(monkeypatch):
    """Every write of more than ``limit`` bytes fails with ENOSPC, as on a full disk."""
    import bert_demo.run_folder.safe_write as safe_write

    state = {"limit": 1 << 40}
    real = safe_write.write_chunk

    def write_chunk(fd: int, data: memoryview) -> int:
        if len(data) > state["limit"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(safe_write, "write_chunk", write_chunk)
    return state


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_train_on_a_full_disk_says_so_in_one_line(tiny, tmp_path, full_disk, capsys) -> None:
    run = tmp_path / "run"
    full_disk["limit"] = 20_000  # the small JSON files fit, the checkpoint does not
    assert _exit_code(["train", *tiny_args(tiny, run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        f"python -m bert_demo: error: {run / 'checkpoint.pt'}: no space left on device"]
    assert not (run / "checkpoint.pt").exists()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_leaves_the_run_as_it_was(run, full_disk, capsys) -> None:
    before = _listing(run)
    full_disk["limit"] = 0
    assert _exit_code(["train", "--out", str(run), "--resume", "--epochs", "2",
                       "--no-progress"]) == 1
    assert "no space left on device" in capsys.readouterr().err
    assert _listing(run) == before


def test_evaluate_on_a_full_disk_names_the_file(run, full_disk, capsys) -> None:
    full_disk["limit"] = 0
    assert _exit_code(["evaluate", "--run", str(run), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"python -m bert_demo: error: {run / 'eval.json'}: no space left on device")
    assert not (run / "eval.json").exists()


def test_export_on_a_full_disk_names_the_file(run, full_disk, tmp_path, capsys) -> None:
    full_disk["limit"] = 20_000
    out = tmp_path / "exported"
    assert _exit_code(["export", "--run", str(run), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no space left on device" in err
    assert f"{out / 'model.safetensors'}: no space left on device" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["run"]


# ---------------------------------------------------------------- 2. --out that is not a run


@pytest.mark.parametrize("kind", ["project", "model folder"])
def test_train_refuses_a_folder_that_is_not_a_run(tiny, tmp_path, kind, capsys) -> None:
    folder = tmp_path / "folder"
    if kind == "project":
        (folder / "encoder").mkdir(parents=True)
        (folder / "encoder" / "notes.txt").write_text("mine")
        for name in ("metrics.jsonl", "final.json", "best.safetensors", "README.md",
                     "dev_predictions.csv.gz"):
            (folder / name).write_text(f"the user's {name}")
        (folder / "config.json").write_text('{"name": "my project"}')
    else:  # a Hugging Face model folder: config.json, weights, vocab.txt (no checkpoint)
        write_tiny_model(folder)
    before = _listing(folder)
    assert _exit_code(["train", *tiny_args(tiny, folder)]) == 2
    err = capsys.readouterr().err
    assert f"--out {folder} is not empty and holds no bert_demo run" in err
    assert _listing(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        {name.split("/")[0] for name in before})


def test_train_into_an_empty_folder_or_a_never_checkpointed_run(tiny, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", *tiny_args(tiny, empty)]) == 0
    # A run that stopped before its first checkpoint is a run: training again replaces it.
    for name in ("checkpoint.pt", "model.safetensors", "final.json", "best.safetensors",
                 "best.json", "dev_predictions.csv.gz"):
        (empty / name).unlink(missing_ok=True)
    assert main(["train", *tiny_args(tiny, empty)]) == 0


# ---------------------------------------------------------------- 3. one writer at a time

_HOLD = """
import sys, time
from pathlib import Path
from bert_demo.run_folder.lock import RunLock
lock = RunLock(Path(sys.argv[1])).acquire("train")
print("held", flush=True)
time.sleep(120)
"""


def _holder(folder: Path) -> subprocess.Popen[str]:
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "held\n"
    return process


def test_a_second_writer_is_refused_naming_the_holder(tiny, run, capsys) -> None:
    holder = _holder(run)
    try:
        assert _exit_code(["train", "--out", str(run), "--resume", "--epochs", "2",
                           "--no-progress"]) == 2
        assert f"{run} is in use by pid {holder.pid}" in capsys.readouterr().err
        assert _exit_code(["evaluate", "--run", str(run), "--no-progress"]) == 2
        assert f"in use by pid {holder.pid}" in capsys.readouterr().err
        assert not (run / "eval.json").exists()
        new = run.parent / "new"
        holder_new = _holder(new)
        try:
            assert _exit_code(["train", *tiny_args(tiny, new)]) == 2
            assert f"in use by pid {holder_new.pid}" in capsys.readouterr().err
        finally:
            holder_new.kill()
            holder_new.wait()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_process_does_not_block(run) -> None:
    holder = _holder(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (run / ".lock").is_file()  # the file stays; the lock went with the process
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert not (run / ".lock").exists()
    assert json.loads((run / "final.json").read_text())["step"] == 4


# ---------------------------------------------------------------- 4. best weights + predictions


def _best_predictions_bytes(run: Path) -> bytes:
    """What evaluating best.safetensors on dev gives, as dev_predictions.csv.gz's bytes."""
    from bert_demo.evaluation.evaluate import evaluate_with_predictions
    from bert_demo.run_folder.dev_predictions import dev_predictions_bytes
    from bert_demo.run_folder.run_dir import load_run
    from bert_demo.tasks import model_tasks
    from bert_demo.tasks.data import load_split

    trained = load_run(run, "cpu", "best")
    config = trained.config
    dev = load_split(Path(config.data), model_tasks(config.tasks), "dev", None,
                     random_subset=False)
    _, predictions = evaluate_with_predictions(trained.model, dev, trained.tokenizer,
                                               config.max_length, config.eval_batch_size, "cpu")
    return dev_predictions_bytes(predictions)


def test_a_crash_between_best_weights_and_predictions_is_repaired_on_resume(
        tiny, tmp_path, monkeypatch) -> None:
    import bert_demo.run_folder.folder as folder_module

    run = tmp_path / "run"
    real = folder_module.dev_predictions_bytes

    def killed(*args: object) -> bytes:
        raise KeyboardInterrupt  # as if killed after best.safetensors was written

    monkeypatch.setattr(folder_module, "dev_predictions_bytes", killed)
    assert main(["train", *tiny_args(tiny, run), "--epochs", "2"]) == 130
    assert (run / "best.safetensors").is_file() and not (run / "best.json").exists()
    monkeypatch.setattr(folder_module, "dev_predictions_bytes", real)
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    final = json.loads((run / "final.json").read_text())
    unit = json.loads((run / "best.json").read_text())
    assert unit["step"] == final["best"]["step"]
    assert (run / "dev_predictions.csv.gz").read_bytes() == _best_predictions_bytes(run)


def test_stale_predictions_beside_new_best_weights_are_repaired_on_resume(tiny, run) -> None:
    # best.safetensors from a later evaluation than dev_predictions.csv.gz (the issue's
    # crash, in a run written before best.json existed): resume evaluates the best again.
    (run / "best.json").unlink()
    predictions = run / "dev_predictions.csv.gz"
    predictions.write_bytes(gzip.compress(b"task,id,prediction,gold\nsst,s1,0,4\n", mtime=0))
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert predictions.read_bytes() == _best_predictions_bytes(run)


def test_ablate_refuses_predictions_that_are_not_the_best_weights(tiny, finished, tmp_path,
                                                                  capsys) -> None:
    out = tmp_path / "ablation"
    run = out / "finetune" / "seed0"
    shutil.copytree(finished, run)
    (run / "dev_predictions.csv.gz").write_bytes(
        gzip.compress(b"task,id,prediction,gold\nsst,s1,0,4\n", mtime=0))
    assert _exit_code(["ablate", *tiny_args(tiny, out), "--table-only", "--rows",
                       "finetune"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'dev_predictions.csv.gz'} is not the step-2 predictions" in err


# ---------------------------------------------------------------- 8. smaller ones


def test_a_checkpoint_that_final_json_says_is_gone_is_removed(tiny, tmp_path, finished) -> None:
    run = tmp_path / "run"
    assert main(["train", *tiny_args(tiny, run)]) == 0
    assert json.loads((run / "final.json").read_text())["weights"]["checkpoint"] is None
    shutil.copy(finished / "checkpoint.pt", run / "checkpoint.pt")  # the crash left it
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert not (run / "checkpoint.pt").exists()


def test_the_train_record_after_a_resume_averages_the_whole_window(tiny, tmp_path) -> None:
    def records(run: Path) -> list[dict[str, object]]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["event"] == "train"]

    args = ["--epochs", "2", "--log-every", "3"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main(["train", *tiny_args(tiny, straight), *args]) == 0

    from bert_demo.training import train as train_module

    real_train = train_module.train

    def stop_at_2(config, out, **kwargs):  # Ctrl-C after step 2's checkpoint
        def on_step(step: int) -> None:
            if step == 2:
                raise KeyboardInterrupt
        return real_train(config, out, on_step=on_step, **kwargs)

    import bert_demo.training.train

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bert_demo.training.train, "train", stop_at_2)
        assert main(["train", *tiny_args(tiny, cut), *args]) == 130
    assert main(["train", "--out", str(cut), "--resume", "--no-progress"]) == 0
    keep = ("step", "loss_sst", "loss_para", "loss_sts")
    assert [{k: r[k] for k in keep} for r in records(cut)] == [
        {k: r[k] for k in keep} for r in records(straight)]


def test_a_utf8_bom_before_the_header_is_read(run, tmp_path, tiny) -> None:
    # Saved by a spreadsheet: a BOM, then the header's first column, `id` (no index column).
    rows = [line.split("\t", 1)[1] for line in (tiny[1] / "ids-sst-dev.csv").read_text().splitlines()]
    assert rows[0] == "id\tsentence\tsentiment"
    path = tmp_path / "bom-sst-dev.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode() + b"\n")
    out = tmp_path / "out.csv"
    assert main(["predict", "--run", str(run), "--input", str(path), "--task", "sst",
                 "--output", str(out), "--no-progress"]) == 0
    assert out.read_text().splitlines()[0].startswith("id,")
    assert len(out.read_text().splitlines()) == 1 + 6


def test_single_task_runs_pick_best_weights_by_their_own_task() -> None:
    from bert_demo.run_folder.weights import selection_score

    metrics = {"sst_acc": 0.2, "para_acc": 0.9, "sts_pearson": 0.9, "overall": 0.6}
    later = {"sst_acc": 0.4, "para_acc": 0.1, "sts_pearson": -0.9, "overall": 0.2}
    assert selection_score(later, ("sst",)) > selection_score(metrics, ("sst",))
    assert selection_score(metrics, ("sst", "para", "sts")) == 0.6
    assert selection_score(later, ("sst", "sts")) == pytest.approx((0.4 + 0.05) / 2)


# ---------------------------------------------------------------- 5. ablate reuses only its own runs


def test_ablate_refuses_runs_trained_with_other_settings(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "ablation"
    common = tiny_args(tiny, out)
    assert main(["ablate", *common, "--rows", "finetune", "--seeds", "1", "--max-steps", "2"]) == 0
    table = (out / "ablation.md").read_text()
    capsys.readouterr()
    assert _exit_code(["ablate", *common, "--rows", "finetune", "--seeds", "2", "--max-steps", "3",
                       "--lr", "1e-4"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'finetune' / 'seed0'} was trained with other settings" in err
    assert "lr 0.0001 (the run has 0.00015)" in err and "max_steps 3 (the run has 2)" in err
    assert not (out / "finetune" / "seed1").exists()
    assert (out / "ablation.md").read_text() == table
    # --table-only cannot summarize them under other settings either.
    assert _exit_code(["ablate", *common, "--rows", "finetune", "--lr", "1e-4",
                       "--table-only"]) == 2
    # The settings they were trained with reuse them (nothing is trained again).
    assert main(["ablate", *common, "--rows", "finetune", "--seeds", "1", "--max-steps", "2",
                 "--threads", "1"]) == 0
    assert "seed 0 ->" not in capsys.readouterr().out


# ---------------------------------------------------------------- the committed results

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("folder", ["precision-bf16", pytest.param("ablation",
                                                                   marks=pytest.mark.slow)])
def test_committed_results_regenerate_byte_identical_tables(folder, tmp_path,
                                                            monkeypatch) -> None:
    """Run folders written by earlier code (no weights, no best.json, `pcgrad: true`) are
    read, recognized as finished and give the committed table again, byte for byte."""
    source = REPO / "results" / folder
    copy = tmp_path / "results" / folder
    shutil.copytree(source, copy)
    table = (source / "ablation.md").read_text()
    made_by = next(line for line in table.splitlines() if line.startswith("Made by: `"))
    argv = made_by[len("Made by: `python -m bert_demo "):-1].split()
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--table-only"]) == 0
    assert (copy / "ablation.md").read_text() == table
    assert (copy / "ablation.json").read_bytes() == (source / "ablation.json").read_bytes()


# ---------------------------------------------------------------- 6. predict's output names


def test_predict_refuses_two_inputs_with_one_output_name(run, tiny, tmp_path, capsys) -> None:
    first, second = tmp_path / "a" / "batch.csv", tmp_path / "b" / "batch.csv"
    for path, rows in ((first, 3), (second, 5)):
        path.parent.mkdir()
        lines = (tiny[1] / "ids-sst-dev.csv").read_text().splitlines()
        path.write_text("\n".join(lines[: rows + 1]) + "\n")
    out = tmp_path / "out"
    assert _exit_code(["predict", "--run", str(run), "--input", str(first), str(second),
                       "--task", "sst", "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--input {first} and {second} would both write {out / 'batch-predictions.csv'}" in err
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------- --aggregator, one setting


def test_aggregator_is_one_setting_with_pcgrad_as_an_alias(tiny, tmp_path, capsys) -> None:
    from bert_demo.cli import build_parser, config_from_args

    parse = build_parser().parse_args
    assert config_from_args(parse(["train", "--pcgrad"])).aggregator == "pcgrad"
    assert config_from_args(parse(["train", "--aggregator", "pcgrad"])).aggregator == "pcgrad"
    assert config_from_args(parse(["train", "--pcgrad", "--no-pcgrad"])).aggregator is None
    assert config_from_args(parse(["train", "--aggregator", "none"])).aggregator is None
    assert _exit_code(["train", "--pcgrad", "--aggregator", "upgrad"]) == 2
    assert "both say how the task gradients are combined" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--pcgrad"], ["--aggregator", "upgrad"]])
def test_aggregator_metrics_do_not_depend_on_it_and_log_each_tasks_weight(
        tiny, tmp_path, flags) -> None:
    run = tmp_path / "run"
    assert main(["train", *tiny_args(tiny, run), *flags, "--log-every", "1"]) == 0
    train = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["event"] == "train"]
    for record in train:
        assert not [k for k in record if k.startswith("pcgrad")], record
        assert {"conflicts", "cos_sst_para", "cos_sst_sts", "cos_para_sts"} <= set(record)
        weights = [record[f"weight_{t}"] for t in ("sst", "para", "sts")]
        assert all(w > 0 for w in weights), record


def test_a_run_saved_with_pcgrad_true_is_the_same_run(tiny, run, capsys) -> None:
    """config.json of earlier versions said `pcgrad: true` (and `aggregator: null`): such
    a run resumes, and compares equal to the same settings given as --aggregator pcgrad."""
    from bert_demo.config import TrainConfig

    saved = json.loads((run / "config.json").read_text())
    assert saved["aggregator"] is None
    old = {**saved, "pcgrad": True}
    assert TrainConfig.from_dict(old) == TrainConfig.from_dict({**saved, "aggregator": "pcgrad"})
    assert TrainConfig.from_dict({**saved, "pcgrad": False}) == TrainConfig.from_dict(saved)
    (run / "config.json").write_text(json.dumps({**saved, "pcgrad": False}))
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0


def test_predict_refuses_a_linked_predictions_folder(run, victim, capsys) -> None:
    (run / "predictions").symlink_to(victim.parent, target_is_directory=True)
    assert _exit_code(["predict", "--run", str(run), "--no-progress"]) == 2
    assert f"{run / 'predictions'} is a symbolic link" in capsys.readouterr().err
    assert sorted(p.name for p in victim.parent.iterdir()) == ["precious.txt"]


def test_train_refuses_a_linked_tensorboard_folder(run, victim, capsys) -> None:
    pytest.importorskip("tensorboard")
    shutil.rmtree(run / "tensorboard", ignore_errors=True)
    (run / "tensorboard").symlink_to(victim.parent, target_is_directory=True)
    assert _exit_code(["train", "--out", str(run), "--resume", "--epochs", "2",
                       "--no-progress", "--tensorboard"]) == 2
    assert f"{run / 'tensorboard'} is a symbolic link" in capsys.readouterr().err
    assert sorted(p.name for p in victim.parent.iterdir()) == ["precious.txt"]


def test_weights_are_not_read_through_a_link(run, tmp_path, capsys) -> None:
    elsewhere = tmp_path / "elsewhere.safetensors"
    (run / "best.safetensors").rename(elsewhere)
    (run / "best.safetensors").symlink_to(elsewhere)
    assert _exit_code(["evaluate", "--run", str(run), "--no-progress"]) == 2
    assert f"{run / 'best.safetensors'} is a symbolic link" in capsys.readouterr().err
