"""Momentum (EMA) teacher and the Bregman proximal point term of SMART (Jiang et al. 2020).

The teacher holds its own copy of the student's weights and follows them by an
exponential moving average after every optimizer step,

    theta_teacher <- beta * theta_teacher + (1 - beta) * theta_student,

with ``beta = warmup_beta`` (0.99) for the first ``warmup_steps`` updates (by
default the first 10% of ``total_steps``) and ``beta`` (0.999) after. The
Bregman proximal term keeps the student's outputs near the teacher's,

    D_Breg = D(f(x; theta_student), f(x; theta_teacher)),

with the same divergences as SMART (symmetric KL, Bernoulli symmetric KL,
squared error). The teacher runs under ``torch.no_grad`` and its parameters do
not require grad, so ``D_Breg`` trains the student only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from gradtools.divergences import Kinds, Outputs, output_divergences, output_keys, regroup
from gradtools.dropout_policy import RngState, check_policy, check_rng_device, extra_pass


@dataclass
class TeacherStats:
    """The last Bregman term (detached, on device) and the beta of the last update."""

    bregman: Tensor | None = None
    per_output: dict[str, Tensor] = field(default_factory=dict)
    last_beta: float | None = None


def _check_beta(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


class MomentumTeacher:
    """An EMA copy of a model that supplies the Bregman proximal term.

    Args:
        model: the student. The teacher deep-copies it (its own storage, never an
            alias), freezes the copy's parameters, and starts equal to it.
        total_steps: the number of optimizer steps planned; the first
            ``warmup_fraction`` of them use ``warmup_beta``.
        warmup_steps: the number of updates that use ``warmup_beta``, instead of
            deriving it from ``total_steps`` (``0``: ``beta`` throughout). One of
            ``total_steps`` and ``warmup_steps`` is required.
        warmup_fraction: share of ``total_steps`` with ``warmup_beta`` (paper: 0.1).
        warmup_beta: EMA momentum early in training (paper: 0.99).
        beta: EMA momentum afterwards (paper: 0.999).
        dropout: the teacher pass's dropout: ``"off"`` (default, the copy is in eval
            mode), ``"keep"`` (training mode, fresh masks) or ``"replay"`` (training
            mode, the masks of the student's clean pass via ``rng_state=``).

    Use: after each ``optimizer.step()`` call ``teacher.update(model)``; in the loss,
    ``mu * teacher.bregman(lambda m: m(inputs), student_outputs, kind="kl")``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        total_steps: int | None = None,
        warmup_steps: int | None = None,
        warmup_fraction: float = 0.1,
        warmup_beta: float = 0.99,
        beta: float = 0.999,
        dropout: Literal["keep", "off", "replay"] | str = "off",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.beta = _check_beta("beta", beta)
        self.warmup_beta = _check_beta("warmup_beta", warmup_beta)
        fraction = _check_beta("warmup_fraction", warmup_fraction)
        if warmup_steps is not None:
            self.warmup_steps = _check_count("warmup_steps", warmup_steps)
        elif total_steps is not None:
            total = _check_count("total_steps", total_steps)
            # The small slack keeps e.g. 0.1 * 70 = 7.000000000000001 from reading as 7.0000001.
            self.warmup_steps = math.floor(fraction * total + 1e-9)
        else:
            raise ValueError(
                "MomentumTeacher needs total_steps (the first warmup_fraction of them use "
                "warmup_beta) or warmup_steps (0 to use beta throughout)"
            )
        check_policy(dropout)
        self.dropout = dropout
        self.num_updates = 0
        self.module = copy.deepcopy(model)
        for param in self.module.parameters():
            param.requires_grad_(False)
            param.grad = None
        self.module.train(dropout != "off")
        self._names = [name for name, _ in self.module.named_parameters()]
        self.stats = TeacherStats()

    def __repr__(self) -> str:
        return (
            f"MomentumTeacher(num_updates={self.num_updates}, warmup_steps={self.warmup_steps}, "
            f"warmup_beta={self.warmup_beta}, beta={self.beta}, dropout={self.dropout!r})"
        )

    def beta_at(self, update: int) -> float:
        """The momentum used by the ``update``-th call of :meth:`update` (counting from 1)."""
        return self.warmup_beta if update <= self.warmup_steps else self.beta

    @property
    def next_beta(self) -> float:
        """The momentum the next :meth:`update` will use."""
        return self.beta_at(self.num_updates + 1)

    def _paired_parameters(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        student = list(model.named_parameters())
        names = [name for name, _ in student]
        if names != self._names:
            raise ValueError(
                "model: its parameters do not match the teacher's (update() needs the same "
                f"architecture the teacher was built from); first names {names[:3]} vs "
                f"{self._names[:3]}"
            )
        teacher: list[Tensor] = [param for _, param in self.module.named_parameters()]
        for (name, s), t in zip(student, teacher, strict=True):
            if s.shape != t.shape or s.dtype != t.dtype or s.device != t.device:
                raise ValueError(
                    f"model: parameter {name!r} is {s.dtype} {list(s.shape)} on {s.device} "
                    f"but the teacher's is {t.dtype} {list(t.shape)} on {t.device}"
                )
        return teacher, [s.detach() for _, s in student]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``; call after every optimizer step.

        Floating-point parameters move by ``lerp`` with weight ``1 - beta``;
        buffers (e.g. running statistics) and integer parameters are copied.
        """
        teacher, student = self._paired_parameters(model)
        beta = self.next_beta
        floats = [(t, s) for t, s in zip(teacher, student, strict=True) if t.is_floating_point()]
        if floats:
            # One fused kernel per device/dtype group instead of a Python loop over tensors.
            torch._foreach_lerp_([t for t, _ in floats], [s for _, s in floats], 1.0 - beta)
        for t, s in zip(teacher, student, strict=True):
            if not t.is_floating_point():
                t.copy_(s)
        teacher_buffers = list(self.module.named_buffers())
        student_buffers = list(model.named_buffers())
        if [n for n, _ in teacher_buffers] != [n for n, _ in student_buffers]:
            raise ValueError("model: its buffers do not match the teacher's")
        for (name, t_buf), (_, s_buf) in zip(teacher_buffers, student_buffers, strict=True):
            if t_buf.shape != s_buf.shape:
                raise ValueError(f"model: buffer {name!r} changed shape")
            t_buf.copy_(s_buf)
        self.num_updates += 1
        self.stats.last_beta = beta

    def outputs(
        self, forward: Callable[[nn.Module], Outputs], *, rng_state: RngState | None = None
    ) -> Outputs:
        """``forward(teacher_module)`` under ``no_grad`` and the teacher's dropout policy."""
        if not callable(forward):
            raise TypeError(f"forward must be callable, got {type(forward).__name__}")
        policy_module = self.module if self.dropout == "off" else None
        if self.dropout == "replay":
            first = next(self.module.parameters(), None)
            if first is not None:
                check_rng_device(rng_state, first.device)
        with torch.no_grad(), extra_pass(self.dropout, policy_module, rng_state):
            return forward(self.module)

    @overload
    def bregman(
        self,
        forward: Callable[[nn.Module], Outputs],
        student_outputs: Outputs,
        kind: Kinds = ...,
        *,
        rng_state: RngState | None = ...,
        per_output: Literal[False] = ...,
    ) -> Tensor: ...

    @overload
    def bregman(
        self,
        forward: Callable[[nn.Module], Outputs],
        student_outputs: Outputs,
        kind: Kinds = ...,
        *,
        rng_state: RngState | None = ...,
        per_output: Literal[True],
    ) -> Outputs: ...

    def bregman(
        self,
        forward: Callable[[nn.Module], Outputs],
        student_outputs: Outputs,
        kind: Kinds = "kl",
        *,
        rng_state: RngState | None = None,
        per_output: bool = False,
    ) -> Tensor | Outputs:
        """The Bregman proximal term ``D(student_outputs, teacher outputs)``.

        Args:
            forward: called with the teacher's module, returns outputs shaped like
                ``student_outputs`` (e.g. ``lambda m: m.forward_from_embeddings(...)``
                with the teacher computing its own embeddings).
            student_outputs: the student's outputs on the same inputs (with grad).
            kind: ``"kl"``, ``"bkl"`` or ``"mse"``, one for all outputs or per output.
            rng_state: required for ``dropout="replay"``.
            per_output: return one term per output, in the outputs' structure.
        """
        teacher_outputs = self.outputs(forward, rng_state=rng_state)
        divergences = output_divergences(
            student_outputs, teacher_outputs, kind, "student_outputs", "teacher outputs"
        )
        values = [value for _, value in divergences]
        total = torch.stack(values).sum()
        self.stats.bregman = total.detach()
        self.stats.per_output = dict(
            zip(output_keys(student_outputs), (v.detach() for v in values), strict=True)
        )
        if per_output:
            return regroup(student_outputs, values)
        return total

    def state_dict(self) -> dict[str, Any]:
        """The teacher's weights and schedule position, for resuming training."""
        return {
            "module": self.module.state_dict(),
            "num_updates": self.num_updates,
            "warmup_steps": self.warmup_steps,
            "warmup_beta": self.warmup_beta,
            "beta": self.beta,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (weights, update count and schedule)."""
        missing = {"module", "num_updates", "warmup_steps", "warmup_beta", "beta"} - set(state)
        if missing:
            raise ValueError(f"state: missing keys {sorted(missing)}")
        self.module.load_state_dict(state["module"])
        self.num_updates = _check_count("num_updates", int(state["num_updates"]))
        self.warmup_steps = _check_count("warmup_steps", int(state["warmup_steps"]))
        self.warmup_beta = _check_beta("warmup_beta", float(state["warmup_beta"]))
        self.beta = _check_beta("beta", float(state["beta"]))
