"""Divergences between two model outputs, as SMART and its Bregman teacher use them.

Three kinds, one per kind of output head:

- ``"kl"``: symmetric KL between the softmax distributions over the last dim,
  ``KL(p||q) + KL(q||p) = sum_c (p_c - q_c) (log p_c - log q_c)``, summed over
  classes and averaged over every leading dim.
- ``"bkl"``: symmetric KL between the Bernoulli distributions of one logit per
  element, ``(sigmoid(a) - sigmoid(b)) (a - b)``, averaged over all elements.
  A softmax over a single logit is identically 1, so ``"kl"`` on a width-1 last
  dim would always be zero; that is refused with a pointer to ``"bkl"``.
- ``"mse"``: squared error averaged over all elements, for regression heads.

Every divergence is symmetric in its two arguments, non-negative, zero exactly
when the outputs agree, and computed in float32 (or float64 when an input is
float64) whatever dtype the model ran in. The two outputs must have the same
shape: ``[B]`` against ``[B, 1]`` would broadcast to ``[B, B]`` and silently
compare every example with every other, so it is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor

DivergenceKind = Literal["kl", "bkl", "mse"]
DIVERGENCE_KINDS: tuple[str, ...] = ("kl", "bkl", "mse")

#: What a model may return: one tensor, a tuple/list of tensors, or a dict of named tensors.
Outputs: TypeAlias = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
#: One kind for every output, or one per output in the same structure as the outputs.
Kinds: TypeAlias = str | Sequence[str] | Mapping[str, str]


def _math_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    # Half-precision logits lose the small differences SMART measures, so the
    # divergence is computed in at least float32.
    return torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)


def check_pair(a: Tensor, b: Tensor, kind: str, name: str = "outputs") -> None:
    """Raise a ``ValueError``/``TypeError`` naming ``name`` unless ``a`` and ``b`` can be compared."""
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"kind for {name} must be one of {DIVERGENCE_KINDS}, got {kind!r}")
    for side, t in (("first", a), ("second", b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: the {side} output is a {type(t).__name__}, expected a Tensor")
        if not t.is_floating_point():
            raise TypeError(f"{name}: the {side} output has dtype {t.dtype}, expected floating point")
    if a.shape != b.shape:
        raise ValueError(
            f"{name}: shapes {list(a.shape)} and {list(b.shape)} differ; a divergence compares "
            "outputs of the same shape (e.g. [B] against [B, 1] would broadcast to [B, B]): "
            "reshape one of them"
        )
    if a.device != b.device:
        raise ValueError(f"{name}: outputs are on different devices ({a.device} and {b.device})")
    if kind == "kl":
        if a.dim() == 0:
            raise ValueError(f"{name}: kind 'kl' needs a class dim, got a 0-dim tensor")
        if a.shape[-1] < 2:
            raise ValueError(
                f"{name}: kind 'kl' over a last dim of size {a.shape[-1]} is identically zero "
                "(softmax of one logit is 1); use kind 'bkl' for a single binary logit"
            )


def symmetric_kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Symmetric KL between ``softmax(p_logits)`` and ``softmax(q_logits)`` over the last dim.

    Summed over classes, averaged over the leading dims. Gradients flow into both
    arguments; detach one to hold it fixed.
    """
    check_pair(p_logits, q_logits, "kl", "symmetric_kl")
    dtype = _math_dtype(p_logits, q_logits)
    log_p = F.log_softmax(p_logits.to(dtype), dim=-1)
    log_q = F.log_softmax(q_logits.to(dtype), dim=-1)
    # KL(p||q) + KL(q||p) collapses to one sum; no log of a probability is taken,
    # so it stays finite for saturated softmaxes.
    per_row = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=-1)
    return per_row.mean()


def bernoulli_symmetric_kl(a_logits: Tensor, b_logits: Tensor) -> Tensor:
    """Symmetric KL between ``Bernoulli(sigmoid(a))`` and ``Bernoulli(sigmoid(b))``, elementwise.

    ``KL(p||q) + KL(q||p) = (p - q)(logit p - logit q) = (sigmoid(a) - sigmoid(b))(a - b)``,
    averaged over all elements.
    """
    check_pair(a_logits, b_logits, "bkl", "bernoulli_symmetric_kl")
    dtype = _math_dtype(a_logits, b_logits)
    a = a_logits.to(dtype)
    b = b_logits.to(dtype)
    return ((torch.sigmoid(a) - torch.sigmoid(b)) * (a - b)).mean()


