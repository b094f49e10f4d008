r"""AdamW written from scratch, numerically identical to ``torch.optim.AdamW``.

The algorithm (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"),
for each parameter :math:`\theta` with gradient :math:`g_t` at step :math:`t`:

.. math::
    \begin{aligned}
    g_t &\leftarrow -g_t \quad \text{if maximize} \\
    \theta_t &\leftarrow \theta_{t-1} (1 - \gamma \lambda)
        && \text{decoupled weight decay} \\
    m_t &\leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
    v_t &\leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
    \hat v_t &\leftarrow \max(\hat v_{t-1}, v_t) \text{ if amsgrad else } v_t \\
    \theta_t &\leftarrow \theta_t - \frac{\gamma}{1 - \beta_1^t}
        \cdot \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}
    \end{aligned}

With ``correct_bias=False`` (the flag of the old ``transformers.AdamW``) both
bias corrections are 1.

Three implementations of the same update:

- ``"for-loop"``: one tensor at a time, in exactly the operation order of
  ``torch.optim.AdamW(foreach=False)``, so results are bitwise identical. This is
  the reference the other two are tested against.
- ``"foreach"``: the same arithmetic on lists of tensors with ``torch._foreach_*``
  kernels (fewer kernel launches; the default on CUDA, as in torch).
- ``"compiled"`` (``fused=True``): the whole per-parameter update as one
  ``torch.compile``'d elementwise kernel (see "The compiled kernel" below). If no
  compiler is available it falls back to ``"foreach"`` with a warning.

Precision: the for-loop and foreach paths do each operation in the parameter's
dtype, as torch's do, so they stay bitwise identical to torch for bf16 too. The
compiled path does the math in float32 (float64 for float64 parameters) and
rounds once on the store, as torch's fused kernels do; in bf16, 0.999 would
round to 1.0 and the second moment would never move. A tensor ``lr`` is kept as
given, and the scalars derived from it are computed in its dtype, as in torch.

The module is laid out as ``torch/optim/adamw.py`` is: the thin
:class:`AdamW` class gathers each group's tensors and hyperparameters; the
functional :func:`adamw_step` does the update with one of the implementations.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradtools.tensor_groups import group_by_device_dtype

__all__ = [
    "AdamW", "AdamWHyper", "AdamWTensors", "adamw_step", "check_hyperparameters", "compile_failure",
]

Implementation = Literal["for-loop", "foreach", "compiled"]

# Devices where torch defaults to its foreach kernels; we default the same way.
_FOREACH_DEFAULT_DEVICES = ("cuda", "xpu", "mtia")


@dataclass
class AdamWTensors:
    """The tensors one AdamW update reads and writes, aligned by parameter.

    ``max_exp_avg_sqs`` is empty unless amsgrad is on; ``steps`` are the
    per-parameter step counters (float32 CPU scalars, as in torch).
    """

    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    max_exp_avg_sqs: list[Tensor] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)

    def subset(self, indices: list[int]) -> AdamWTensors:
        """The same tensors for the parameters at ``indices`` only."""

        def pick(tensors: list[Tensor]) -> list[Tensor]:
            return [tensors[i] for i in indices] if tensors else []

        return AdamWTensors(
            pick(self.params),
            pick(self.grads),
            pick(self.exp_avgs),
            pick(self.exp_avg_sqs),
            pick(self.max_exp_avg_sqs),
            pick(self.steps),
        )


@dataclass(frozen=True)
class AdamWHyper:
    """The hyperparameters of one parameter group, as plain Python numbers.

    ``lr`` may be a 1-element tensor, as in torch; the scalars derived from it
    (:func:`decay_factor`, :func:`bias_corrections`) are then computed in that
    tensor's dtype, exactly as ``torch.optim.AdamW`` does.
    """

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    correct_bias: bool


_CHECKED = ("lr", "betas", "eps", "weight_decay")


def _number(name: str, value: object, where: str) -> float:
    """``value`` as a float; a 1-element tensor is allowed (as torch allows for lr)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element{where}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number{where}, got {type(value).__name__}")
    return float(value)


