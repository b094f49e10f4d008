"""The multitask training loop: one batch of every task per step, as in the paper.

Each step draws one batch per task (the order is a pure function of seed and step,
see :mod:`bert_demo.tasks.batching`), computes each task's loss (plus SMART's adversarial
and Bregman terms with ``smart``), optionally weights them (``--weighting``, a
:mod:`gradtools.weighting` method, see :mod:`bert_demo.training.weighting`), and either
sums the losses or hands them to the aggregator (``--aggregator``; PCGrad removes
conflicting components), which combines the task gradients before the optimizer step.

A run lives in one folder, which :class:`bert_demo.run_folder.folder.RunFolder` owns (what
is written there, when, and what may change on resume); the Trainer sets up, steps and
loops. Checkpoints are saved at every epoch end, when training finishes and on Ctrl-C
(the step in flight completes first; a second Ctrl-C aborts at once). Every evaluation
that beats the best dev score so far saves the weights with their dev predictions; a
finished run keeps model-only weights and deletes its optimizer checkpoint unless asked
to keep it.

Under torchrun every process runs this loop on its share of each batch; see
:mod:`bert_demo.training.distributed` for what is averaged and what only rank 0 does.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from bert_demo.config import TrainConfig
from bert_demo.evaluation.evaluate import TaskPredictions, evaluate_with_predictions
from bert_demo.model import load_pretrained, resolve_model_path
from bert_demo.model.multitask import MultitaskBert
from bert_demo.model.tokenizer import WordPieceTokenizer
from bert_demo.run_folder import run_dir
from bert_demo.run_folder.folder import RESUMABLE, RunFolder, capture_rng, restore_rng
from bert_demo.run_folder.run_dir import CHECKPOINT, RunDirError, new_model, resolve_device
from bert_demo.run_folder.safe_write import DiskFull
from bert_demo.run_folder.weights import WeightsInfo, selection_score
from bert_demo.tasks import get_task, model_tasks
from bert_demo.tasks.batching import (
    Example,
    batch_indices,
    batches_per_pass,
    example_length,
    make_batch,
)
from bert_demo.tasks.data import find_data_dir, load_split, require_rows
from bert_demo.training.distributed import Ranks, rank_seed
from bert_demo.training.mnrl import MNRL_TASK, multiple_negatives_ranking_loss
from bert_demo.training.optim import make_optimizer, make_schedule, wrap_aggregator, wrap_pcgrad
from bert_demo.training.regularization import SmartTerms
from bert_demo.training.speed import autocast, resolve_adamw_impl, resolve_precision
from bert_demo.training.tensorboard_log import TensorBoardLog
from bert_demo.training.tensorboard_log import check_available as check_tensorboard
from bert_demo.training.weighting import build_weighting, shared_layer
from gradtools.weighting import DWA, FAMO, LossWeighting

__all__ = ["RESUMABLE", "Trainer", "aggregator_summary", "build_model", "steps_per_epoch", "total_steps", "train"]


def build_model(config: TrainConfig) -> MultitaskBert:
    """The pretrained encoder (with the config's dropout) under freshly initialised heads."""
    encoder = load_pretrained(
        config.model,
        hidden_dropout_prob=config.encoder_dropout,
        attention_probs_dropout_prob=config.encoder_dropout,
    )
    return new_model(config, encoder)


def steps_per_epoch(
    config: TrainConfig, train_sets: dict[str, list[Example]], world_size: int = 1
) -> int:
    """Steps of one pass over the largest task (batches of ``world_size`` processes each)."""
    if config.steps_per_epoch is not None:
        return config.steps_per_epoch
    return max(
        batches_per_pass(len(train_sets[t]), config.batch_size(t) * world_size)
        for t in config.tasks
    )


def total_steps(config: TrainConfig, per_epoch: int) -> int:
    steps = config.epochs * per_epoch
    return steps if config.max_steps is None else min(steps, config.max_steps)


class _Interrupt:
    """Turns the first Ctrl-C into a flag checked between steps; the second one aborts."""

    def __init__(self) -> None:
        self.requested = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again aborts)")

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Interrupt]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


class TrainingDiverged(RuntimeError):
    """A loss or gradient became inf or NaN; the last checkpoint is left as it was."""



