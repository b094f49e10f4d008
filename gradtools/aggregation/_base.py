"""The interface every multi-task aggregator implements, and the name registry.

An aggregator maps the Gram matrices of T task gradients (one T x T block per
granularity unit: the whole model, a parameter group or a tensor) to
combination weights: block b's combined gradient is ``sum_t weights[b, t] g_t``.
It never sees a gradient itself, so it knows nothing about autograd, devices or
parameters; the wrapper (:class:`gradtools.MultiTask`) builds the Gram blocks
in one pass and applies the weights in another.

Randomness is drawn by the wrapper, not by the aggregator: :meth:`Aggregator.draw`
is called once per step with the wrapper's seeded generator, and under DDP rank
0's draw is broadcast, so every rank aggregates with the same draw.
"""

from __future__ import annotations

import abc
import functools
import inspect
import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor

from gradtools.aggregation._gram import _ZERO_NORM, _check_gram

# The aggregators compute in float64: no Gram is more exact than this.
FLOAT64_EPS = float(np.finfo(np.float64).eps)

__all__ = [
    "Aggregation",
    "Aggregator",
    "BlockAggregator",
    "available",
    "checked_gram",
    "from_name",
    "gram_precision",
    "register",
]


class Aggregation(NamedTuple):
    """The outcome of one aggregation.

    Attributes:
        weights: float64 ``[B, T]`` on the CPU; block b's combined gradient is
            ``sum_t weights[b, t] * g_t``.
        projected: optional bool ``[B, T, T]`` for statistics (PCGrad: task i
            was projected onto the normal plane of task j); None for methods
            without such a notion.
        undefined: optional bool ``[B]``, True where the method's direction does
            not exist on that block (at the Gram's precision) and its documented
            fallback was returned instead (IMTL-G: no equal-angle direction);
            None for methods whose direction always exists.
    """

    weights: Tensor
    projected: Tensor | None = None
    undefined: Tensor | None = None


class Aggregator(abc.ABC):
    """Maps a batch of Gram matrices of T task gradients to combination weights."""

    name: str  # registry name, e.g. "pcgrad"

    def draw(self, num_tasks: int, generator: torch.Generator | None) -> Tensor | None:
        """Per-step random draw, made by the wrapper once per step from its seeded generator.

        PCGrad: the visiting orders ``[T, T-1]``; Random (RLW): its weights.
        Under DDP the wrapper broadcasts rank 0's draw. ``None`` (the default)
        for deterministic methods.
        """
        return None

    @abc.abstractmethod
    def aggregate(
        self,
        gram: Tensor,
        draw: Tensor | None,
        *,
        precision: float | None = None,
        block_keys: Sequence[Hashable] | None = None,
    ) -> Aggregation:
        """Combination weights for each block.

        Args:
            gram: ``[B, T, T]`` (any real dtype, device), finite, symmetric
                positive semi-definite (one block per granularity unit).
            draw: what :meth:`draw` returned this step (``None`` for
                deterministic methods).
            precision: relative accuracy of the Gram entries (each is known to
                about ``precision * |g_i| |g_j|``), e.g. the epsilon of the
                gradients' dtype. Decisions that a rounding error could flip
                (rank, equal-angle existence, Pareto stationarity) are taken at
                this precision; see :func:`gram_precision`. ``None``: the epsilon
                of ``gram``'s dtype (float64's for a float64 Gram).
                :class:`gradtools.MultiTask` passes its gradients' epsilon.
            block_keys: one hashable key per block naming what the block is
                (:class:`gradtools.MultiTask` passes ``("tensor", i)`` with i the
                parameter's position in ``param_groups``, ``("group", k)`` or
                ``("all",)``). Stateful methods keep their state per key, so a
                block that is absent on some steps neither loses its state nor
                lends it to another. ``None`` (a direct call): the block's index.
        """

    def head_weight(self, num_tasks: int) -> float:
        """Weight of a task-specific parameter's (a head's) own plain gradient.

        1.0 by default; 1/T for Mean and PCGrad(reduction='mean').
        """
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint ({} for stateless methods)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(
                f"{type(self).__name__} is stateless but load_state_dict got keys {sorted(state)}"
            )

    def weights(
        self,
        gram: Tensor,
        generator: torch.Generator | None = None,
        *,
        precision: float | None = None,
    ) -> Tensor:
        """Convenience for a single step outside the wrapper: draw, then aggregate; ``[B, T]``."""
        precision = gram_precision(gram, precision)
        gram = checked_gram(gram)
        draw = self.draw(gram.shape[-1], generator)
        return self.aggregate(gram, draw, precision=precision).weights

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def aggregate_with(
    aggregator: Aggregator, gram: Tensor, draw: Tensor | None, **keywords: Any
) -> Aggregation:
    """``aggregator.aggregate(gram, draw, **keywords)``, leaving out the keywords it does not take.

    An aggregator written before a keyword existed (its ``aggregate(gram, draw)``
    overrides the base signature) keeps working: it simply does not get it.
    """
    method = aggregator.aggregate
    # The function behind the bound method (or one set on the instance): cacheable.
    taken = _keywords_taken(getattr(method, "__func__", method))
    if taken is not None:
        keywords = {k: v for k, v in keywords.items() if k in taken}
    return method(gram, draw, **keywords)


