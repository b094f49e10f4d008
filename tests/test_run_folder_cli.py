"""Run folders a user can trust (issue 21): what a run folder holds must not steer writes or
copies outside it, a full disk is one clear line, and the folder is left as it was."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from demo_fixtures import write_tiny_data, write_tiny_model

from bert_demo.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(root / "model"), write_tiny_data(root / "data")


def tiny_args(tiny: tuple[Path, Path], out: Path) -> list[str]:
    model_dir, data_dir = tiny
    return ["--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
            "--batch-sst", "3", "--batch-para", "2", "--batch-sts", "2", "--max-length", "16",
            "--epochs", "1", "--steps-per-epoch", "2", "--eval-batch-size", "4", "--no-progress",
            "--adamw-impl", "for-loop", "--precision", "fp32"]


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
    assert "model.safetensors" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["run"]