def check_hyperparameters(where: str = "", **values: Any) -> None:
    """Refuse an invalid ``lr``, ``betas``, ``eps`` or ``weight_decay`` (those given).

    Messages are torch's where torch has a check (``where`` is empty for the
    constructor's arguments); beyond torch, infinite values are refused too,
    since they train into NaN. ``where`` names the param group, e.g.
    ``" in param group 1"``.
    """
    if "lr" in values:
        lr = values["lr"]
        value = _number("lr", lr, where)
        if not value >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}{where}")
        if not math.isfinite(value):
            raise ValueError(f"Invalid learning rate: {lr}{where} (lr must be finite)")
    if "betas" in values:
        betas = values["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2){where}, got {betas!r}")
        for index, beta in enumerate(betas):
            if not 0.0 <= _number(f"betas[{index}]", beta, where) < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}{where}")
    for name, label in (("eps", "epsilon"), ("weight_decay", "weight_decay")):
        if name in values:
            raw = values[name]
            value = _number(name, raw, where)
            if not value >= 0.0:
                raise ValueError(f"Invalid {label} value: {raw}{where}")
            if not math.isfinite(value):
                raise ValueError(f"Invalid {label} value: {raw}{where} ({name} must be finite)")


class AdamW(Optimizer):
    """AdamW, bitwise identical to ``torch.optim.AdamW(foreach=False)`` in float32.

    Args:
        params: parameters or parameter groups to optimize.
        lr: learning rate (default 1e-3).
        betas: coefficients of the running averages of the gradient and its square
            (default (0.9, 0.999)).
        eps: added to the denominator for numerical stability (default 1e-8).
        weight_decay: decoupled weight decay coefficient (default 1e-2).
        amsgrad: use the maximum of past second moments (default False).
        maximize: maximize the objective instead of minimizing (default False).
        foreach: use the ``torch._foreach_*`` implementation. ``None`` chooses it
            where torch does (parameters on CUDA/XPU), else the for-loop.
        fused: use one compiled kernel per parameter (``torch.compile``, math in
            float32). Faster than the for-loop on CPU but slower than torch's own
            ``fused=True`` kernel (see benchmarks/RESULTS.md); the first step pays
            the compilation. Falls back to foreach without a compiler. Cannot be
            combined with ``foreach=True``.
        correct_bias: apply Adam's bias correction (default True). ``False``
            reproduces the legacy ``transformers.AdamW(correct_bias=False)``.

    The state of each parameter (``step``, ``exp_avg``, ``exp_avg_sq`` and, with
    amsgrad, ``max_exp_avg_sq``) has the same names, shapes and dtypes as
    torch's, so state dicts load across the two where the fields match.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        correct_bias: bool = True,
    ) -> None:
        check_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = {
            "lr": lr,
            "betas": (float(betas[0]), float(betas[1])),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "correct_bias": correct_bias,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, refusing invalid hyperparameters as the constructor does.

        torch checks only the constructor's arguments; a group's own ``lr`` of NaN
        would train into NaN, so every group is checked too (its index is named).
        """
        if isinstance(param_group, dict):
            overrides = {key: param_group[key] for key in _CHECKED if key in param_group}
            check_hyperparameters(**overrides, where=f" in param group {len(self.param_groups)}")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called by load_state_dict: groups saved by torch.optim.AdamW lack our
        # `correct_bias`, and old pickles may lack newer flags.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("correct_bias", True)
        # torch keeps `step` as a float32 CPU tensor; accept plain numbers too.
        for param_state in self.state.values():
            step = param_state.get("step")
            if step is not None and not torch.is_tensor(step):
                param_state["step"] = torch.tensor(float(step), dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            tensors = self._gather(group)
            if not tensors.params:
                continue
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            hyper = AdamWHyper(
                lr=lr if isinstance(lr, Tensor) else float(lr),
                beta1=float(beta1),
                beta2=float(beta2),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                amsgrad=bool(group["amsgrad"]),
                maximize=bool(group["maximize"]),
                correct_bias=bool(group["correct_bias"]),
            )
            adamw_step(tensors, hyper, implementation=_choose_implementation(group, tensors.params))
        return loss

    def _gather(self, group: dict[str, Any]) -> AdamWTensors:
        """Collect the parameters that have a gradient, creating state lazily."""
        tensors = AdamWTensors()
        for index, p in enumerate(group["params"]):
            if p.grad is None:
                continue  # an untouched parameter: no step, no decay, no state
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"gradtools.AdamW does not support sparse gradients (parameter {index} of its "
                    "group has one); use torch.optim.SparseAdam or a dense embedding"
                )
            state = self.state[p]
            if len(state) == 0:
                # Same layout as torch: `step` a float32 scalar on the CPU.
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            tensors.params.append(p)
            tensors.grads.append(p.grad)
            tensors.exp_avgs.append(state["exp_avg"])
            tensors.exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                tensors.max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            tensors.steps.append(state["step"])
        return tensors


