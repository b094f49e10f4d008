"""bert_demo training: one tiny step per flag combination, exact resume, run-folder rules."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from demo_fixtures import write_tiny_data, write_tiny_model

from bert_demo.config import TrainConfig
from bert_demo.run_folder.run_dir import CHECKPOINT, FINAL, METRICS, RunDirError, load_trained
from bert_demo.run_folder.weights import LAST_WEIGHTS
from bert_demo.training.train import Trainer, train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(root / "model"), write_tiny_data(root / "data")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(tiny: tuple[Path, Path], **overrides: Any) -> TrainConfig:
    model_dir, data_dir = tiny
    settings: dict[str, Any] = {
        "model": str(model_dir),
        "data": str(data_dir),
        "batch_sst": 3,
        "batch_para": 2,
        "batch_sts": 2,
        "max_length": 16,
        "epochs": 1,
        "steps_per_epoch": 2,
        "lr": 1e-3,
        "eval_batch_size": 4,
        "log_every": 1,
        "length_buckets": 2,
        "pooling": "mean",
    }
    return TrainConfig(**{**settings, **overrides})


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


METHOD_COMBINATIONS = [
    {"smart": flags[0], "aggregator": "pcgrad" if flags[1] else None, "sts_aug": flags[2]}
    for flags in itertools.product([False, True], repeat=3)
]
OTHER_SETTINGS = [
    {"mode": "frozen"},
    {"tasks": ("sst",)},
    {"tasks": ("para", "sts"), "aggregator": "pcgrad"},
    {"pair_encoding": "cross", "smart": True, "sts_aug": True},
    {"pooling": "cls", "para_head": "cosine", "sts_head": "features"},
    {"optimizer": "torch-adamw"},
    {"optimizer": "lamb", "aggregator": "pcgrad"},
    {"optimizer": "radam", "smart": True},
]


@pytest.mark.parametrize(
    "overrides", METHOD_COMBINATIONS + OTHER_SETTINGS, ids=lambda o: json.dumps(o, sort_keys=True)
)
def test_one_training_step(tiny, tmp_path, overrides) -> None:
    config = tiny_config(tiny, max_steps=1, **overrides)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    before = params(trainer.model)
    final = trainer.run()
    after = params(trainer.model)

    changed = {k for k in before if not torch.equal(before[k], after[k])}
    encoder_changed = {k for k in changed if k.startswith("encoder.")}
    heads_changed = changed - encoder_changed
    if config.mode == "frozen":
        assert not encoder_changed, "a frozen encoder must not move"
    else:
        assert encoder_changed
    assert heads_changed
    if config.tasks == ("sst",):
        assert all(k.startswith(("encoder.", "heads.sst.")) for k in changed)

    assert final["step"] == 1
    assert set(final["dev"]) == {"sst_acc", "para_acc", "sts_pearson", "overall"}
    assert all(0.0 <= final["dev"][k] <= 1.0 for k in ("sst_acc", "para_acc"))
    records = [json.loads(line) for line in (tmp_path / "run" / METRICS).read_text().splitlines()]
    train_record = next(r for r in records if r["event"] == "train")
    for task in config.tasks:
        assert torch.isfinite(torch.tensor(train_record[f"loss_{task}"]))
        if config.smart:
            assert train_record[f"smart_rs_{task}"] >= 0
            assert train_record[f"bregman_{task}"] >= 0
    if config.pcgrad:
        pairs = len(config.tasks) * (len(config.tasks) - 1) // 2
        assert 0 <= train_record["conflicts"] <= pairs
        assert -1 <= train_record[f"cos_{config.tasks[0]}_{config.tasks[1]}"] <= 1
        assert all(f"weight_{t}" in train_record for t in config.tasks)
    # A finished run keeps model-only weights; its optimizer checkpoint is deleted.
    assert (tmp_path / "run" / LAST_WEIGHTS).is_file()
    assert not (tmp_path / "run" / CHECKPOINT).exists()
    assert (tmp_path / "run" / FINAL).is_file()


class Stop(Exception):
    pass


def _interrupt_at(step: int):
    def hook(current: int) -> None:
        if current == step:
            raise KeyboardInterrupt

    return hook


@pytest.mark.slow
def test_resume_continues_exactly(tiny, tmp_path) -> None:
    """Ctrl-C, then --resume, ends with the same weights as one uninterrupted run.

    The interrupt comes mid-epoch, after an epoch-end checkpoint (2 steps per epoch).
    """
    stop_at = 3
    methods = {"smart": True, "sts_aug": True, "aggregator": "pcgrad"}
    config = tiny_config(tiny, epochs=2, **methods)

    straight = Trainer(config, tmp_path / "straight", progress=False)
    straight_final = straight.run()

    with pytest.raises(KeyboardInterrupt):
        Trainer(config, tmp_path / "resumed", progress=False, on_step=_interrupt_at(stop_at)).run()
    state = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)
    assert state["step"] == stop_at
    resumed = Trainer(config, tmp_path / "resumed", resume=True, progress=False)
    resumed_final = resumed.run()

    assert resumed_final["step"] == straight_final["step"] == 4
    expected, got = params(straight.model), params(resumed.model)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert resumed_final["dev"] == straight_final["dev"]
    teacher_a = straight.smart.teacher.module.state_dict()  # type: ignore[union-attr]
    teacher_b = resumed.smart.teacher.module.state_dict()  # type: ignore[union-attr]
    assert all(torch.equal(teacher_a[k], teacher_b[k]) for k in teacher_a)


def test_same_seed_repeats_and_other_seed_differs(tiny, tmp_path) -> None:
    runs = [
        train(tiny_config(tiny, max_steps=2, seed=seed), tmp_path / name, progress=False)
        for name, seed in (("a", 1), ("b", 1), ("c", 2))
    ]
    models = [load_trained(tmp_path / name)[0] for name in ("a", "b", "c")]
    a, b, c = (params(m) for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert runs[0]["dev"] == runs[1]["dev"]


def test_run_folder_rules(tiny, tmp_path) -> None:
    config = tiny_config(tiny, max_steps=1)
    with pytest.raises(RunDirError, match="nothing to resume"):
        Trainer(config, tmp_path / "run", resume=True, progress=False)
    # Kept, so that there is a checkpoint to try resuming with other settings.
    train(config, tmp_path / "run", progress=False, keep_checkpoint=True)
    with pytest.raises(RunDirError, match="already holds a run"):
        Trainer(config, tmp_path / "run", progress=False)
    with pytest.raises(RunDirError, match="lr"):
        Trainer(config.with_overrides(lr=0.5), tmp_path / "run", resume=True, progress=False)


def test_checkpoint_loads_weights_only_and_rebuilds_the_model(tiny, tmp_path) -> None:
    trainer = Trainer(tiny_config(tiny, max_steps=1), tmp_path / "run", progress=False)
    trainer.run()
    model, _, config = load_trained(tmp_path / "run")
    assert config == trainer.config
    trained = params(trainer.model)
    assert all(torch.equal(trained[k], v) for k, v in params(model).items())
    # A file that is not our checkpoint is refused with its path in the message.
    bogus = tmp_path / "bogus.pt"
    torch.save({"something": torch.zeros(1)}, bogus)
    with pytest.raises(ValueError, match=r"bogus\.pt"):
        load_trained(bogus)


def test_metrics_file_has_train_and_eval_lines(tiny, tmp_path) -> None:
    train(tiny_config(tiny, epochs=2), tmp_path / "run", progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / METRICS).read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]  # one per epoch
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4]
