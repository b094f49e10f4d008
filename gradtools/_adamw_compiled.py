"""The ``fused=True`` path of gradtools.AdamW: one compiled kernel per parameter.

Eager AdamW runs about ten elementwise operations per parameter, each a full
pass over memory. ``torch.compile`` fuses them into one loop that reads the
parameter, gradient and both moments once and writes them once, which is what
makes torch's own fused CPU kernel fast. The kernel is compiled with dynamic
shapes over flattened tensors, so one compilation serves every parameter of a
given dtype and device, and the hyperparameters enter as 0-dim tensors so that
a learning-rate schedule never triggers a recompilation.

The math runs in float32 (float64 for float64 parameters) whatever the
parameter dtype; bf16/fp16 values are rounded once, when stored, as in torch's
fused kernels. The arithmetic equals the for-loop reference up to rounding (it
is not bitwise identical: the compiler may reorder and vectorize).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

# gradtools.adamw imports this module only inside adamw_step, so no cycle.
from gradtools.adamw import (
    AdamWHyper,
    AdamWTensors,
    _for_loop_step,
    bias_corrections,
    decay_factor,
)

_kernels: dict[bool, Callable[..., None]] = {}
_unavailable: str | None = None


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


def _kernel(amsgrad: bool) -> Callable[..., None]:
    if amsgrad not in _kernels:
        _kernels[amsgrad] = torch.compile(_update_amsgrad if amsgrad else _update, dynamic=True)
    return _kernels[amsgrad]


def _eligible(p: Tensor) -> bool:
    # Flattening must give a view, not a copy, or the in-place update is lost.
    return p.is_contiguous() and not torch.is_complex(p) and p.is_floating_point()


def step(tensors: AdamWTensors, hyper: AdamWHyper) -> bool:
    """Run the compiled update; return False (having changed nothing) if unavailable."""
    global _unavailable
    if _unavailable is not None:
        return False
    compiled = [
        i for i, p in enumerate(tensors.params) if _eligible(p) and tensors.grads[i].is_contiguous()
    ]
    if not compiled:
        return False
    kernel = _kernel(hyper.amsgrad)
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
                _unavailable = f"{type(error).__name__}: {error}".splitlines()[0]
                warnings.warn(
                    "gradtools.AdamW(fused=True) could not compile its kernel "
                    f"({_unavailable}); falling back to the foreach implementation",
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