def _choose_implementation(group: dict[str, Any], params: list[Tensor]) -> Implementation:
    if group["fused"]:
        return "compiled"
    foreach = group["foreach"]
    if foreach is None:
        foreach = all(p.device.type in _FOREACH_DEFAULT_DEVICES for p in params)
    return "foreach" if foreach else "for-loop"


def adamw_step(
    tensors: AdamWTensors,
    hyper: AdamWHyper,
    implementation: Implementation = "for-loop",
) -> None:
    """Functional AdamW: update the parameters and their state in place."""
    if implementation == "for-loop":
        _for_loop_step(tensors, hyper)
    elif implementation == "foreach":
        _foreach_step(tensors, hyper)
    elif implementation == "compiled":
        if not _compiled_step(tensors, hyper):
            _foreach_step(tensors, hyper)
    else:
        raise ValueError(
            f"implementation must be 'for-loop', 'foreach' or 'compiled', got {implementation!r}"
        )


def decay_factor(hyper: AdamWHyper) -> float:
    """The decoupled weight decay multiplier ``1 - lr * weight_decay``.

    With a tensor lr this is tensor arithmetic in the lr's dtype (float32 by
    default), as in torch; with a float lr it is Python (float64) arithmetic.
    """
    return float(1 - hyper.lr * hyper.weight_decay)


def bias_corrections(hyper: AdamWHyper, step: float) -> tuple[float, float]:
    """Return (step_size, sqrt of the second-moment correction) at ``step``.

    Computed exactly as torch does (Python floats, or the lr tensor's dtype for
    the step size when lr is a tensor), so that the for-loop path stays bitwise
    identical.
    """
    if not hyper.correct_bias:
        return float(hyper.lr), 1.0
    bias_correction1 = 1 - hyper.beta1**step
    bias_correction2 = 1 - hyper.beta2**step
    return float(hyper.lr / bias_correction1), bias_correction2**0.5


def _real_views(*tensors: Tensor) -> list[Tensor]:
    # Complex parameters are updated as pairs of reals, as torch does.
    return [torch.view_as_real(t) if torch.is_complex(t) else t for t in tensors]


