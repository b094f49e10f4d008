"""The multitask training loop: one batch of every task per step, as in the paper.

Each step draws one batch per task (the order is a pure function of seed and step,
see :mod:`bert_demo.batching`), computes each task's loss (plus SMART's adversarial
and Bregman terms with ``smart``), and either sums the losses or hands them to
PCGrad, which removes conflicting components before the optimizer step.

A run lives in one folder (see :mod:`bert_demo.run_dir`). Checkpoints are written atomically at every epoch end, when training finishes and
on Ctrl-C (the step in flight completes first; a second Ctrl-C aborts at once).

Under torchrun every process runs this loop on its share of each batch; see
:mod:`bert_demo.distributed` for what is averaged and what only rank 0 does.
"""

from __future__ import annotations

import contextlib
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

from bert_demo import run_dir
from bert_demo.batching import (
    Example,
    batch_indices,
    batches_per_pass,
    example_length,
    make_batch,
)
from bert_demo.config import TrainConfig
from bert_demo.data import find_data_dir, load_split
from bert_demo.dev_predictions import DEV_PREDICTIONS, write_dev_predictions
from bert_demo.distributed import Ranks, rank_seed
from bert_demo.evaluate import TaskPredictions, evaluate_with_predictions
from bert_demo.mnrl import MNRL_TASK, multiple_negatives_ranking_loss
from bert_demo.model import load_pretrained, resolve_model_path
from bert_demo.multitask import MultitaskBert
from bert_demo.optim import make_optimizer, make_schedule, wrap_aggregator, wrap_pcgrad
from bert_demo.regularization import SmartTerms
from bert_demo.run_dir import (
    CHECKPOINT,
    CONFIG,
    FINAL,
    METRICS,
    RunDirError,
    append_jsonl,
    load_config,
    new_model,
    read_checkpoint,
    resolve_device,
    save_config,
    save_torch,
    write_json,
)
from bert_demo.speed import autocast, resolve_adamw_impl, resolve_precision
from bert_demo.tasks import get_task, model_tasks
from bert_demo.tokenizer import WordPieceTokenizer