@functools.lru_cache(maxsize=64)
def _keywords_taken(function: Any) -> frozenset[str] | None:
    """The parameter names of an ``aggregate`` implementation; ``None`` when it takes
    ``**kwargs``. Read once per class, not on every step (inspect is slow)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass nothing extra
        return frozenset()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters)


def resolve_block_keys(
    block_keys: Sequence[Hashable] | None, num_blocks: int, owner: str
) -> list[Hashable]:
    """``block_keys`` as a list (the block indices when ``None``), checked against the blocks."""
    if block_keys is None:
        return list(range(num_blocks))
    keys = list(block_keys)
    if len(keys) != num_blocks:
        raise ValueError(
            f"{owner}.aggregate got {len(keys)} block_keys for {num_blocks} Gram blocks"
        )
    try:
        distinct = len(set(keys))
    except TypeError as error:
        raise ValueError(f"{owner}.aggregate: block_keys must be hashable ({error})") from None
    if distinct != num_blocks:
        raise ValueError(f"{owner}.aggregate: block_keys must be distinct, got {keys!r}")
    return keys


def keyed_state(value: object, dims: int, owner: str, name: str) -> dict[Hashable, Tensor]:
    """Per-block state as a ``state_dict`` holds it, as CPU float64 copies keyed by block key.

    ``value``: ``None``, a mapping of block keys to ``dims``-dimensional tensors, or
    (checkpoints from before per-key state) one tensor stacking them, a row per
    block index. Errors name ``owner`` and the state entry ``name``.
    """
    if value is None:
        rows: dict[Hashable, Any] = {}
    elif isinstance(value, Tensor) and value.dim() == dims + 1:
        rows = dict(enumerate(value))
    elif isinstance(value, dict):
        rows = dict(value)
    else:
        raise ValueError(
            f"{owner} state {name!r} must map block keys to {dims}-dimensional tensors "
            "(or stack them in one tensor, or be None)"
        )
    for key, t in rows.items():
        if not isinstance(t, Tensor) or t.dim() != dims:
            raise ValueError(f"{owner} state {name!r}[{key!r}] must be a {dims}-dimensional tensor")
    return {k: t.detach().to("cpu", torch.float64).clone() for k, t in rows.items()}


def required_draw(draw: Tensor | None, owner: str, what: str) -> Tensor:
    """``draw`` itself; a ValueError naming the method when the wrapper's per-step draw is missing."""
    if draw is None:
        raise ValueError(f"{owner}.aggregate needs {what}: pass draw=self.draw(T, generator)")
    return draw


def checked_gram(gram: Tensor) -> Tensor:
    """Validate a ``[B, T, T]`` Gram batch and return it as float64 on the CPU.

    Raises ``ValueError`` naming ``gram`` on a wrong shape, dtype or a non-finite entry.
    """
    if gram.dim() != 3:
        raise ValueError(f"gram must have shape [B, T, T], got {list(gram.shape)}")
    _check_gram(gram)
    return gram.detach().to(device="cpu", dtype=torch.float64)