class Trainer:
    """One training run in one folder. ``run()`` trains to the end (or to a Ctrl-C)."""

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | os.PathLike[str],
        *,
        resume: bool = False,
        device: str | torch.device | None = None,
        progress: bool = True,
        on_step: Callable[[int], None] | None = None,
        ranks: Ranks | None = None,
        keep_checkpoint: bool = False,
        tensorboard: bool | None = None,
    ) -> None:
        self.config = config
        self.keep_checkpoint = keep_checkpoint
        check_tensorboard(tensorboard)  # before the run folder is touched
        # This process among the torchrun processes (a single process by default).
        self.ranks = ranks if ranks is not None else Ranks()
        self.folder = RunFolder(out_dir)
        self.out = self.folder.path
        if not resume:
            # A refused --out (an existing run, a folder of other files) costs nothing.
            self.ranks.on_main(self.folder.check_new)
        self.device = resolve_device(None if device is None else str(device))
        # What this run computes in (auto and fused resolved for this machine).
        self.precision = resolve_precision(config.precision, self.device)
        self.adamw_impl = (resolve_adamw_impl(config.adamw_impl)
                           if config.optimizer == "adamw" else None)
        self.progress = progress
        self.on_step = on_step
        # Read the data before touching the run folder: a bad --data leaves nothing behind.
        data_dir = find_data_dir(config.data)
        self.train_sets = load_split(
            data_dir, config.tasks, "train", config.max_train_examples, random_subset=True
        )
        self.dev_sets = load_split(
            data_dir, model_tasks(config.tasks), "dev", config.max_eval_examples,
            random_subset=False,
        )
        # Refuse data the run cannot use before training, not at the first evaluation.
        require_rows(data_dir, "train", self.train_sets)
        require_rows(data_dir, "dev", self.dev_sets, config.max_eval_examples)

        torch.manual_seed(config.seed)
        self.lengths = {t: [example_length(e) for e in ex] for t, ex in self.train_sets.items()}
        self.tokenizer = WordPieceTokenizer.from_folder(resolve_model_path(config.model))
        self.model = build_model(config).to(self.device)
        # Only now that data and model have loaded does the run folder change.
        self.ranks.on_main(lambda: self._open_folder(resume))
        try:
            self._set_up(resume, tensorboard)
        except BaseException:
            self.folder.release()
            raise

    def _set_up(self, resume: bool, tensorboard: bool | None) -> None:
        config = self.config
        main = self.ranks.is_main
        self.ranks.broadcast_module(self.model)
        self.per_epoch = steps_per_epoch(config, self.train_sets, self.ranks.world_size)
        self.total = total_steps(config, self.per_epoch)

        if config.mode == "frozen":
            for p in self.model.encoder.parameters():
                p.requires_grad_(False)
        # The one generator of the aggregator's random draws (PCGrad's visiting orders);
        # its state travels in the optimizer's state dict.
        self.aggregator_generator = torch.Generator().manual_seed(config.seed)
        # --weighting's module; its learnable weights train in the heads' param group.
        self.weighting: LossWeighting | None = None
        if config.weighting is not None:
            self.weighting = build_weighting(
                config.weighting, len(config.tasks), seed=config.seed,
                shared=lambda: shared_layer(self.model, config.pooling),
                process_group=self.ranks.group).to(self.device)
        self.optimizer = self._make_optimizer()
        self.schedule = make_schedule(self.optimizer, config.schedule, self.total, config.warmup)
        self.smart = SmartTerms(config, self.model, self.total) if config.smart else None
        if self.ranks.rank > 0:
            # From here on each rank draws its own dropout masks and SMART noise
            # (rank 0 goes on with the stream a single process would use).
            torch.manual_seed(rank_seed(config.seed, self.ranks.rank))

        self.step = 0
        self.elapsed = 0.0
        self.last_metrics: dict[str, float] = {}
        self.eval_step = 0  # the step last_metrics were measured at
        # The latest evaluation's per-example dev predictions (for ablation statistics).
        self.last_predictions: dict[str, TaskPredictions] | None = None
        self.saved_step: int | None = None  # the step of checkpoint.pt, once there is one
        # Per-step statistics since the last metrics.jsonl "train" record (checkpointed, so
        # that a resumed run's next record averages the same steps as an uninterrupted one).
        self.window: dict[str, list[float]] = {}
        if resume:
            self._load_checkpoint()
            if self.step > self.total:
                raise RunDirError(
                    f"--resume: {self.out / CHECKPOINT} is at step {self.step}, past the "
                    f"{self.total} steps of these settings (--max-steps, --epochs)"
                )
            self.ranks.on_main(lambda: self.folder.trim_metrics(self.step, self.eval_step))
            self.ranks.on_main(lambda: self.folder.save_config(self.config))
            if self.step < self.total:
                self.ranks.on_main(self.folder.reopen)
            self.ranks.on_main(self._repair_best)
        self.tensorboard = TensorBoardLog(self.out, tensorboard if main else False,
                                          self._tensorboard_first_step(resume))
        if resume and main:
            self._replay_to_tensorboard()

    # ------------------------------------------------------------------ set-up

    def _open_folder(self, resume: bool) -> None:
        """Rank 0: lock the run folder, then create the run or check the resume."""
        model_folder = resolve_model_path(self.config.model)
        try:
            self.folder.acquire("train")
            if resume:
                self.folder.check_resume(self.config)
                # A changed --epochs/--max-steps is written once the checkpoint has been read.
                self.folder.ensure_encoder_files(model_folder, self.config.model)
            else:
                self.folder.create(self.config, model_folder)
        except BaseException as e:
            self.folder.release()
            if isinstance(e, OSError) and not isinstance(e, DiskFull):
                # a file where the folder should be, a read-only disk, ...
                raise RunDirError(f"--out {self.out}: cannot write the run there "
                                  f"({e.strerror or e}: {e.filename or self.out})") from e
            raise

    def _make_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        head_lr = config.head_lr if config.head_lr is not None else config.lr
        groups: list[dict[str, Any]] = [{"params": self.model.head_parameters(), "lr": head_lr}]
        if config.mode == "finetune":
            groups.insert(0, {"params": list(self.model.encoder.parameters()), "lr": config.lr})
        learned = [] if self.weighting is None else list(self.weighting.parameters())
        if learned:
            # The loss weights learn at the heads' rate, without weight decay: it would pull
            # them toward their initial values (UW's log-variances toward 0), which none of
            # the methods' papers does.
            groups.append({"params": learned, "lr": head_lr, "weight_decay": 0.0})
        optimizer = make_optimizer(config.optimizer, groups, config.weight_decay,
                                   self.adamw_impl or "for-loop")
        # With several processes each task's gradient is averaged over them before the
        # aggregator combines the global task gradients.
        if config.aggregator == "pcgrad":
            # gradtools.PCGrad, as runs before --aggregator trained (their checkpoints resume).
            optimizer = wrap_pcgrad(optimizer, self.aggregator_generator, self.ranks.group)
        elif config.aggregator is not None:
            optimizer = wrap_aggregator(optimizer, config.aggregator, self.aggregator_generator,
                                        self.ranks.group)
        return optimizer

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_state(self, rank_rng: list[dict[str, Any]]) -> dict[str, Any]:
        # PCGrad's own generator state travels in the optimizer's state dict.
        return {
            "format": run_dir.CHECKPOINT_FORMAT,
            # JSON strings: plain data that torch.load(weights_only=True) accepts.
            "config": json.dumps(self.config.to_dict()),
            "encoder_config": json.dumps(asdict(self.model.encoder.config)),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "smart": None if self.smart is None else self.smart.state_dict(),
            "weighting": None if self.weighting is None else self.weighting.state_dict(),
            "step": self.step,
            "elapsed_s": self.elapsed,
            "metrics": json.dumps(self.last_metrics),
            "eval_step": self.eval_step,
            "rng": rank_rng[0],
            "window": json.dumps(self.window),
            # Every process's random streams, so that a resumed run with the same
            # number of processes continues exactly.
            "world_size": len(rank_rng),
            "rank_rng": rank_rng,
        }

    def save_checkpoint(self) -> Path:
        """Write the checkpoint from rank 0 (every rank must call this: it gathers their RNG)."""
        self.ranks.check_replicas_equal(self.model)
        rank_rng = self.ranks.all_gather(capture_rng())
        self.ranks.on_main(lambda: self.folder.save_checkpoint(self._checkpoint_state(rank_rng)))
        self.saved_step = self.step
        return self.folder.checkpoint

    def _repair_best(self) -> None:
        """Rank 0 on resume: best weights whose dev predictions are not known to be theirs
        (a crash between the two files, or a run from before best.json) are evaluated again,
        so that the two are one unit before training goes on."""
        if not self.folder.best_needs_repair():
            return
        state, info = self.folder.best_weights()
        best = copy.deepcopy(self.model)
        best.load_state_dict(state)
        rng = capture_rng()  # evaluating draws nothing, but the resumed run must not differ
        _, predictions = self._evaluate_with_predictions(best)
        restore_rng(rng)
        self.folder.save_best(best, info, predictions)

    def _tensorboard_first_step(self, resume: bool) -> int:
        """TensorBoard hides what an earlier writer logged from this step on (purge_step).

        A new run: everything. A resumed run: what comes after the checkpoint, and the
        checkpoint's own step too when its evaluation is still to be done (the crashed run
        may have logged it); :meth:`_replay_to_tensorboard` puts back what metrics.jsonl
        keeps at that step.
        """
        if not resume:
            return 1
        return self.step if self._evaluation_pending() else self.step + 1

    def _replay_to_tensorboard(self) -> None:
        if not self.tensorboard.active:
            return
        for record in self.folder.metrics_from(self._tensorboard_first_step(resume=True)):
            self.tensorboard.log(record)

    def _load_checkpoint(self) -> None:
        # Rank 0 reads the file and sends it to the others (no shared disk needed).
        state = self.ranks.on_main(lambda: self.folder.read_checkpoint(self.ranks.world_size))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.smart is not None:
            self.smart.load_state_dict(state["smart"])
        if self.weighting is not None:
            self.weighting.load_state_dict(state["weighting"])
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed_s"])
        self.last_metrics = json.loads(state["metrics"])
        # Checkpoints before eval_step was recorded were only written after evaluating.
        self.eval_step = int(state.get("eval_step", self.step))
        self.saved_step = self.step
        # Checkpoints before the window was saved start their resumed window empty.
        self.window = json.loads(state.get("window", "{}"))
        restore_rng(state["rank_rng"][self.ranks.rank] if "rank_rng" in state else state["rng"])

    # ------------------------------------------------------------------ the step

    def training_step(self) -> dict[str, float]:
        """One optimizer step on one batch of every task; returns the losses and stats."""
        config, model = self.config, self.model
        model.train()
        stats: dict[str, float] = {}
        losses: list[Tensor] = []
        batches = []
        for task in config.tasks:
            examples = self.train_sets[task]
            # The global batch of all processes, then this process's share of it.
            rows = batch_indices(
                self.lengths[task], config.batch_size(task) * self.ranks.world_size, self.step,
                config.seed, task, config.length_buckets,
            )
            rows = self.ranks.shard(rows)
            batch = make_batch(
                task,
                [examples[i] for i in rows],
                self.tokenizer,
                config.max_length,
                model.separate_pairs,
                sts_aug=config.sts_aug,
            ).to(self.device)
            assert batch.labels is not None  # training files are labeled
            batches.append(batch)
            loss, embeds, output = self._task_loss(task, batch, stats)
            if self.smart is not None:
                # gradtools.SMART keeps its perturbation and divergences in float32.
                with autocast(self.precision, self.device):
                    extra, smart_stats = self.smart.terms(task, batch, embeds, output)
                loss = loss + extra
                stats.update({f"{k}_{task}": v for k, v in smart_stats.items()})
            losses.append(loss)
        finite = torch.isfinite(torch.stack([loss.detach() for loss in losses]))
        if self.ranks.any_rank(not bool(finite.all())):
            bad = [t for t, ok in zip(config.tasks, finite.tolist(), strict=True) if not ok]
            which = (f"the {', '.join(bad)} loss" + ("es are" if len(bad) > 1 else " is")
                     if bad else "a loss on another process is")
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1}: {which} not finite "
                "(try a lower --lr)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        try:
            if self.weighting is not None:
                self._weighted_backward(losses)
            elif config.combines_task_gradients:
                self.optimizer.backward(losses)  # type: ignore[attr-defined]
            else:
                torch.stack(losses).sum().backward()
                self.ranks.average_gradients(self.model.parameters())
            self.optimizer.step()
        except FloatingPointError as e:  # PCGrad and the aggregators refuse inf/NaN gradients
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1}: {e} (try a lower --lr)"
            ) from None
        self.schedule.step()
        if config.combines_task_gradients:
            stats.update(aggregator_summary(self.optimizer, config.tasks))
        if self.weighting is not None:
            stats.update(self._weighting_summary(stats))
            self._after_weighted_step(batches)
        if self.smart is not None:
            self.smart.after_step(model)
        self.step += 1
        # Losses and SMART terms were measured on this rank's rows: log their mean.
        return self.ranks.mean_of(stats)

    def _task_loss(
        self, task: str, batch: Any, stats: dict[str, float]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The task's loss on ``batch`` (with MNRL's term), its input embeddings and output."""
        config, model = self.config, self.model
        # Forward passes (SMART's and the teacher's too) run in the run's precision;
        # the losses outside autocast, in float32 (MNRL's matmul included).
        with autocast(self.precision, self.device):
            embeds = model.embed(batch.input_ids, batch.token_type_ids)
            output, vectors = model.forward_with_vectors(task, embeds, batch.attention_mask)
        output = output.float()
        loss = get_task(task).loss(output, batch.labels)
        stats[f"loss_{task}"] = loss.item()
        if task == MNRL_TASK and config.mnrl_weight > 0:
            anchors, candidates = vectors.float().chunk(2)
            mnrl = multiple_negatives_ranking_loss(
                anchors, candidates, batch.labels, config.mnrl_scale)
            stats["mnrl"] = mnrl.item()
            loss = loss + config.mnrl_weight * mnrl
        return loss, embeds, output

    def _weighted_backward(self, losses: list[Tensor]) -> None:
        """--weighting: the weighted loss's gradient (summed), or the weighted task losses
        handed to the aggregator."""
        weighting = self.weighting
        assert weighting is not None
        if not self.config.combines_task_gradients:
            weighting(losses).backward()
            self.ranks.average_gradients(self.model.parameters())
            return
        # One call of the weighting (DWA counts the calls, RLW draws on each) on detached
        # copies of the losses: its own parameters get their gradient, and the losses'
        # gradients are the weights of the task losses the aggregator combines. The
        # weighting's parameters then stay out of the aggregator's graph (the aggregator
        # would take them for shared parameters, every task reaching them).
        detached = torch.stack([loss.detach() for loss in losses]).requires_grad_()
        weighting(detached).backward()
        assert detached.grad is not None
        weights = detached.grad.detach()
        self.optimizer.backward(  # type: ignore[attr-defined]
            [w * loss for w, loss in zip(weights.unbind(), losses, strict=True)])

    def _weighting_summary(self, stats: dict[str, float]) -> dict[str, float]:
        """The loss weights as ``weight_<task>``; with an aggregator, which already logged its
        own weights as ``weight_<task>``, as ``loss_weight_<task>`` and ``weight_<task>`` the
        product: each task's raw gradient's weight in the step."""
        assert self.weighting is not None
        summary: dict[str, float] = {}
        for task, weight in zip(self.config.tasks, self.weighting.weights.tolist(), strict=True):
            if f"weight_{task}" in stats:
                summary[f"loss_weight_{task}"] = weight
                summary[f"weight_{task}"] = stats[f"weight_{task}"] * weight
            else:
                summary[f"weight_{task}"] = weight
        return summary

    def _after_weighted_step(self, batches: list[Any]) -> None:
        """FAMO's logit step (on the losses recomputed on this step's batches) and DWA's epoch end."""
        if isinstance(self.weighting, FAMO):
            with torch.no_grad():
                after = [self._task_loss(task, batch, {})[0]
                         for task, batch in zip(self.config.tasks, batches, strict=True)]
            self.weighting.update(torch.stack(after))
        if isinstance(self.weighting, DWA) and (self.step + 1) % self.per_epoch == 0:
            self.weighting.end_epoch()

    # ------------------------------------------------------------------ the loop

    def evaluate(self) -> dict[str, float]:
        metrics, self.last_predictions = self._evaluate_with_predictions()
        return metrics

    def _evaluate_with_predictions(
        self, model: MultitaskBert | None = None,
    ) -> tuple[dict[str, float], dict[str, TaskPredictions]]:
        with autocast(self.precision, self.device):
            return evaluate_with_predictions(
                self.model if model is None else model,
                self.dev_sets,
                self.tokenizer,
                self.config.max_length,
                self.config.eval_batch_size,
                self.device,
                progress=self.progress and self.ranks.is_main,
            )

    def _log_eval(self) -> dict[str, float]:
        def evaluate_and_log() -> dict[str, float]:
            self.last_predictions = None  # set by evaluate() (which tests may replace)
            metrics = self.evaluate()
            predictions = self.last_predictions
            record = {"event": "eval", "step": self.step, "epoch": self.step / self.per_epoch,
                      "elapsed_s": round(self.elapsed, 1), **metrics}
            self.folder.append_metrics(record)
            self.tensorboard.log(record)
            # Rank 0 keeps the best weights (ties keep the earlier ones; NaN never wins)
            # with their per-example predictions (the scores the ablation reports),
            # written now: a resumed run may not evaluate them again.
            score = selection_score(metrics, self.config.tasks)
            if score > self.folder.best_score(self.config.tasks):
                self.folder.save_best(self.model, self._weights_info(metrics), predictions)
            return metrics

        # Rank 0 evaluates (the replicas are equal) and tells the others.
        metrics = self.ranks.on_main(evaluate_and_log)
        self.last_metrics = metrics
        self.eval_step = self.step
        return metrics

    def _is_eval_step(self) -> bool:
        return self.step % self.per_epoch == 0 or self.step == self.total

    def _evaluation_pending(self) -> bool:
        """Resumed from a checkpoint saved before its epoch-end evaluation finished."""
        return self.step > 0 and self._is_eval_step() and self.eval_step != self.step

    def _save_and_evaluate(self, bar: tqdm[Any], started: float) -> None:
        """Epoch end: save the weights first (an evaluation error must not lose them),
        evaluate on dev, then save again so the checkpoint holds the dev metrics."""
        if self.saved_step != self.step:
            self.save_checkpoint()
        metrics = self._log_eval()
        self.elapsed = time.perf_counter() - started
        if self.ranks.is_main:
            bar.write(f"step {self.step}: " + _format_metrics(metrics))
        self.save_checkpoint()

    def run(self) -> dict[str, Any]:
        """Train to the last step; returns final.json's content (or raises KeyboardInterrupt).

        The run folder's lock, taken when the Trainer was made, is released at the end."""
        try:
            return self._run()
        finally:
            self.folder.release()

    def _run(self) -> dict[str, Any]:
        config = self.config
        interrupt = _Interrupt()
        running: dict[str, float] = {}
        main = self.ranks.is_main
        bar = tqdm(total=self.total, initial=self.step, disable=not (self.progress and main),
                   desc=f"train {self.out.name}", dynamic_ncols=True)
        started = time.perf_counter() - self.elapsed
        in_step = False
        with interrupt.installed():
            try:
                if self._evaluation_pending():
                    self._save_and_evaluate(bar, started)
                while self.step < self.total:
                    in_step = True
                    stats = self.training_step()
                    in_step = False
                    self.elapsed = time.perf_counter() - started
                    for key, value in stats.items():
                        self.window.setdefault(key, []).append(value)
                        if key.startswith("loss_"):
                            # Exponential average for the bar: readable, not jumpy.
                            old = running.get(key, value)
                            running[key] = 0.9 * old + 0.1 * value
                    bar.update(1)
                    bar.set_postfix({k[5:]: f"{v:.3f}" for k, v in running.items()})
                    if self.step % config.log_every == 0 or self.step == self.total:
                        if main:
                            record = self._train_record(self.window)
                            self.folder.append_metrics(record)
                            self.tensorboard.log(record)
                        self.window = {}
                    if self._is_eval_step():
                        self._save_and_evaluate(bar, started)
                    if self.on_step is not None:
                        self.on_step(self.step)
                    # All ranks stop after the same step (a Ctrl-C reaches them at
                    # slightly different times), so they save one checkpoint together.
                    if self.ranks.any_rank(interrupt.requested):
                        raise KeyboardInterrupt
            except TrainingDiverged as e:
                bar.close()
                self.tensorboard.close()
                kept = (f"{CHECKPOINT} keeps step {self.saved_step}" if self.saved_step is not None
                        else f"no {CHECKPOINT} was written")
                raise TrainingDiverged(f"{e}; {kept}") from None
            except KeyboardInterrupt:
                bar.close()
                self.tensorboard.close()
                if in_step:
                    # Aborted inside a step: the model may be half updated, so keep the
                    # last checkpoint as it is.
                    print(f"aborted during step {self.step + 1}; {CHECKPOINT} keeps the last save")
                    raise
                self.elapsed = time.perf_counter() - started
                path = self.save_checkpoint()
                if main:
                    print(f"saved {path} at step {self.step}; continue with --resume")
                raise
        bar.close()
        final = {
            "step": self.step,
            "epochs": self.step / self.per_epoch,
            "wall_s": round(self.elapsed, 1),
            "dev": self.last_metrics,
            # How it ran: --precision/--adamw-impl as resolved here, and torch's threads.
            "precision": self.precision,
            "adamw_impl": self.adamw_impl,
            "threads": torch.get_num_threads(),
            "config": config.to_dict(),
        }
        return self.ranks.on_main(lambda: self._finish(final))

    def _weights_info(self, metrics: dict[str, float]) -> WeightsInfo:
        return WeightsInfo(self.config.to_dict(), asdict(self.model.encoder.config), self.step,
                           self.step / self.per_epoch, metrics)

    def _finish(self, final: dict[str, Any]) -> dict[str, Any]:
        """Rank 0: model-only weights, final.json, then the checkpoint goes (unless kept).

        dev_predictions.csv.gz was written with best.safetensors (see ``_log_eval``).
        """
        final = self.folder.finish(self.model, self._weights_info(self.last_metrics), final,
                                   self.keep_checkpoint)
        self.tensorboard.close()
        return final

    def _train_record(self, window: dict[str, list[float]]) -> dict[str, Any]:
        record: dict[str, Any] = {
            "event": "train",
            "step": self.step,
            "epoch": self.step / self.per_epoch,
            "lr": self.schedule.get_last_lr()[0],
            "elapsed_s": round(self.elapsed, 1),
        }
        for key, values in window.items():
            finite = [v for v in values if math.isfinite(v)]
            record[key] = sum(finite) / len(finite) if finite else math.nan
        return record