def _for_loop_step(tensors: AdamWTensors, hyper: AdamWHyper) -> None:
    for i, param in enumerate(tensors.params):
        grad = -tensors.grads[i] if hyper.maximize else tensors.grads[i]
        step_t = tensors.steps[i]
        step_t += 1
        if hyper.weight_decay != 0:
            param.mul_(decay_factor(hyper))
        param, grad, exp_avg, exp_avg_sq = _real_views(
            param, grad, tensors.exp_avgs[i], tensors.exp_avg_sqs[i]
        )

        exp_avg.lerp_(grad, 1 - hyper.beta1)
        exp_avg_sq.mul_(hyper.beta2).addcmul_(grad, grad, value=1 - hyper.beta2)

        step_size, bias_correction2_sqrt = bias_corrections(hyper, step_t.item())
        if hyper.amsgrad:
            (max_exp_avg_sq,) = _real_views(tensors.max_exp_avg_sqs[i])
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            second_moment = max_exp_avg_sq
        else:
            second_moment = exp_avg_sq
        denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(hyper.eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


def _foreach_step(tensors: AdamWTensors, hyper: AdamWHyper) -> None:
    # foreach kernels need every list on one device and dtype.
    params_of = tensors.params
    for indices in group_by_device_dtype(range(len(params_of)), lambda i: params_of[i]).values():
        group = tensors.subset(indices)
        params = _real_views(*group.params)
        grads = _real_views(*group.grads)
        exp_avgs = _real_views(*group.exp_avgs)
        exp_avg_sqs = _real_views(*group.exp_avg_sqs)

        if hyper.maximize:
            grads = list(torch._foreach_neg(grads))
        torch._foreach_add_(group.steps, 1)
        if hyper.weight_decay != 0:
            torch._foreach_mul_(params, decay_factor(hyper))
        torch._foreach_lerp_(exp_avgs, grads, 1 - hyper.beta1)
        torch._foreach_mul_(exp_avg_sqs, hyper.beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - hyper.beta2)
        del grads

        corrections = [bias_corrections(hyper, s.item()) for s in group.steps]
        negative_step_sizes = [-step_size for step_size, _ in corrections]
        bias_correction2_sqrts = [sqrt for _, sqrt in corrections]
        if hyper.amsgrad:
            max_exp_avg_sqs = _real_views(*group.max_exp_avg_sqs)
            torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
            denoms = torch._foreach_sqrt(max_exp_avg_sqs)
        else:
            denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, bias_correction2_sqrts)
        torch._foreach_add_(denoms, hyper.eps)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, negative_step_sizes)

# ---------------------------------------------------------------------------
# The compiled kernel (fused=True).
#
# Eager AdamW runs about ten elementwise operations per parameter, each a full
# pass over memory. ``torch.compile`` fuses them into one loop that reads the
# parameter, gradient and both moments once and writes them once, which is what
# makes torch's own fused CPU kernel fast. The kernel is compiled with dynamic
# shapes over flattened tensors, so one compilation serves every parameter of a
# given dtype and device, and the hyperparameters enter as 0-dim tensors so that
# a learning-rate schedule never triggers a recompilation.
#
# The math runs in float32 (float64 for float64 parameters) whatever the
# parameter dtype; bf16/fp16 values are rounded once, when stored, as in torch's
# fused kernels. The arithmetic equals the for-loop reference up to rounding (it
# is not bitwise identical: the compiler may reorder and vectorize).
# ---------------------------------------------------------------------------


class _CompiledKernels:
    """The compiled update functions, built on first use, and why compiling failed."""

    def __init__(self) -> None:
        self.kernels: dict[bool, Callable[..., None]] = {}
        self.failure: str | None = None  # once set, the compiled path is never tried again

    def get(self, amsgrad: bool) -> Callable[..., None]:
        if amsgrad not in self.kernels:
            update = _update_amsgrad if amsgrad else _update
            self.kernels[amsgrad] = torch.compile(update, dynamic=True)
        return self.kernels[amsgrad]


_compiled = _CompiledKernels()


def compile_failure() -> str | None:
    """Why ``fused=True`` could not compile in this process (then it runs foreach), or None."""
    return _compiled.failure


