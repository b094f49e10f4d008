"""What a bert_demo user takes away: weights, best epoch, export, self-contained runs, logs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from demo_fixtures import write_tiny_data, write_tiny_model

from bert_demo import export as export_module
from bert_demo.cli import build_parser, config_from_args, main
from bert_demo.config import TrainConfig
from bert_demo.export import load_export
from bert_demo.model import load_pretrained
from bert_demo.model.tokenizer import WordPieceTokenizer
from bert_demo.run_folder.encoder_files import read_source, sha256
from bert_demo.run_folder.run_dir import (
    CHECKPOINT,
    FINAL,
    METRICS,
    RunDirError,
    load_run,
    load_trained,
)
from bert_demo.run_folder.weights import BEST_WEIGHTS, LAST_WEIGHTS, read_info
from bert_demo.training.train import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(root / "model"), write_tiny_data(root / "data")


def tiny_config(model: Path, data: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "model": str(model), "data": str(data), "batch_sst": 3, "batch_para": 2,
        "batch_sts": 2, "max_length": 16, "epochs": 1, "steps_per_epoch": 2, "lr": 1e-2,
        "eval_batch_size": 4, "log_every": 1, "length_buckets": 2, "pooling": "mean",
    }
    return TrainConfig(**{**settings, **overrides})


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A two-step run and its final weights (taken from the trainer, not from disk)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "run"
    trainer = Trainer(tiny_config(*tiny, pair_encoding="cross"), out, progress=False,
                      tensorboard=False)
    trainer.run()
    torch.set_num_threads(threads)
    return out, params(trainer.model)


def batch(vocab_size: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    types[mask == 0] = 0
    return ids, mask, types


# ---------------------------------------------------------------- model-only weights


def test_finished_run_keeps_model_only_weights(finished_run, tiny) -> None:
    run, trained = finished_run
    assert not (run / CHECKPOINT).exists()
    final = json.loads((run / FINAL).read_text())
    assert final["weights"] == {"last": LAST_WEIGHTS, "best": BEST_WEIGHTS, "checkpoint": None}
    last = load_run(run, weights="last")
    assert last.weights_file.name == LAST_WEIGHTS and last.step == 2
    assert same_params(params(last.model), trained)
    info = read_info(run / LAST_WEIGHTS)
    assert (info.step, info.metrics) == (2, final["dev"])
    # A finished folder is not trained over, and "resuming" it changes nothing.
    with pytest.raises(RunDirError, match="already holds a run"):
        Trainer(tiny_config(*tiny, pair_encoding="cross"), run, progress=False)
    assert train(tiny_config(*tiny, pair_encoding="cross"), run, resume=True,
                 progress=False) == final


def test_keep_checkpoint_and_interrupted_runs_keep_theirs(tiny, tmp_path) -> None:
    config = tiny_config(*tiny, max_steps=1)
    train(config, tmp_path / "kept", progress=False, keep_checkpoint=True)
    assert (tmp_path / "kept" / CHECKPOINT).is_file()
    assert (tmp_path / "kept" / LAST_WEIGHTS).is_file()

    def stop(step: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(*tiny), tmp_path / "cut", progress=False, on_step=stop)
    assert (tmp_path / "cut" / CHECKPOINT).is_file()
    assert not (tmp_path / "cut" / LAST_WEIGHTS).exists()
    final = train(tiny_config(*tiny), tmp_path / "cut", resume=True, progress=False)
    assert final["step"] == 2 and not (tmp_path / "cut" / CHECKPOINT).exists()


def test_a_kept_checkpoint_extends_a_finished_run(tiny, tmp_path) -> None:
    """More steps on --resume continue a kept checkpoint; until the new end the run is
    not finished (no final.json, and its last weights are the checkpoint's)."""
    run, config = tmp_path / "run", tiny_config(*tiny)
    train(config, run, progress=False, keep_checkpoint=True)
    assert json.loads((run / FINAL).read_text())["step"] == 2
    longer = config.with_overrides(epochs=2)

    def stop_at_3(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(longer, run, resume=True, progress=False, on_step=stop_at_3)
    assert not (run / FINAL).exists() and not (run / LAST_WEIGHTS).exists()
    assert load_run(run, weights="last").weights_file.name == CHECKPOINT
    assert load_run(run, weights="last").step == 3
    final = train(longer, run, resume=True, progress=False)
    assert final["step"] == 4 and read_info(run / LAST_WEIGHTS).step == 4
    assert not (run / CHECKPOINT).exists()  # this resume did not ask to keep it


def test_an_evaluation_cut_short_is_done_once_on_resume(tiny, tmp_path, monkeypatch) -> None:
    """The checkpoint is saved before the epoch-end evaluation. A crash after the step-4
    evaluation was logged (metrics.jsonl, TensorBoard) but before the best weights and the
    second checkpoint: the resume evaluates step 4 again, and metrics.jsonl, TensorBoard
    and the best weights hold each step once."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bert_demo.run_folder.folder import RunFolder

    run, config = tmp_path / "run", tiny_config(*tiny, epochs=2)
    real_save_best = RunFolder.save_best

    def crash_at_4(self: RunFolder, model: torch.nn.Module, info: Any, predictions: Any) -> None:
        if info.step == 4:
            raise RuntimeError("evaluation crashed")
        real_save_best(self, model, info, predictions)

    monkeypatch.setattr(RunFolder, "save_best", crash_at_4)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        train(config, run, progress=False, tensorboard=True)
    assert torch.load(run / CHECKPOINT, weights_only=True)["step"] == 4
    assert read_info(run / BEST_WEIGHTS).step == 2
    assert json.loads((run / METRICS).read_text().splitlines()[-1])["step"] == 4
    monkeypatch.setattr(RunFolder, "save_best", real_save_best)
    final = train(config, run, resume=True, progress=False, tensorboard=True)
    records = [json.loads(x) for x in (run / METRICS).read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in records] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]
    assert final["dev"] == {k: v for k, v in records[-1].items()
                            if k not in ("event", "step", "epoch", "elapsed_s")}
    assert final["best"]["step"] in (2, 4)
    assert read_info(run / BEST_WEIGHTS).step == final["best"]["step"]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss_sst")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/overall")] == [2, 4]
    assert events.Scalars("eval/overall")[-1].value == pytest.approx(final["dev"]["overall"])


# ---------------------------------------------------------------- best epoch


def scripted_evaluation(monkeypatch: pytest.MonkeyPatch, overall_at: dict[int, float]) -> None:
    """Trainer.evaluate returns ``overall_at[step]`` as the overall score."""

    def fake(self: Trainer) -> dict[str, float]:
        return {"sst_acc": 0.5, "para_acc": 0.5, "sts_pearson": 0.0,
                "overall": overall_at[self.step]}

    monkeypatch.setattr(Trainer, "evaluate", fake)


def weights_at(steps: tuple[int, ...], into: dict[int, dict[str, torch.Tensor]]):
    def hook(trainer: Trainer):
        def on_step(step: int) -> None:
            if step in steps:
                into[step] = params(trainer.model)
        return on_step
    return hook


def test_best_epoch_weights_are_kept_and_used(tiny, tmp_path, monkeypatch) -> None:
    scripted_evaluation(monkeypatch, {2: 0.6, 4: 0.4, 6: 0.5})  # epoch 1 is the best
    seen: dict[int, dict[str, torch.Tensor]] = {}
    trainer = Trainer(tiny_config(*tiny, epochs=3), tmp_path / "run", progress=False)
    trainer.on_step = weights_at((2, 6), seen)(trainer)
    final = trainer.run()
    assert final["best"] == {"file": BEST_WEIGHTS, "step": 2, "epoch": 1.0,
                             "dev": {"sst_acc": 0.5, "para_acc": 0.5, "sts_pearson": 0.0,
                                     "overall": 0.6}}
    assert final["dev"]["overall"] == 0.5  # the last evaluation stays under "dev"
    assert json.loads((tmp_path / "run" / FINAL).read_text())["best"]["step"] == 2
    assert not same_params(seen[2], seen[6])
    assert same_params(params(load_trained(tmp_path / "run")[0]), seen[2])
    assert same_params(params(load_trained(tmp_path / "run", weights="last")[0]), seen[6])


def test_best_score_survives_a_resume(tiny, tmp_path, monkeypatch) -> None:
    """Interrupted after the best evaluation; a worse one after the resume must not win."""
    scripted_evaluation(monkeypatch, {2: 0.6, 4: 0.4})
    config = tiny_config(*tiny, epochs=2)

    def stop_at_3(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "run", progress=False, on_step=stop_at_3)
    final = train(config, tmp_path / "run", resume=True, progress=False)
    assert final["best"]["step"] == 2 and final["best"]["dev"]["overall"] == 0.6


# ---------------------------------------------------------------- self-contained runs


def test_run_folder_works_without_its_model(tiny, tmp_path, capsys) -> None:
    model_dir = shutil.copytree(tiny[0], tmp_path / "model")
    run = tmp_path / "run"
    train(tiny_config(model_dir, tiny[1], max_steps=1), run, progress=False)
    source = read_source(run)
    assert source["folder"] == str(model_dir)
    assert source["sha256"]["vocab.txt"] == sha256(model_dir / "vocab.txt")
    expected = json.loads((run / FINAL).read_text())["dev"]
    shutil.rmtree(model_dir)
    assert main(["evaluate", "--run", str(run), "--no-progress"]) == 0
    measured = json.loads((run / "eval.json").read_text())
    assert {k: measured[k] for k in expected} == pytest.approx(expected)
    assert main(["predict", "--run", str(run), "--no-progress"]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    # A different model under the old name does not change what the run reads.
    write_tiny_model(model_dir, seed=5)
    (model_dir / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
    assert main(["evaluate", "--run", str(run), "--no-progress"]) == 0
    again = json.loads((run / "eval.json").read_text())
    assert {k: again[k] for k in expected} == pytest.approx(expected)


# ---------------------------------------------------------------- export


def test_export_round_trip(finished_run, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    run, trained = finished_run
    out = tmp_path / "exported"
    assert main(["export", "--run", str(run), "--out", str(out), "--weights", "last"]) == 0
    assert {p.name for p in out.iterdir()} >= {
        "config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json",
        "heads.safetensors", "heads.json"}
    assert not list(tmp_path.glob(".exported.*"))  # the temporary folder was renamed

    ours = load_run(run, weights="last").model.encoder.eval()
    pretrained = load_pretrained(json.loads((run / "config.json").read_text())["model"]).eval()
    ids, mask, types = batch(ours.config.vocab_size)
    with torch.no_grad():
        want = ours(ids, mask, types)
        hf = transformers.BertModel.from_pretrained(str(out)).eval()
        got_hf = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        got_ours = load_pretrained(out).eval()(ids, mask, types)
        before = pretrained(ids, mask, types)
    # Training moved the encoder, so matching it is not matching the pretrained model.
    assert (want.last_hidden_state - before.last_hidden_state).abs().max() > 1e-3
    for got in (got_ours, got_hf):
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state,
                                   rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=0, atol=TOLERANCE)

    # The heads come back too: the whole multitask model gives the run's outputs.
    model = load_export(out)
    assert same_params(params(model), trained)
    info = json.loads((out / "heads.json").read_text())
    assert info["head_settings"]["pair_encoding"] == "cross"
    assert info["tasks"]["sst"]["num_outputs"] == 5 and info["run"]["step"] == 2
    # The exported tokenizer is the run's.
    text = ["a great and moving film ."]
    assert torch.equal(WordPieceTokenizer.from_folder(out).encode(text).input_ids,
                       load_run(run).tokenizer.encode(text).input_ids)
    hf_tokenizer = transformers.BertTokenizer.from_pretrained(str(out))
    assert hf_tokenizer(text)["input_ids"][0] == load_run(run).tokenizer.encode(
        text).input_ids[0].tolist()


def test_export_refuses_a_used_folder_and_writes_all_or_nothing(
        finished_run, tmp_path, capsys, monkeypatch) -> None:
    run, _ = finished_run
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--run", str(run), "--out", str(used)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {used} already exists and is not empty" in err
    assert [p.name for p in used.iterdir()] == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--run", str(run), "--out", str(empty)]) == 0
    assert (empty / "model.safetensors").is_file()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "_heads_info", broken)
    with pytest.raises(OSError, match="disk full"):
        export_module.export_run(run, tmp_path / "half")
    assert not (tmp_path / "half").exists() and not list(tmp_path.glob(".half.*"))


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_has_the_metrics_scalars(tiny, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(tiny_config(*tiny), run, progress=False, tensorboard=True)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = [json.loads(x) for x in (run / METRICS).read_text().splitlines()]
    expected = {(f"{r['event']}/{k}", r["step"]): v for r in records for k, v in r.items()
                if k not in ("event", "step")}
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"]
           for e in events.Scalars(tag)}
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items())


def test_tensorboard_after_a_crash_and_resume_shows_each_step_once(tiny, tmp_path) -> None:
    """A crash after the step-2 checkpoint logged step 3; the resumed run logs it again."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, config = tmp_path / "run", tiny_config(*tiny, epochs=2)

    def crash_at_3(step: int) -> None:
        if step == 3:
            raise RuntimeError("power cut")  # not a Ctrl-C: no checkpoint at step 3

    with pytest.raises(RuntimeError):
        train(config, run, progress=False, on_step=crash_at_3, tensorboard=True)
    train(config, run, resume=True, progress=False, tensorboard=True)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss_sst")]
    assert [step for step, _ in loss] == [1, 2, 3, 4]
    records = [json.loads(x) for x in (run / METRICS).read_text().splitlines()]
    resumed_step_3 = [r for r in records if r["event"] == "train" and r["step"] == 3][-1]
    assert loss[2][1] == pytest.approx(resumed_step_3["loss_sst"], rel=1e-6)


def test_tensorboard_missing_is_silent_unless_asked_for(tiny, tmp_path, capsys,
                                                        monkeypatch) -> None:
    monkeypatch.setattr("bert_demo.training.tensorboard_log.tensorboard_installed", lambda: False)
    train(tiny_config(*tiny, max_steps=1), tmp_path / "quiet", progress=False)
    assert not (tmp_path / "quiet" / "tensorboard").exists()
    model, data = tiny
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "tb"),
              "--max-steps", "1", "--tensorboard", "--no-progress"])
    assert exit_info.value.code == 2
    assert "tensorboard package is not installed" in capsys.readouterr().err
    assert not (tmp_path / "tb").exists()