__all__ = ["Trainer", "build_model", "pcgrad_summary", "steps_per_epoch", "total_steps", "train"]


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
    ) -> None:
        self.config = config
        # This process among the torchrun processes (a single process by default).
        self.ranks = ranks if ranks is not None else Ranks()
        self.out = Path(out_dir)
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
        self.ranks.on_main(lambda: self._prepare_run_dir(resume))

        torch.manual_seed(config.seed)
        self.lengths = {t: [example_length(e) for e in ex] for t, ex in self.train_sets.items()}
        self.tokenizer = WordPieceTokenizer.from_folder(resolve_model_path(config.model))
        self.model = build_model(config).to(self.device)
        self.ranks.broadcast_module(self.model)
        self.per_epoch = steps_per_epoch(config, self.train_sets, self.ranks.world_size)
        self.total = total_steps(config, self.per_epoch)

        if config.mode == "pretrain":
            for p in self.model.encoder.parameters():
                p.requires_grad_(False)
        self.pcgrad_generator = torch.Generator().manual_seed(config.seed)
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
        # The latest evaluation's per-example dev predictions (for ablation statistics).
        self.last_predictions: dict[str, TaskPredictions] | None = None
        if resume:
            self._load_checkpoint()

    # ------------------------------------------------------------------ set-up

    def _prepare_run_dir(self, resume: bool) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint, saved_config = self.out / CHECKPOINT, self.out / CONFIG
        if resume:
            if not checkpoint.is_file():
                raise RunDirError(f"--resume: {checkpoint} does not exist; nothing to resume")
            saved = load_config(saved_config)
            if saved != self.config:
                changed = sorted(
                    k for k, v in saved.to_dict().items() if self.config.to_dict()[k] != v
                )
                raise RunDirError(
                    f"--resume: settings differ from the run in {self.out} ({', '.join(changed)}); "
                    "a resumed run keeps its settings"
                )
        else:
            if checkpoint.exists():
                raise RunDirError(
                    f"{self.out} already holds a run ({CHECKPOINT}); pass --resume to continue "
                    "it or choose another --out"
                )
            for name in (METRICS, FINAL, DEV_PREDICTIONS):
                (self.out / name).unlink(missing_ok=True)
            save_config(self.config, saved_config)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        head_lr = config.head_lr if config.head_lr is not None else config.lr
        groups: list[dict[str, Any]] = [{"params": self.model.head_parameters(), "lr": head_lr}]
        if config.mode == "finetune":
            groups.insert(0, {"params": list(self.model.encoder.parameters()), "lr": config.lr})
        optimizer = make_optimizer(config.optimizer, groups, config.weight_decay,
                                   self.adamw_impl or "for-loop")
        if config.pcgrad:
            # With several processes PCGrad averages each task's gradient over them
            # before the surgery, which then runs on the global task gradients.
            optimizer = wrap_pcgrad(optimizer, self.pcgrad_generator, self.ranks.group)
        elif config.aggregator is not None:
            optimizer = wrap_aggregator(optimizer, config.aggregator, self.pcgrad_generator,
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
            "step": self.step,
            "elapsed_s": self.elapsed,
            "metrics": json.dumps(self.last_metrics),
            "rng": rank_rng[0],
            # Every process's random streams, so that a resumed run with the same
            # number of processes continues exactly.
            "world_size": len(rank_rng),
            "rank_rng": rank_rng,
        }

    def save_checkpoint(self) -> Path:
        """Write the checkpoint from rank 0 (every rank must call this: it gathers their RNG)."""
        path = self.out / CHECKPOINT
        self.ranks.check_replicas_equal(self.model)
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        rank_rng = self.ranks.all_gather(rng)
        self.ranks.on_main(lambda: save_torch(self._checkpoint_state(rank_rng), path))
        return path

    def _read_checkpoint(self) -> dict[str, Any]:
        path = self.out / CHECKPOINT
        state = read_checkpoint(path)
        saved_world = state.get("world_size", 1)
        if saved_world != self.ranks.world_size:
            raise RunDirError(
                f"--resume: {path} was written by {saved_world} process(es) and this run has "
                f"{self.ranks.world_size}; the batches depend on it, so resume with "
                f"torchrun --nproc_per_node {saved_world} (or without torchrun for 1)"
            )
        return state

    def _load_checkpoint(self) -> None:
        # Rank 0 reads the file and sends it to the others (no shared disk needed).
        state = self.ranks.on_main(self._read_checkpoint)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.smart is not None:
            self.smart.load_state_dict(state["smart"])
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed_s"])
        self.last_metrics = json.loads(state["metrics"])
        rng = state["rank_rng"][self.ranks.rank] if "rank_rng" in state else state["rng"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # ------------------------------------------------------------------ the step

    def training_step(self) -> dict[str, float]:
        """One optimizer step on one batch of every task; returns the losses and stats."""
        config, model = self.config, self.model
        model.train()
        stats: dict[str, float] = {}
        losses: list[Tensor] = []
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
            if self.smart is not None:
                # gradtools.SMART keeps its perturbation and divergences in float32.
                with autocast(self.precision, self.device):
                    extra, smart_stats = self.smart.terms(task, batch, embeds, output)
                loss = loss + extra
                stats.update({f"{k}_{task}": v for k, v in smart_stats.items()})
            losses.append(loss)
        self.optimizer.zero_grad(set_to_none=True)
        if config.combines_task_gradients:
            self.optimizer.backward(losses)  # type: ignore[attr-defined]
        else:
            torch.stack(losses).sum().backward()
            self.ranks.average_gradients(self.model.parameters())
        self.optimizer.step()
        self.schedule.step()
        if config.combines_task_gradients:
            stats.update(pcgrad_summary(self.optimizer, config.tasks))
        if self.smart is not None:
            self.smart.after_step(model)
        self.step += 1
        # Losses and SMART terms were measured on this rank's rows: log their mean.
        return self.ranks.mean_of(stats)

    # ------------------------------------------------------------------ the loop

    def evaluate(self) -> dict[str, float]:
        metrics, self.last_predictions = self._evaluate_with_predictions()
        return metrics

    def _evaluate_with_predictions(
        self,
    ) -> tuple[dict[str, float], dict[str, TaskPredictions]]:
        with autocast(self.precision, self.device):
            return evaluate_with_predictions(
                self.model,
                self.dev_sets,
                self.tokenizer,
                self.config.max_length,
                self.config.eval_batch_size,
                self.device,
            )

    def _log_eval(self) -> dict[str, float]:
        def evaluate_and_log() -> dict[str, float]:
            metrics = self.evaluate()
            append_jsonl(
                self.out / METRICS,
                {"event": "eval", "step": self.step, "epoch": self.step / self.per_epoch,
                 "elapsed_s": round(self.elapsed, 1), **metrics},
            )
            return metrics

        # Rank 0 evaluates (the replicas are equal) and tells the others.
        metrics = self.ranks.on_main(evaluate_and_log)
        self.last_metrics = metrics
        return metrics

    def run(self) -> dict[str, Any]:
        """Train to the last step; returns final.json's content (or raises KeyboardInterrupt)."""
        config = self.config
        interrupt = _Interrupt()
        window: dict[str, list[float]] = {}
        running: dict[str, float] = {}
        main = self.ranks.is_main
        bar = tqdm(total=self.total, initial=self.step, disable=not (self.progress and main),
                   desc=f"train {self.out.name}", dynamic_ncols=True)
        started = time.perf_counter() - self.elapsed
        in_step = False
        with interrupt.installed():
            try:
                while self.step < self.total:
                    in_step = True
                    stats = self.training_step()
                    in_step = False
                    self.elapsed = time.perf_counter() - started
                    for key, value in stats.items():
                        window.setdefault(key, []).append(value)
                        if key.startswith("loss_"):
                            # Exponential average for the bar: readable, not jumpy.
                            old = running.get(key, value)
                            running[key] = 0.9 * old + 0.1 * value
                    bar.update(1)
                    bar.set_postfix({k[5:]: f"{v:.3f}" for k, v in running.items()})
                    if self.step % config.log_every == 0 or self.step == self.total:
                        if main:
                            append_jsonl(self.out / METRICS, self._train_record(window))
                        window = {}
                    if self.step % self.per_epoch == 0 or self.step == self.total:
                        metrics = self._log_eval()
                        self.elapsed = time.perf_counter() - started
                        if main:
                            bar.write(f"step {self.step}: " + _format_metrics(metrics))
                        self.save_checkpoint()
                    if self.on_step is not None:
                        self.on_step(self.step)
                    # All ranks stop after the same step (a Ctrl-C reaches them at
                    # slightly different times), so they save one checkpoint together.
                    if self.ranks.any_rank(interrupt.requested):
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                bar.close()
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
        if main:
            if self.last_predictions is not None:
                write_dev_predictions(self.out / DEV_PREDICTIONS, self.last_predictions)
            write_json(self.out / FINAL, final)
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


def pcgrad_summary(optimizer: Any, tasks: tuple[str, ...]) -> dict[str, float]:
    """Per-step numbers from PCGrad's stats: conflicting pairs and each pair's cosine."""
    stats = getattr(optimizer, "stats", None)
    if stats is None:
        return {}
    summary = {"pcgrad_conflicts": float(stats.conflicts.sum().item()) / 2}
    for i, a in enumerate(tasks):
        for j in range(i + 1, len(tasks)):
            summary[f"pcgrad_cos_{a}_{tasks[j]}"] = float(stats.cosine[i, j])
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
) -> dict[str, Any]:
    """Train ``config`` into ``out_dir``; see :class:`Trainer`."""
    trainer = Trainer(
        config, out_dir, resume=resume, device=device, progress=progress, on_step=on_step,
        ranks=ranks,
    )
    return trainer.run()
