"""SMART's two extra loss terms for one task, wired to the multitask model.

    loss_task += lambda_s * R_s + mu * D_Breg

R_s (gradtools.SMART) perturbs the task's input embeddings inside an epsilon-ball
and measures how far the outputs move; D_Breg (gradtools.MomentumTeacher) measures
how far the outputs moved from those of an exponential moving average of the
model, updated after every optimizer step. Each task names its divergence in
:mod:`bert_demo.tasks` (symmetric KL over classes, Bernoulli symmetric KL for one
logit, squared error for a score).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

import gradtools
from bert_demo.model.multitask import MultitaskBert
from bert_demo.tasks import get_task
from bert_demo.tasks.batching import TaskBatch

if TYPE_CHECKING:
    from bert_demo.config import TrainConfig

class SmartTerms:
    """R_s and the Bregman proximal term of each task, and the teacher's update."""

    def __init__(self, config: TrainConfig, model: MultitaskBert, total_steps: int) -> None:
        self.model = model
        self.smart_lambda = config.smart_lambda
        self.bregman_mu = config.bregman_mu
        # Noise comes from the global random stream, which checkpoints save and
        # restore, so a resumed run draws the same perturbations.
        self.smart = gradtools.SMART(
            epsilon=config.smart_epsilon,
            noise_std=config.smart_sigma,
            step_size=config.smart_eta,
            steps=config.smart_steps,
        )
        self.teacher: gradtools.MomentumTeacher | None = None
        if config.bregman_mu > 0:
            # The paper's schedule: beta 0.99 for the first 10% of updates, then 0.999.
            self.teacher = gradtools.MomentumTeacher(model, total_steps=total_steps)

    def terms(
        self, task: str, batch: TaskBatch, embeds: Tensor, output: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """``lambda_s * R_s + mu * D_Breg`` for this task's batch, and what each was."""
        mask = batch.attention_mask
        kind = get_task(task).divergence

        def forward(perturbed: Tensor) -> Tensor:
            return self.model.forward_from_embeddings(task, perturbed, mask)

        r_s = self.smart(forward, embeds, output, kind=kind, mask=mask)
        assert isinstance(r_s, Tensor)
        stats = {"smart_rs": r_s.item()}
        if self.smart.stats is not None and self.smart.stats.delta_norm_max is not None:
            stats["smart_delta"] = self.smart.stats.delta_norm_max.item()
        extra = self.smart_lambda * r_s
        if self.teacher is not None:
            bregman = self._bregman(self.teacher, task, batch, output, kind)
            stats["bregman"] = bregman.item()
            extra = extra + self.bregman_mu * bregman
        return extra, stats

    @staticmethod
    def _bregman(
        teacher: gradtools.MomentumTeacher, task: str, batch: TaskBatch, output: Tensor, kind: str
    ) -> Tensor:
        def teacher_forward(teacher: nn.Module) -> Tensor:
            output: Tensor = teacher(
                task, batch.input_ids, batch.attention_mask, batch.token_type_ids
            )
            return output

        bregman = teacher.bregman(teacher_forward, output, kind=kind)
        assert isinstance(bregman, Tensor)
        return bregman

    def after_step(self, model: MultitaskBert) -> None:
        if self.teacher is not None:
            self.teacher.update(model)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": None if self.teacher is None else self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.teacher is not None:
            if state is None or state.get("teacher") is None:
                raise ValueError("the checkpoint has no SMART teacher state to resume from")
            self.teacher.load_state_dict(state["teacher"])