# ---------------------------------------------------------------- the command line


def test_every_command_takes_no_progress_and_weights() -> None:
    parser = build_parser()
    for command in ("evaluate", "predict", "analyze", "export"):
        extra = ["--out", "x"] if command == "export" else []
        args = parser.parse_args([command, "--run", "r", "--no-progress", "--weights", "last",
                                  *extra])
        assert args.no_progress and args.weights == "last"
    assert parser.parse_args(["train", "--no-progress"]).no_progress
    assert parser.parse_args(["ablate", "--no-progress"]).no_progress


def test_frozen_mode_keeps_pretrain_as_an_alias(capsys) -> None:
    parser = build_parser()
    assert config_from_args(parser.parse_args(["train", "--mode", "pretrain"])).mode == "frozen"
    assert config_from_args(parser.parse_args(["train", "--mode", "frozen"])).mode == "frozen"
    assert TrainConfig.from_dict({"mode": "pretrain"}).mode == "frozen"  # old config.json
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--mode", "thawed"])
    assert "invalid choice: 'thawed'" in capsys.readouterr().err


def test_ablate_rows_help_lists_the_rows(monkeypatch) -> None:
    from bert_demo.ablation.ablate import ROWS, select_rows

    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside hyphenated names

    ablate = build_parser()._subparsers._group_actions[0].choices["ablate"]  # type: ignore[union-attr]
    text = " ".join(ablate.format_help().split())
    for row in ROWS:
        assert row.slug in text
    assert select_rows(["pretrain"])[0].slug == "frozen"