def _math(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    sign: Tensor,
    decay: Tensor,
    one_minus_beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
    step_size: Tensor,
    bias_correction2_sqrt: Tensor,
) -> None:
    # The math runs in the scalars' dtype (float32, or float64 for float64
    # parameters), never in bf16/fp16: there 0.999 rounds to 1.0 and the second
    # moment would never move. Results are rounded once, on the store, as in
    # torch's fused kernels for low-precision parameters.
    work = sign.dtype
    g = grad.to(work) * sign  # sign is -1 when maximizing
    p = param.to(work) * decay
    m = torch.lerp(exp_avg.to(work), g, one_minus_beta1)
    v = exp_avg_sq.to(work) * beta2 + g * g * (1 - beta2)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if max_exp_avg_sq is not None:
        v = torch.maximum(max_exp_avg_sq.to(work), v)
        max_exp_avg_sq.copy_(v)
    denom = v.sqrt() / bias_correction2_sqrt + eps
    param.copy_(p - m / denom * step_size)


# Two entry points rather than one with an optional argument: torch.compile
# counts recompilations per function, and every (dtype, amsgrad, size-1 or not)
# combination is one; separate functions keep each count well under the limit.
def _update(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, **scalars: Tensor
) -> None:
    _math(param, grad, exp_avg, exp_avg_sq, None, **scalars)


def _update_amsgrad(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor,
    **scalars: Tensor,
) -> None:
    _math(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, **scalars)


def _eligible(p: Tensor) -> bool:
    # Flattening must give a view, not a copy, or the in-place update is lost.
    return p.is_contiguous() and not torch.is_complex(p) and p.is_floating_point()


def _compiled_step(tensors: AdamWTensors, hyper: AdamWHyper) -> bool:
    """Run the compiled update; return False (having changed nothing) if unavailable."""
    if _compiled.failure is not None:
        return False
    compiled = [
        i for i, p in enumerate(tensors.params) if _eligible(p) and tensors.grads[i].is_contiguous()
    ]
    if not compiled:
        return False
    kernel = _compiled.get(hyper.amsgrad)
    scalars: dict[tuple[float, torch.device, torch.dtype], dict[str, Tensor]] = {}
    for position, i in enumerate(compiled):
        p = tensors.params[i]
        next_step = float(tensors.steps[i].item()) + 1
        key = (next_step, p.device, p.dtype)
        if key not in scalars:
            scalars[key] = _scalars(hyper, next_step, p.device, p.dtype)
        flat = [
            p.view(-1),
            tensors.grads[i].view(-1),
            tensors.exp_avgs[i].view(-1),
            tensors.exp_avg_sqs[i].view(-1),
        ]
        if hyper.amsgrad:
            flat.append(tensors.max_exp_avg_sqs[i].view(-1))
        if position == 0:
            # The first call compiles; without a working compiler nothing has
            # been changed yet, so the caller can fall back cleanly.
            try:
                kernel(*flat, **scalars[key])
            except Exception as error:  # no C++ compiler, unsupported platform, ...
                _compiled.failure = f"{type(error).__name__}: {error}".splitlines()[0]
                warnings.warn(
                    "gradtools.AdamW(fused=True) could not compile its kernel "
                    f"({_compiled.failure}); falling back to the foreach implementation",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return False
        else:
            kernel(*flat, **scalars[key])
        tensors.steps[i] += 1

    # Complex, non-contiguous or integer leftovers take the reference path.
    compiled_set = set(compiled)
    rest = [i for i in range(len(tensors.params)) if i not in compiled_set]
    if rest:
        _for_loop_step(tensors.subset(rest), hyper)
    return True


def _scalars(
    hyper: AdamWHyper, step: float, device: torch.device, dtype: torch.dtype
) -> dict[str, Tensor]:
    step_size, bias_correction2_sqrt = bias_corrections(hyper, step)
    values = {
        "sign": -1.0 if hyper.maximize else 1.0,
        "decay": decay_factor(hyper),
        "one_minus_beta1": 1 - hyper.beta1,
        "beta2": hyper.beta2,
        "eps": hyper.eps,
        "step_size": step_size,
        "bias_correction2_sqrt": bias_correction2_sqrt,
    }
    work = torch.promote_types(dtype, torch.float32)
    return {name: torch.tensor(v, dtype=work, device=device) for name, v in values.items()}
