"""How the extra forward passes of SMART and of the momentum teacher treat dropout.

A SMART step runs the model again on perturbed embeddings, and the teacher runs
its own copy; whether those passes draw fresh dropout masks changes what the
regularizer measures, so the choice is explicit:

- ``"keep"``: the pass runs in whatever mode the modules are in; in training it
  draws fresh dropout masks (what the paper's reference implementation does).
  The divergence then also measures dropout noise, so it is not zero at
  ``delta = 0``.
- ``"off"``: the given module is put in eval mode for the pass (dropout and any
  other train-only behaviour off) and each submodule's mode is restored after.
- ``"replay"``: the pass reuses the dropout masks of the clean pass. Capture the
  random state with :func:`capture_rng_state` right before the clean forward and
  pass it in; each extra pass restores that state, runs, and puts the caller's
  random state back, so it neither sees nor moves the global random stream.
  Masks repeat exactly when the extra pass draws random numbers in the same
  order and shapes as the clean one (the same forward code on the same batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

DropoutPolicy = Literal["keep", "off", "replay"]
DROPOUT_POLICIES: tuple[str, ...] = ("keep", "off", "replay")


@dataclass(frozen=True)
class RngState:
    """The CPU random state and, for a CUDA device, that device's random state."""

    cpu: Tensor
    device: torch.device | None = None
    device_state: Tensor | None = None


def _accelerator(device: torch.device | str | None) -> torch.device | None:
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise ValueError(f"device: replaying dropout supports cpu and cuda, got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def capture_rng_state(device: torch.device | str | None = None) -> RngState:
    """Snapshot the random state that dropout on ``device`` draws from (CPU always included)."""
    accelerator = _accelerator(device)
    if accelerator is None:
        return RngState(cpu=torch.get_rng_state())
    return RngState(
        cpu=torch.get_rng_state(),
        device=accelerator,
        device_state=torch.cuda.get_rng_state(accelerator),
    )


def _restore(state: RngState) -> None:
    torch.set_rng_state(state.cpu)
    if state.device is not None and state.device_state is not None:
        torch.cuda.set_rng_state(state.device_state, state.device)


def check_rng_device(rng_state: RngState | None, device: torch.device) -> None:
    """Refuse a replay state that lacks the random state of the device the passes run on."""
    if rng_state is None or device.type != "cuda":
        return
    if rng_state.device is None or rng_state.device.index != (
        device.index if device.index is not None else torch.cuda.current_device()
    ):
        raise ValueError(
            f"rng_state holds no random state for {device}, where dropout runs: "
            f"capture it with capture_rng_state({str(device)!r})"
        )


def check_policy(policy: str) -> None:
    if policy not in DROPOUT_POLICIES:
        raise ValueError(f"dropout must be one of {DROPOUT_POLICIES}, got {policy!r}")


@contextmanager
def extra_pass(
    policy: str,
    module: nn.Module | None = None,
    rng_state: RngState | None = None,
) -> Iterator[None]:
    """Run the body as an extra forward pass under the dropout ``policy``.

    ``module`` is required for ``"off"``; ``rng_state`` (from
    :func:`capture_rng_state`) is required for ``"replay"``.
    """
    check_policy(policy)
    if policy == "keep":
        yield
        return
    if policy == "off":
        if module is None:
            raise ValueError("dropout='off' needs module= (the model whose dropout to switch off)")
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode
        return
    if rng_state is None:
        raise ValueError(
            "dropout='replay' needs rng_state= (capture_rng_state() taken right before "
            "the clean forward)"
        )
    callers_state = capture_rng_state(rng_state.device)
    _restore(rng_state)
    try:
        yield
    finally:
        _restore(callers_state)
