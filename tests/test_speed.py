"""bert_demo's --precision, --adamw-impl and thread split: what is chosen, and what bf16 keeps fp32."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from demo_fixtures import write_tiny_data, write_tiny_model

import gradtools
from bert_demo.config import PRESETS, TrainConfig
from bert_demo.run_folder.dev_predictions import DEV_PREDICTIONS, read_dev_predictions
from bert_demo.run_folder.run_dir import FINAL
from bert_demo.training.speed import (
    autocast,
    cpu_flags,
    resolve_adamw_impl,
    resolve_precision,
    threads_for_jobs,
)
from bert_demo.training.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(root / "model"), write_tiny_data(root / "data")


def tiny_config(tiny: tuple[Path, Path], **overrides: Any) -> TrainConfig:
    model_dir, data_dir = tiny
    return TrainConfig(model=str(model_dir), data=str(data_dir), batch_sst=3, batch_para=2,
                       batch_sts=2, max_length=16, epochs=1, steps_per_epoch=2, lr=1e-3,
                       eval_batch_size=4, pooling="mean", **overrides)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512_bf16\nbugs\t: none\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_auto_picks_bf16_only_on_bf16_hardware(capsys: pytest.CaptureFixture[str]) -> None:
    assert resolve_precision("auto", CPU, flags={"avx2", "avx512_bf16"}) == "bf16"
    assert resolve_precision("auto", CPU, flags={"avx2", "amx_bf16"}) == "bf16"
    assert capsys.readouterr().err == ""
    assert resolve_precision("auto", CPU, flags={"avx2", "avx512f"}) == "fp32"
    notice = capsys.readouterr().err
    assert notice.count("\n") == 1 and "using fp32" in notice and "avx512_bf16" in notice
    # quiet: the same answer without the notice (ablate's check before its runs).
    assert resolve_precision("auto", CPU, flags={"avx2"}, quiet=True) == "fp32"
    assert capsys.readouterr().err == ""
    # An explicit choice is obeyed, silently, whatever the hardware.
    assert resolve_precision("bf16", CPU, flags=set()) == "bf16"
    assert resolve_precision("fp32", CPU, flags={"avx512_bf16"}) == "fp32"
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="--precision must be one of"):
        resolve_precision("fp16", CPU)


def test_autocast_context() -> None:
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast("bf16", CPU):
        assert layer(x).dtype == torch.bfloat16
    with autocast("fp32", CPU):
        assert layer(x).dtype == torch.float32


def test_fused_adamw_falls_back_with_one_notice(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from gradtools import adamw

    # What a machine without a working compiler leaves behind after the first try.
    monkeypatch.setattr(adamw._compiled, "failure", "CompilerError: no C++ compiler")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_adamw_impl("fused") == "foreach"
    assert caught == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no C++ compiler" in err and "using foreach" in err
    assert resolve_adamw_impl("for-loop") == "for-loop"
    with pytest.raises(ValueError, match="--adamw-impl must be one of"):
        resolve_adamw_impl("fast")


def test_threads_are_split_between_jobs() -> None:
    assert threads_for_jobs(2, 2) == 1
    assert threads_for_jobs(2, 8) == 4
    assert threads_for_jobs(3, 8) == 2
    assert threads_for_jobs(4, 2) == 1  # never zero


def test_presets_run_fast_and_the_dataclass_stays_exact() -> None:
    assert TrainConfig().precision == "fp32" and TrainConfig().adamw_impl == "for-loop"
    for preset in PRESETS.values():
        assert preset["precision"] == "auto" and preset["adamw_impl"] == "fused"


@pytest.mark.parametrize("impl", ["foreach", "for-loop"])
def test_adamw_impl_reaches_the_optimizer(tiny, tmp_path, impl: str) -> None:
    trainer = Trainer(tiny_config(tiny, adamw_impl=impl), tmp_path / impl, progress=False)
    assert isinstance(trainer.optimizer, gradtools.AdamW)
    group = trainer.optimizer.param_groups[0]
    assert (group["foreach"], group["fused"]) == (impl == "foreach", False)


def test_bf16_autocasts_the_forward_and_keeps_weights_and_state_fp32(tiny, tmp_path) -> None:
    config = tiny_config(tiny, precision="bf16", smart=True, aggregator="pcgrad", sts_aug=True,
                         mnrl_weight=0.5)
    trainer = Trainer(config, tmp_path / "bf16", progress=False)
    seen: list[torch.dtype] = []
    query = trainer.model.encoder.layers[0].ffn_in
    query.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    stats = trainer.training_step()
    assert seen and set(seen) == {torch.bfloat16}  # the matmuls ran in bf16 (SMART's too)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in stats.items() if k.startswith("loss"))
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    states = [s for s in trainer.optimizer.state.values() if "exp_avg" in s]
    assert states and {s["exp_avg"].dtype for s in states} == {torch.float32}
    assert {s["exp_avg_sq"].dtype for s in states} == {torch.float32}


def test_final_json_records_how_the_run_computed(tiny, tmp_path) -> None:
    out = tmp_path / "run"
    Trainer(tiny_config(tiny, precision="bf16", adamw_impl="for-loop"), out,
            progress=False).run()
    final = json.loads((out / FINAL).read_text())
    assert final["precision"] == "bf16" and final["adamw_impl"] == "for-loop"
    assert final["threads"] == torch.get_num_threads() == 1
    # The best weights' per-example predictions, matching their metrics.
    assert final["dev_predictions"] == DEV_PREDICTIONS
    predictions = read_dev_predictions(out / DEV_PREDICTIONS)
    assert set(predictions) == {"sst", "para", "sts"}
    sst = predictions["sst"]
    accuracy = sum(p == g for p, g in zip(sst.predicted, sst.gold, strict=True)) / len(sst.gold)
    assert accuracy == pytest.approx(final["best"]["dev"]["sst_acc"])