def gram_precision(gram: Tensor, precision: float | None) -> float:
    """The relative accuracy an aggregator works to: ``precision``, or ``gram``'s dtype's epsilon.

    Never below float64's epsilon (the aggregators compute in float64).

    Raises:
        ValueError: naming ``precision`` unless it is a finite number in [0, 1).
    """
    if precision is None:
        dtype = gram.dtype if gram.is_floating_point() else torch.float64
        return max(float(torch.finfo(dtype).eps), FLOAT64_EPS)
    if isinstance(precision, bool) or not isinstance(precision, (int, float)):
        raise ValueError(f"precision must be a float in [0, 1), got {precision!r}")
    if not (math.isfinite(precision) and 0.0 <= precision < 1.0):
        raise ValueError(f"precision must be a float in [0, 1), got {precision!r}")
    return max(float(precision), FLOAT64_EPS)


class BlockAggregator(Aggregator):
    """An aggregator that handles each Gram block on its own, on a rescaled copy.

    Subclasses implement :meth:`block_weights` on ``gram / max(diag(gram))``, a
    matrix of order one whatever the gradients' scale (1e-30 or 1e30 alike), so
    their solvers can use absolute tolerances. This is exact for every method
    here whose weights do not change when all gradients are scaled by one
    factor; the others undo the rescaling themselves (FairGrad). A block whose
    gradients are all zero gets :meth:`zero_weights`.

    Methods whose decisions depend on the Gram's precision override
    :meth:`block_weights_at`; the others implement :meth:`block_weights` only.
    """

    def aggregate(
        self,
        gram: Tensor,
        draw: Tensor | None,
        *,
        precision: float | None = None,
        block_keys: Sequence[Hashable] | None = None,
    ) -> Aggregation:
        precision = gram_precision(gram, precision)
        gram = checked_gram(gram)
        num_blocks, num_tasks, _ = gram.shape
        blocks = gram.numpy()
        weights = np.empty((num_blocks, num_tasks))
        undefined = np.zeros(num_blocks, dtype=np.bool_)
        for b in range(num_blocks):
            scale = float(blocks[b].diagonal().max())
            if scale <= _ZERO_NORM**2:
                weights[b] = self.zero_weights(num_tasks)
            else:
                weights[b], undefined[b] = self.block_weights_at(
                    blocks[b] / scale, scale, b, precision
                )
        flags = torch.from_numpy(undefined) if self.may_be_undefined else None
        return Aggregation(torch.from_numpy(weights), undefined=flags)

    # Whether block_weights_at can report an undefined direction (Aggregation.undefined).
    may_be_undefined = False

    @abc.abstractmethod
    def block_weights(self, gram: np.ndarray, scale: float, block: int) -> np.ndarray:
        """Weights ``[T]`` for one block; ``gram`` is divided by ``scale`` (its largest diagonal)."""

    def block_weights_at(
        self, gram: np.ndarray, scale: float, block: int, precision: float
    ) -> tuple[np.ndarray, bool]:
        """:meth:`block_weights` at a given Gram precision, and whether the direction was undefined.

        The default ignores the precision (the method takes no decision a
        rounding error could flip) and is never undefined.
        """
        return self.block_weights(gram, scale, block), False

    def zero_weights(self, num_tasks: int) -> np.ndarray:
        """Weights of a block whose gradients are all zero (any weights give a zero update)."""
        return np.full(num_tasks, self.head_weight(num_tasks))


_REGISTRY: dict[str, type[Aggregator]] = {}

_A = TypeVar("_A", bound=type[Aggregator])


def _key(name: str) -> str:
    # "Nash-MTL", "nash_mtl" and "nashmtl" all name the same method.
    return name.lower().replace("-", "").replace("_", "")


def register(cls: _A) -> _A:
    """Class decorator adding an aggregator to the registry under ``cls.name``."""
    key = _key(cls.name)
    if key in _REGISTRY and _REGISTRY[key] is not cls:
        raise ValueError(f"aggregator name {cls.name!r} is already registered")
    _REGISTRY[key] = cls
    return cls


def available() -> list[str]:
    """Registry names of every aggregator, sorted."""
    return sorted(cls.name for cls in _REGISTRY.values())


def from_name(name: str, **kwargs: Any) -> Aggregator:
    """Build an aggregator from its registry name (case-insensitive; '-' and '_' ignored).

    Keyword arguments go to the aggregator's constructor, e.g.
    ``from_name("cagrad", c=0.4)``.

    Raises:
        ValueError: on an unknown name, listing the valid ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"aggregator name must be a str, got {type(name).__name__}")
    cls = _REGISTRY.get(_key(name))
    if cls is None:
        raise ValueError(f"unknown aggregator {name!r}; valid names: {', '.join(available())}")
    return cls(**kwargs)
