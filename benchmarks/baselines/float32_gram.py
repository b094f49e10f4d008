"""The Gram blocks multiplied in float32, as gradtools did before issue 20: a speed baseline.

:func:`float32_gram_blocks` swaps gradtools' float64 block product for a
float32 one (chunked ``rows @ rows.T`` accumulated in float32, the previous
path for three or more tasks) while the ``with`` block runs, so a benchmark can
time both side by side in one process. Not for training: the float32 product
leaves rounding-noise eigenvalues that the aggregators would take for signal.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from gradtools import _task_gradients

_CHUNK = 1 << 18


def _gram_in_float32(vectors: list[Tensor], factor: float) -> Tensor:
    count = len(vectors)
    numel = vectors[0].numel()
    step = max(1, _CHUNK // count)
    total = torch.zeros(count, count, dtype=torch.float32, device=vectors[0].device)
    for start in range(0, numel, step):
        rows = torch.stack([v[start : start + step].float() for v in vectors])
        if factor != 1.0:
            rows = rows * factor
        total.add_(rows @ rows.T)
    return total.double()


@contextmanager
def float32_gram_blocks() -> Iterator[None]:
    original = _task_gradients._gram_in_float64
    _task_gradients._gram_in_float64 = _gram_in_float32
    try:
        yield
    finally:
        _task_gradients._gram_in_float64 = original