def aggregator_summary(optimizer: Any, tasks: tuple[str, ...]) -> dict[str, float]:
    """Per-step numbers of the aggregator's statistics, under names that do not depend on
    which aggregator ran: conflicting task pairs, each pair's cosine, and each task's weight
    (averaged over blocks when the aggregator weighs blocks of parameters apart)."""
    stats = getattr(optimizer, "stats", None)
    if stats is None:
        return {}
    summary = {"conflicts": float(stats.conflicts.sum().item()) / 2}
    for i, a in enumerate(tasks):
        for j in range(i + 1, len(tasks)):
            summary[f"cos_{a}_{tasks[j]}"] = float(stats.cosine[i, j])
    weights = stats.weights.reshape(-1, len(tasks)).double().mean(0)
    for task, weight in zip(tasks, weights.tolist(), strict=True):
        summary[f"weight_{task}"] = weight
    return summary


def _format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    ranks: Ranks | None = None,
    keep_checkpoint: bool = False,
    tensorboard: bool | None = None,
) -> dict[str, Any]:
    """Train ``config`` into ``out_dir``; see :class:`Trainer`.

    Resuming a finished run with its own settings returns its final.json and changes
    nothing. With a changed --epochs/--max-steps it needs the checkpoint, which only
    --keep-checkpoint keeps; without it the change is refused by name.
    """
    if resume:
        finished = (ranks or Ranks()).on_main(lambda: _finished_run(RunFolder(out_dir), config))
        if finished is not None:
            return finished
    trainer = Trainer(
        config, out_dir, resume=resume, device=device, progress=progress, on_step=on_step,
        ranks=ranks, keep_checkpoint=keep_checkpoint, tensorboard=tensorboard,
    )
    return trainer.run()


def _finished_run(folder: RunFolder, config: TrainConfig) -> dict[str, Any] | None:
    """final.json of a finished run that --resume leaves as it is (see
    :meth:`RunFolder.finished_unchanged`), under the folder's lock; None to train on."""
    if not folder.is_finished():
        return None
    folder.acquire("train --resume")
    try:
        return folder.finished_unchanged(config)
    finally:
        folder.release()
