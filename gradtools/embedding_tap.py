"""SMART for any model: take the embeddings from a module's output, and feed them back perturbed.

:class:`gradtools.SMART` needs two things a model rarely exposes: the tensor the
encoder consumes (the embedding layer's output) and a forward pass that starts
from a replacement for it. :class:`EmbeddingTap` gets both from the model's own
``forward`` with a temporary forward hook on its embedding module, so neither
the model nor its call signature changes::

    tap = EmbeddingTap(model.embeddings)               # HF BERT: word + position + type, LayerNorm
    run = lambda: model(input_ids, attention_mask=mask).last_hidden_state[:, 0]
    embeds, outputs = tap.capture(run)                 # the training pass; embeds is in its graph
    r_s = smart(tap.forward_with(run), embeds, outputs, kind="mse", mask=mask)

The tap works on any module whose output is one tensor: a Hugging Face model's
``get_input_embeddings()`` (the word vectors, i.e. what ``inputs_embeds``
replaces), BERT's whole ``embeddings`` block (what the encoder consumes: the
paper's choice, so position and token-type vectors are added once and not
perturbed twice), or the ``nn.Embedding`` of a model that takes only ids.

The hook is registered only while :meth:`EmbeddingTap.capture` or a function
from :meth:`EmbeddingTap.forward_with` runs, so the model carries no hook
otherwise (a :class:`gradtools.MomentumTeacher` deep copy never inherits one).
The replaced pass still runs the embedding module and then discards its
output: an embedding lookup (or one LayerNorm) per pass, small next to the
encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from torch import Tensor, nn

__all__ = ["EmbeddingTap"]

OutputsT = TypeVar("OutputsT")
_Hook = Callable[[nn.Module, Any, Any], Any]


class EmbeddingTap:
    """Read an embedding module's output in one pass and replace it in another.

    Args:
        module: the module whose output is the tensor to perturb, e.g.
            ``model.get_input_embeddings()`` or ``model.embeddings``. It must run
            exactly once per forward pass and return one floating-point tensor.
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(
                "module must be a torch.nn.Module (e.g. model.get_input_embeddings()), "
                f"got {type(module).__name__}"
            )
        self.module = module

    def __repr__(self) -> str:
        return f"EmbeddingTap({type(self.module).__name__})"

    def capture(self, forward: Callable[[], OutputsT]) -> tuple[Tensor, OutputsT]:
        """Run ``forward()`` once and return ``(embeddings, outputs)``.

        ``embeddings`` is the module's output in that very pass (not a copy), so
        gradients that SMART sends into it reach the embedding weights.
        """
        _check_callable(forward)
        seen: list[Tensor] = []

        def record(module: nn.Module, args: Any, output: Any) -> None:
            seen.append(self._checked_output(output))

        with self._hooked(record):
            outputs = forward()
        self._check_calls(len(seen))
        return seen[0], outputs

    def forward_with(self, forward: Callable[[], OutputsT]) -> Callable[[Tensor], OutputsT]:
        """``embeddings -> forward()`` with the module's output replaced by ``embeddings``.

        This is the ``forward`` argument :class:`gradtools.SMART` expects. The
        replacement must have the shape of the module's output; its dtype is kept
        (SMART passes float32 so that a small perturbation is not rounded away).
        """
        _check_callable(forward)

        def perturbed(embeddings: Tensor) -> OutputsT:
            if not isinstance(embeddings, Tensor):
                raise TypeError(f"embeddings must be a Tensor, got {type(embeddings).__name__}")
            calls = 0

            def replace(module: nn.Module, args: Any, output: Any) -> Tensor:
                nonlocal calls
                calls += 1
                original = self._checked_output(output)
                if embeddings.shape != original.shape:
                    raise ValueError(
                        f"embeddings have shape {list(embeddings.shape)} but {self!r} produced "
                        f"{list(original.shape)} in this pass: forward() must run on the batch "
                        "the embeddings were captured from"
                    )
                return embeddings

            with self._hooked(replace):
                outputs = forward()
            self._check_calls(calls)
            return outputs

        return perturbed

    @contextmanager
    def _hooked(self, hook: _Hook) -> Iterator[None]:
        handle = self.module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def _checked_output(self, output: Any) -> Tensor:
        if not isinstance(output, Tensor) or not output.is_floating_point():
            raise TypeError(
                f"{self!r}: the module must return one floating-point tensor, got "
                f"{type(output).__name__}; tap the module that produces the embeddings"
            )
        return output

    def _check_calls(self, calls: int) -> None:
        if calls == 0:
            raise RuntimeError(
                f"{self!r}: the module did not run during forward(); tap the embedding "
                "module of the model that forward() calls"
            )
        if calls > 1:
            raise RuntimeError(
                f"{self!r}: the module ran {calls} times during forward(); it must run exactly "
                "once so that one tensor holds every perturbed position (encode both "
                "sentences of a pair in one batch, or tap a module that runs once)"
            )


def _check_callable(forward: object) -> None:
    if not callable(forward):
        raise TypeError(f"forward must be a callable taking no arguments, got {type(forward).__name__}")
