"""One object that owns a run's life on disk: :class:`RunFolder`.

    config.json            the TrainConfig (``--resume`` reads it back)
    checkpoint.pt          model, optimizer, schedule, teacher, every process's RNG, step;
                           deleted when the run finishes (unless --keep-checkpoint)
    best.safetensors       the weights of the best dev evaluation (see run_folder.weights)
    dev_predictions.csv.gz the per-example dev predictions of those weights
    best.json              the step and SHA-256 of both: they are one unit (written last)
    model.safetensors      the weights after the last step, written when the run finishes
    encoder/               the model's tokenizer files and config.json (run_folder.encoder_files)
    metrics.jsonl          one JSON line per logged window of steps and per dev evaluation
    final.json             dev metrics, the best evaluation and wall time once finished
    eval.json              the latest ``evaluate`` of the run
    .lock                  held (flock) while a process writes the run

What it decides, each in one place: a new run goes into a new or empty folder, or one
that holds a bert_demo run (never into a folder of other files); one process writes at a
time; which settings a resumed run may change (:data:`RESUMABLE`); metrics.jsonl is cut
back to the checkpoint on resume; best weights and their predictions are written and
checked as one unit; finishing writes the last weights and final.json, then removes the
checkpoint. Every write goes through :mod:`bert_demo.run_folder.safe_write`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bert_demo.config import TrainConfig
from bert_demo.run_folder.dev_predictions import (
    DEV_PREDICTIONS,
    DevPredictions,
    dev_predictions_bytes,
    read_dev_predictions,
)
from bert_demo.run_folder.encoder_files import ENCODER_FILES_DIR, copy_model_files, encoder_files
from bert_demo.run_folder.lock import LOCK, RunLock
from bert_demo.run_folder.run_dir import (
    CHECKPOINT,
    CONFIG,
    FINAL,
    METRICS,
    RunDirError,
    load_config,
    read_checkpoint,
)
from bert_demo.run_folder.safe_write import (
    append_line,
    refuse_links,
    save_torch,
    write_bytes,
    write_json,
    write_text,
)
from bert_demo.run_folder.weights import (
    BEST_WEIGHTS,
    LAST_WEIGHTS,
    WeightsInfo,
    read_info,
    read_weights,
    selection_score,
    weights_bytes,
)

if TYPE_CHECKING:
    from bert_demo.evaluation.evaluate import TaskPredictions

BEST_UNIT = "best.json"
EVALUATION = "eval.json"
# Settings a resumed run may change: they only move where the run ends.
RESUMABLE = ("epochs", "max_steps")
# What a run folder may hold besides its own files (so that a folder holding only these
# is still seen as a run, and one with anything else as a folder of other files).
_RUN_FILES = (CONFIG, CHECKPOINT, METRICS, FINAL, BEST_WEIGHTS, LAST_WEIGHTS, DEV_PREDICTIONS,
              BEST_UNIT, ENCODER_FILES_DIR, LOCK, EVALUATION, "predictions", "analysis",
              "tensorboard")


def changed_settings(saved: TrainConfig, new: TrainConfig, ignore: tuple[str, ...] = ()
                     ) -> list[str]:
    """The settings whose values differ between two configs, by name, sorted."""
    a, b = saved.to_dict(), new.to_dict()
    return sorted(k for k in a if k not in ignore and a[k] != b.get(k))


def refused_on_resume(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """The changed settings that a resumed run may not change (all but :data:`RESUMABLE`)."""
    return [k for k in changed_settings(saved, new) if k not in RESUMABLE]


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class BestUnit:
    """best.json: which step's weights best.safetensors holds and the hashes tying the two
    files together."""

    step: int
    weights_sha256: str
    predictions_sha256: str | None  # None: the evaluation kept no predictions


class RunFolder:
    """A run's folder: create or refuse, lock, resume, checkpoint, metrics, best, finish."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock = RunLock(self.path)

    def file(self, name: str) -> Path:
        """A file of the run, refused when it is a symbolic link (see safe_write)."""
        return refuse_links(self.path / name, self.path)

    # ------------------------------------------------------------------ what it holds

    def holds_run(self) -> bool:
        """Whether the folder holds a bert_demo run: a config.json of training settings
        (a model folder's config.json is not one)."""
        if not (self.path / CONFIG).is_file():
            return False
        try:
            self.saved_config()
        except (ValueError, OSError):
            return False
        return True

    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).is_file()

    def is_finished(self) -> bool:
        return (self.path / FINAL).is_file()

    def saved_config(self) -> TrainConfig:
        return load_config(self.file(CONFIG))

    def saved_config_if_any(self) -> TrainConfig | None:
        """The run's settings; None without config.json (a broken one is an error naming it)."""
        return self.saved_config() if (self.path / CONFIG).is_file() else None

    def final(self) -> dict[str, Any]:
        final: dict[str, Any] = json.loads(self.file(FINAL).read_text(encoding="utf-8"))
        return final

    # ------------------------------------------------------------------ create, resume, lock

    def acquire(self, what: str = "train") -> RunFolder:
        """Take the folder's lock (refusing, with the holder's pid, when another has it)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire(what)
        return self

    def release(self) -> None:
        self.lock.release()

    def check_new(self) -> None:
        """Refuse a folder that already holds a run, or that holds other files.

        Checked before anything is loaded, so that a refused ``--out`` costs nothing.
        """
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise RunDirError(f"--out {self.path} is a file, not a folder")
        others = sorted(p.name for p in self.path.iterdir() if p.name not in _RUN_FILES)
        if others and not self.holds_run():  # a project, a model folder, ...
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise RunDirError(f"--out {self.path} is not empty and holds no bert_demo run "
                              f"({shown}); a new run needs a new or empty folder, or one of "
                              "its own runs")
        for name in (CHECKPOINT, LAST_WEIGHTS):
            if (self.path / name).exists():
                raise RunDirError(f"{self.path} already holds a run ({name}); pass --resume to "
                                  "continue it or choose another --out")

    def create(self, config: TrainConfig, model_folder: Path) -> None:
        """A new run: refuse (see :meth:`check_new`), else clear what an earlier run that
        never saved a checkpoint left and write config.json and the encoder files.
        Call with the lock held."""
        self.check_new()
        for name in (METRICS, FINAL, BEST_WEIGHTS, DEV_PREDICTIONS, BEST_UNIT):
            self.file(name).unlink(missing_ok=True)
        encoder = self.path / ENCODER_FILES_DIR
        if encoder.is_symlink():
            encoder.unlink()
        shutil.rmtree(encoder, ignore_errors=True)  # the earlier model's tokenizer files
        self.save_config(config)
        copy_model_files(model_folder, self.path, config.model)

    def check_resume(self, config: TrainConfig) -> list[str]:
        """Refuse a resume the folder cannot take; returns the settings that change."""
        if not self.has_checkpoint():
            raise RunDirError(f"--resume: {self.path / CHECKPOINT} does not exist; nothing to "
                              "resume")
        saved = self.saved_config()
        refused = refused_on_resume(saved, config)
        if refused:
            raise RunDirError(
                f"--resume: settings differ from the run in {self.path} ({', '.join(refused)}); "
                f"a resumed run keeps its settings (only {', '.join(RESUMABLE)} may change)")
        return changed_settings(saved, config)

    def ensure_encoder_files(self, model_folder: Path, source: str | None) -> None:
        """Runs from before the encoder files travelled with the run get them on resume."""
        if encoder_files(self.path) is None:
            copy_model_files(model_folder, self.path, source)

    def save_config(self, config: TrainConfig) -> None:
        """config.json (on resume only when --epochs/--max-steps changed it)."""
        if self.holds_run() and self.saved_config() == config:
            return
        write_json(self.file(CONFIG), config.to_dict(), self.path)

    def reopen(self) -> None:
        """A finished run (kept checkpoint) resumed with more steps is no longer finished:
        its final.json and model.safetensors describe the old end and are written again at
        the new one (until then "last" weights are the checkpoint's)."""
        for name in (FINAL, LAST_WEIGHTS):
            self.file(name).unlink(missing_ok=True)

    def finished_unchanged(self, config: TrainConfig) -> dict[str, Any] | None:
        """final.json of a finished run that ``--resume`` with ``config`` leaves as it is;
        None to train on (not finished, or more steps with a kept checkpoint).

        Also removes a checkpoint that final.json says is gone (a crash between the two).
        """
        if not self.is_finished() or not (self.path / CONFIG).is_file():
            return None
        saved = self.saved_config()
        refused = refused_on_resume(saved, config)
        if refused:
            raise RunDirError(
                f"--resume: settings differ from the run in {self.path} ({', '.join(refused)}); "
                f"a resumed run keeps its settings (only {', '.join(RESUMABLE)} may change)")
        changed = changed_settings(saved, config)
        final = self.final()
        if changed and self.has_checkpoint() and (final.get("weights") or {}).get("checkpoint"):
            return None  # the Trainer applies them (or refuses fewer steps than were done)
        self.remove_stale_checkpoint(final)
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise RunDirError(
                f"--resume: {self.path} finished at step {final.get('step')} and its "
                f"{CHECKPOINT} was deleted (train with --keep-checkpoint to keep it), so it "
                f"cannot train further; {flags} cannot change")
        return final

    def remove_stale_checkpoint(self, final: Mapping[str, Any]) -> None:
        """A finished run whose final.json says it kept no checkpoint keeps none: a crash
        between final.json and the checkpoint's removal leaves one behind."""
        weights = final.get("weights") or {}
        if "checkpoint" in weights and weights["checkpoint"] is None:
            self.file(CHECKPOINT).unlink(missing_ok=True)

    def save_evaluation(self, record: dict[str, Any]) -> None:
        """eval.json: ``evaluate``'s metrics and what they were measured on."""
        write_json(self.file(EVALUATION), record, self.path)

    # ------------------------------------------------------------------ checkpoint

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        """checkpoint.pt: the Trainer's state, with every process's RNG (see capture_rng)."""
        return save_torch(state, self.file(CHECKPOINT), self.path)

    def read_checkpoint(self, world_size: int = 1) -> dict[str, Any]:
        """checkpoint.pt, refused when written by another number of processes."""
        path = self.file(CHECKPOINT)
        state = read_checkpoint(path)
        saved_world = state.get("world_size", 1)
        if saved_world != world_size:
            raise RunDirError(
                f"--resume: {path} was written by {saved_world} process(es) and this run has "
                f"{world_size}; the batches depend on it, so resume with "
                f"torchrun --nproc_per_node {saved_world} (or without torchrun for 1)")
        return state

    # ------------------------------------------------------------------ metrics

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_line(self.file(METRICS), json.dumps(record, sort_keys=True) + "\n", self.path)

    def trim_metrics(self, step: int, eval_step: int) -> None:
        """Drop metrics.jsonl records from after the checkpoint (the resumed run logs them
        again): train records after ``step``, evaluations after ``eval_step``."""
        path = self.file(METRICS)
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short when the run stopped
            if not isinstance(record, dict):
                continue
            last = eval_step if record.get("event") == "eval" else step
            if record.get("step", 0) <= last:
                kept.append(line)
        write_text(path, "".join(line + "\n" for line in kept), self.path)

    def metrics_from(self, first_step: int) -> list[dict[str, Any]]:
        """The records of metrics.jsonl at ``first_step`` and later (to replay them)."""
        path = self.file(METRICS)
        if not path.is_file():
            return []
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        return [r for r in records if r.get("step", 0) >= first_step]

    # ------------------------------------------------------------------ best weights

    def best_info(self) -> WeightsInfo | None:
        path = self.file(BEST_WEIGHTS)
        return read_info(path) if path.is_file() else None

    def best_weights(self) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
        return read_weights(self.file(BEST_WEIGHTS))

    def best_unit(self) -> BestUnit | None:
        path = self.file(BEST_UNIT)
        if not path.is_file():
            return None
        values = json.loads(path.read_text(encoding="utf-8"))
        return BestUnit(int(values["step"]), str(values["weights_sha256"]),
                        values.get("predictions_sha256"))

    def save_best(self, model: nn.Module, info: WeightsInfo,
                  predictions: Mapping[str, TaskPredictions] | None) -> None:
        """best.safetensors and the predictions made from those weights, then best.json
        naming the step and both files' hashes (a crash in between is seen on resume)."""
        self.file(BEST_UNIT).unlink(missing_ok=True)  # the unit is open until written again
        weights = weights_bytes(model, info)
        write_bytes(self.file(BEST_WEIGHTS), weights, self.path)
        predictions_hash = None
        if predictions is not None:
            data = dev_predictions_bytes(predictions)
            write_bytes(self.file(DEV_PREDICTIONS), data, self.path)
            predictions_hash = sha256(data)
        else:  # no stale file that would claim to be these weights' predictions
            self.file(DEV_PREDICTIONS).unlink(missing_ok=True)
        write_json(self.file(BEST_UNIT), {"step": info.step, "weights_sha256": sha256(weights),
                                          "predictions_sha256": predictions_hash}, self.path)

    def best_unit_problem(self) -> str | None:
        """Why best.safetensors and dev_predictions.csv.gz are not one unit (None: they are).

        Without best.json (runs written before it) nothing can be checked: None. Where the
        weights are absent (a committed ablation keeps no weights), the predictions are
        checked alone.
        """
        unit = self.best_unit()
        if unit is None:
            return None
        weights, predictions = self.path / BEST_WEIGHTS, self.path / DEV_PREDICTIONS
        if weights.is_file() and file_sha256(weights) != unit.weights_sha256:
            return f"{weights} is not the step-{unit.step} weights that {BEST_UNIT} names"
        if unit.predictions_sha256 is None:
            if predictions.is_file():
                return f"{predictions} is there but {BEST_UNIT} says none was written"
            return None
        if not predictions.is_file():
            return f"{predictions} is missing (the step-{unit.step} predictions)"
        if file_sha256(predictions) != unit.predictions_sha256:
            return f"{predictions} is not the step-{unit.step} predictions that {BEST_UNIT} names"
        return None

    def best_needs_repair(self) -> bool:
        """On resume: best weights whose predictions are not known to be theirs (a crash
        between the two files, or a run from before best.json)."""
        if not (self.path / BEST_WEIGHTS).is_file():
            # Predictions without their weights belong to nothing.
            for name in (DEV_PREDICTIONS, BEST_UNIT):
                self.file(name).unlink(missing_ok=True)
            return False
        return self.best_unit() is None or self.best_unit_problem() is not None

    def final_predictions(self) -> dict[str, DevPredictions] | None:
        """The best weights' dev predictions of a finished run, for statistics across runs;
        refused when best.json says they are not those weights' (None when there are none)."""
        problem = self.best_unit_problem()
        if problem is not None:
            raise RunDirError(f"{problem}; run `train --out {self.path} --resume` to repair it")
        path = self.file(DEV_PREDICTIONS)
        return read_dev_predictions(path) if path.is_file() else None

    def best_score(self, tasks: tuple[str, ...]) -> float:
        info = self.best_info()
        return -float("inf") if info is None else selection_score(info.metrics, tasks)

    # ------------------------------------------------------------------ finishing

    def finish(self, model: nn.Module, info: WeightsInfo, final: dict[str, Any],
               keep_checkpoint: bool) -> dict[str, Any]:
        """The last weights, then final.json (the run is finished once it exists), then the
        checkpoint goes unless kept."""
        write_bytes(self.file(LAST_WEIGHTS), weights_bytes(model, info), self.path)
        best = self.best_info()
        final["best"] = None if best is None else {
            "file": BEST_WEIGHTS, "step": best.step, "epoch": best.epoch, "dev": best.metrics}
        final["weights"] = {"last": LAST_WEIGHTS, "best": BEST_WEIGHTS if best else None,
                            "checkpoint": CHECKPOINT if keep_checkpoint else None}
        final["dev_predictions"] = (DEV_PREDICTIONS if (self.path / DEV_PREDICTIONS).is_file()
                                    else None)
        write_json(self.file(FINAL), final, self.path)
        self.remove_stale_checkpoint(final)
        return final


def capture_rng() -> dict[str, Any]:
    """This process's random streams, for the checkpoint."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