def squared_error(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared difference of two regression outputs of the same shape."""
    check_pair(a, b, "mse", "squared_error")
    dtype = _math_dtype(a, b)
    return (a.to(dtype) - b.to(dtype)).square().mean()


_DIVERGENCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "kl": symmetric_kl,
    "bkl": bernoulli_symmetric_kl,
    "mse": squared_error,
}


def divergence(kind: str, a: Tensor, b: Tensor, name: str = "outputs") -> Tensor:
    """The divergence of ``kind`` (``"kl"``, ``"bkl"`` or ``"mse"``) between ``a`` and ``b``.

    Shapes are checked first and errors name ``name`` (e.g. the output's key).
    """
    check_pair(a, b, kind, name)
    return _DIVERGENCES[kind](a, b)


def flatten_outputs(outputs: Outputs, name: str = "outputs") -> list[tuple[str, Tensor]]:
    """``(label, tensor)`` pairs of a tensor, tuple/list or dict of outputs, in a fixed order.

    Labels are ``name``, ``name[i]`` or ``name['key']`` so that errors say which
    output is wrong.
    """
    if isinstance(outputs, Tensor):
        return [(name, outputs)]
    if isinstance(outputs, Mapping):
        items = [(f"{name}[{key!r}]", value) for key, value in outputs.items()]
    elif isinstance(outputs, Sequence) and not isinstance(outputs, str):
        items = [(f"{name}[{i}]", value) for i, value in enumerate(outputs)]
    else:
        raise TypeError(
            f"{name} must be a Tensor, a tuple/list of Tensors or a dict of Tensors, "
            f"got {type(outputs).__name__}"
        )
    if not items:
        raise ValueError(f"{name} is empty")
    for label, value in items:
        if not isinstance(value, Tensor):
            raise TypeError(f"{label} is a {type(value).__name__}, expected a Tensor")
    return items


def _kinds_for(outputs: Outputs, kind: Kinds, name: str) -> list[str]:
    """One kind per flattened output, read from ``kind`` in the outputs' structure."""
    if isinstance(kind, str):
        count = len(flatten_outputs(outputs, name))
        return [kind] * count
    if isinstance(outputs, Mapping):
        if not isinstance(kind, Mapping) or set(kind) != set(outputs):
            raise ValueError(
                f"kind must be one string or a dict with the keys of {name} "
                f"({sorted(outputs)}), got {kind!r}"
            )
        return [kind[key] for key in outputs]
    if isinstance(outputs, Sequence) and not isinstance(kind, Mapping):
        if len(kind) != len(outputs):
            raise ValueError(
                f"kind has {len(kind)} entries but {name} has {len(outputs)} outputs"
            )
        return list(kind)
    raise ValueError(f"kind {kind!r} does not match the structure of {name}")


def output_divergences(
    first: Outputs,
    second: Outputs,
    kind: Kinds = "kl",
    first_name: str = "outputs",
    second_name: str = "reference",
) -> list[tuple[str, Tensor]]:
    """Divergence of every output of ``first`` from the matching one of ``second``.

    Both must have the same structure (one tensor, same-length sequences or dicts
    with the same keys) and matching shapes; returns ``(label, divergence)`` pairs
    in the order of ``first``.
    """
    kinds = _kinds_for(first, kind, first_name)
    a_items = flatten_outputs(first, first_name)
    b_items = flatten_outputs(second, second_name)
    if isinstance(first, Mapping) != isinstance(second, Mapping) or len(a_items) != len(b_items):
        raise ValueError(
            f"{first_name} and {second_name} have different structures "
            f"({type(first).__name__} of {len(a_items)} and "
            f"{type(second).__name__} of {len(b_items)})"
        )
    if isinstance(first, Mapping) and isinstance(second, Mapping):
        if set(first) != set(second):
            raise ValueError(
                f"{first_name} has keys {sorted(first)} but {second_name} has {sorted(second)}"
            )
        b_items = [(f"{second_name}[{key!r}]", second[key]) for key in first]
    result = []
    for (label, a), (_, b), k in zip(a_items, b_items, kinds, strict=True):
        result.append((label, divergence(k, a, b, name=label)))
    return result


def output_keys(outputs: Outputs) -> list[str]:
    """Short names of the outputs: dict keys, tuple indices, or ``"output"`` for one tensor."""
    if isinstance(outputs, Tensor):
        return ["output"]
    if isinstance(outputs, Mapping):
        return [str(key) for key in outputs]
    return [str(i) for i in range(len(outputs))]


def regroup(outputs: Outputs, values: list[Tensor]) -> Outputs:
    """Put per-output ``values`` back into the structure of ``outputs`` (tensor, tuple or dict)."""
    if isinstance(outputs, Tensor):
        return values[0]
    if isinstance(outputs, Mapping):
        return dict(zip(outputs.keys(), values, strict=True))
    return tuple(values)
