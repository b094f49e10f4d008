"""SMART: smoothness-inducing adversarial regularization (Jiang et al. 2020).

For clean embeddings ``x`` (what the encoder consumes, after the embedding layer)
and a model ``f``, the regularizer is

    R_s = D(f(x + delta), f(x)),   delta ~ argmax_{||delta|| <= epsilon} D(f(x + delta), f(x))

with the inner maximum approximated by: noise ``delta_0 ~ N(0, sigma^2)``, then
``K`` steps of normalized gradient ascent

    g = grad_delta D(f(x + delta), f(x).detach())
    delta <- P_epsilon(delta + eta * g / ||g||)

where ``P_epsilon`` is the Euclidean projection onto the ``epsilon``-ball of the
configured norm (not a rescaling to unit length). The ascent differentiates only
with respect to ``delta``: the clean outputs and embeddings are detached, so no
parameter gradient is computed there. The last pass is differentiable: ``R_s``
carries gradients into the model, through the embedding layer and, unless
``detach_clean=True``, through the clean outputs as well.

Norms (``norm=``), each measured over the real tokens only (padding is masked
out of norms and never perturbed):

- ``"inf-token"`` (default): ``max_h |delta[b, t, h]| <= epsilon`` for every token;
  the ascent direction is normalized per token.
- ``"inf-example"``: the same box, with the direction normalized per example.
- ``"l2-token"``: ``||delta[b, t, :]||_2 <= epsilon`` for every token.
- ``"l2-example"``: ``||delta[b]||_2 <= epsilon`` over all of an example's tokens.

``delta`` and the perturbed sum ``x + delta`` are float32 (float64 if ``x`` is)
even when ``x`` is half precision or the forward runs under autocast: a
perturbation of 1e-5 would round away in fp16/bf16.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, overload

import torch
from torch import Tensor, nn

from gradtools.divergences import Kinds, Outputs, output_divergences, output_keys, regroup
from gradtools.dropout_policy import RngState, check_policy, check_rng_device, extra_pass

NormKind = Literal["inf-token", "inf-example", "l2-token", "l2-example"]
NORMS: tuple[str, ...] = ("inf-token", "inf-example", "l2-token", "l2-example")

# ---------------------------------------------------------------------------
# Ball geometry: pure tensor math, no autograd or modules.
# ---------------------------------------------------------------------------


def _parse_norm(norm: str) -> tuple[float, bool]:
    """``(p, per_token)`` for a norm name."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    order, scope = norm.split("-")
    return (math.inf if order == "inf" else 2.0), scope == "token"


def _norm_dims(x: Tensor, per_token: bool) -> tuple[int, ...]:
    # Per token: the hidden dim. Per example: every dim but the batch dim.
    return (-1,) if per_token else tuple(range(1, x.dim()))


def delta_norms(delta: Tensor, norm: str) -> Tensor:
    """The norm of ``delta`` per token (shape ``delta.shape[:-1]``) or per example (``[B]``)."""
    p, per_token = _parse_norm(norm)
    dims = _norm_dims(delta, per_token)
    if p == math.inf:
        return delta.abs().amax(dim=dims)
    return delta.square().sum(dim=dims).sqrt()


def _broadcast_norms(norms: Tensor, like: Tensor, per_token: bool) -> Tensor:
    if per_token:
        return norms.unsqueeze(-1)
    return norms.reshape(norms.shape + (1,) * (like.dim() - 1))


def normalize_direction(grad: Tensor, norm: str) -> Tensor:
    """``grad / ||grad||`` in the configured norm, per token or per example; zero stays zero.

    For the inf-norms this divides by the largest magnitude (as the paper's
    ``g / ||g||_inf``), for the L2 norms by the Euclidean length.
    """
    _, per_token = _parse_norm(norm)
    norms = _broadcast_norms(delta_norms(grad, norm), grad, per_token)
    return torch.where(norms > 0, grad / norms.clamp_min(torch.finfo(grad.dtype).tiny), 0.0)


def project_to_ball(delta: Tensor, norm: str, epsilon: float) -> Tensor:
    """Euclidean projection of ``delta`` onto ``{d : ||d|| <= epsilon}`` of the given norm.

    The inf-ball is the box ``[-epsilon, epsilon]`` whether measured per token or
    per example, so both project by clamping; the L2 balls scale down only what
    lies outside.
    """
    p, per_token = _parse_norm(norm)
    if p == math.inf:
        return delta.clamp(-epsilon, epsilon)
    norms = _broadcast_norms(delta_norms(delta, norm), delta, per_token)
    scale = torch.where(norms > epsilon, epsilon / norms.clamp_min(torch.finfo(delta.dtype).tiny), 1.0)
    return delta * scale


# ---------------------------------------------------------------------------
# The regularizer: plumbing around the math above.
# ---------------------------------------------------------------------------


@dataclass
class SMARTStats:
    """What one call did; tensors are detached and stay on the device (no host sync).

    Attributes:
        r_s: the returned regularizer (sum over outputs).
        per_output: ``R_s`` of each output, keyed by its dict key, its tuple index
            (``"0"``, ``"1"``...) or ``"output"`` for a single tensor.
        start_divergence: the divergence at the (unprojected) noise start, before any
            ascent step (``None`` when ``steps == 0``).
        delta_norm_max: the largest achieved norm of the final ``delta`` (per token or
            per example, as configured, over real tokens); at most ``epsilon``.
        delta_norm_mean: the mean achieved norm over real tokens or examples.
    """

    r_s: Tensor
    per_output: dict[str, Tensor] = field(default_factory=dict)
    start_divergence: Tensor | None = None
    delta_norm_max: Tensor | None = None
    delta_norm_mean: Tensor | None = None


# delta is float32 (see the module docstring); a radius, noise scale or step
# beyond the largest float32 cannot be represented in it at all.
_LARGEST_PERTURBATION = torch.finfo(torch.float32).max


def _check_perturbation_scale(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if value > _LARGEST_PERTURBATION:
        raise ValueError(
            f"{name} must be at most {_LARGEST_PERTURBATION:.4g} (the largest float32: the "
            f"perturbation is float32), got {value}; SMART's scales are usually about 1e-5"
        )
    return float(value)


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check_precision(embeddings: Tensor) -> None:
    """Refuse half-precision embeddings outside autocast, before the model is run.

    delta and ``embeddings + delta`` are float32 (a 1e-5 perturbation rounds away
    in fp16/bf16), so ``forward`` receives float32 inputs; a model whose weights
    are fp16/bf16 and runs without autocast would fail deep inside with a dtype
    mismatch, or silently drop the perturbation if it cast its input down.
    """
    device_type = embeddings.device.type
    if embeddings.dtype in _HALF_DTYPES and not torch.is_autocast_enabled(device_type):
        raise TypeError(
            f"embeddings are {embeddings.dtype} and no torch.autocast is active on "
            f"{device_type!r}: SMART keeps delta and embeddings + delta in float32 (a "
            "perturbation of 1e-5 rounds away in half precision), so forward gets float32 "
            "inputs. Keep the model's weights float32 and run it under "
            f"torch.autocast({device_type!r}, dtype={embeddings.dtype}) instead"
        )


def _detach_outputs(outputs: Outputs) -> Outputs:
    if isinstance(outputs, Tensor):
        return outputs.detach()
    if isinstance(outputs, dict):
        return {key: value.detach() for key, value in outputs.items()}
    if isinstance(outputs, (tuple, list)):
        return tuple(value.detach() for value in outputs)
    # Anything else is rejected with a clear message by output_divergences.
    return outputs


class SMART:
    """Smoothness-inducing adversarial regularizer ``R_s`` (see the module docstring).

    Args:
        epsilon: radius of the ball ``delta`` is projected onto (paper: 1e-5).
        noise_std: standard deviation ``sigma`` of the starting noise (paper: 1e-5).
        step_size: ascent step ``eta`` on the normalized gradient (paper: 1e-3).
        steps: number of ascent steps ``K`` (paper: 1). With ``steps=0`` the noise
            itself is projected and used.
        norm: ``"inf-token"`` (default), ``"inf-example"``, ``"l2-token"`` or ``"l2-example"``.
        dropout: policy for the extra passes, ``"keep"`` (default: fresh masks, as the
            paper's code), ``"off"`` (needs ``module=`` at call time) or ``"replay"``
            (needs ``rng_state=``); see :mod:`gradtools.dropout_policy`.
        detach_clean: hold the clean outputs fixed in the final divergence, so ``R_s``
            trains only the perturbed pass (default ``False``: both sides, as in the paper).
        generator: optional ``torch.Generator`` for the noise, for reproducibility
            independent of the global random stream.

    Call it as ``smart(forward, embeddings, clean_outputs, kind="kl", mask=attention_mask)``
    and add ``lambda_s * R_s`` to the loss. ``smart.stats`` describes the last call.
    """

    def __init__(
        self,
        epsilon: float = 1e-5,
        noise_std: float = 1e-5,
        step_size: float = 1e-3,
        steps: int = 1,
        norm: NormKind | str = "inf-token",
        dropout: Literal["keep", "off", "replay"] | str = "keep",
        detach_clean: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.epsilon = _check_perturbation_scale("epsilon", epsilon)
        self.noise_std = _check_perturbation_scale("noise_std", noise_std)
        self.step_size = _check_perturbation_scale("step_size", step_size)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        self.steps = steps
        _parse_norm(norm)
        self.norm = norm
        check_policy(dropout)
        self.dropout = dropout
        self.detach_clean = bool(detach_clean)
        self.generator = generator
        self.stats: SMARTStats | None = None

    def __repr__(self) -> str:
        return (
            f"SMART(epsilon={self.epsilon}, noise_std={self.noise_std}, "
            f"step_size={self.step_size}, steps={self.steps}, norm={self.norm!r}, "
            f"dropout={self.dropout!r}, detach_clean={self.detach_clean})"
        )

    def _token_mask(self, embeddings: Tensor, mask: Tensor | None) -> Tensor | None:
        """``[..., 1]`` 0/1 float32 mask of real tokens, or ``None`` when all are real."""
        if mask is None:
            return None
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(embeddings.shape[:-1]):
            raise ValueError(
                f"mask has shape {list(mask.shape)} but embeddings have shape "
                f"{list(embeddings.shape)}; mask must be embeddings.shape[:-1] "
                "(1 for real tokens, 0 for padding)"
            )
        return (mask != 0).unsqueeze(-1).to(embeddings.device)

    def _start(self, like: Tensor, keep: Tensor | None) -> Tensor:
        noise = torch.randn(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)
        delta = noise * self.noise_std
        return delta if keep is None else delta * keep

    def _step(self, delta: Tensor, grad: Tensor | None, keep: Tensor | None) -> Tensor:
        if grad is None:  # the outputs do not depend on the embeddings
            grad = torch.zeros_like(delta)
        if keep is not None:
            grad = grad * keep
        moved = delta + self.step_size * normalize_direction(grad, self.norm)
        return project_to_ball(moved, self.norm, self.epsilon)

    @overload
    def __call__(
        self,
        forward: Callable[[Tensor], Outputs],
        embeddings: Tensor,
        clean_outputs: Outputs,
        kind: Kinds = ...,
        mask: Tensor | None = ...,
        *,
        module: nn.Module | None = ...,
        rng_state: RngState | None = ...,
        per_output: Literal[False] = ...,
    ) -> Tensor: ...

    @overload
    def __call__(
        self,
        forward: Callable[[Tensor], Outputs],
        embeddings: Tensor,
        clean_outputs: Outputs,
        kind: Kinds = ...,
        mask: Tensor | None = ...,
        *,
        module: nn.Module | None = ...,
        rng_state: RngState | None = ...,
        per_output: Literal[True],
    ) -> Outputs: ...

    def __call__(
        self,
        forward: Callable[[Tensor], Outputs],
        embeddings: Tensor,
        clean_outputs: Outputs,
        kind: Kinds = "kl",
        mask: Tensor | None = None,
        *,
        module: nn.Module | None = None,
        rng_state: RngState | None = None,
        per_output: bool = False,
    ) -> Tensor | Outputs:
        """Compute ``R_s``.

        Args:
            forward: maps (perturbed) embeddings ``[B, L, H]`` to outputs like
                ``clean_outputs``; it closes over the attention mask and anything else.
            embeddings: the clean encoder input, i.e. the embedding layer's output
                (word + position + token type, LayerNorm), exactly what ``forward``
                consumes. Gradients of ``R_s`` flow back into it.
            clean_outputs: ``forward(embeddings)`` from the training pass: a tensor,
                tuple or dict of tensors.
            kind: divergence per output, ``"kl"`` (softmax classes), ``"bkl"`` (one
                binary logit) or ``"mse"`` (regression); one string for all outputs
                or the same structure as the outputs.
            mask: ``embeddings.shape[:-1]`` attention mask; zeros are padding, which
                is never perturbed and not counted in norms.
            module: the model, required for ``dropout="off"``.
            rng_state: :func:`gradtools.capture_rng_state` taken right before the
                clean forward, required for ``dropout="replay"``.
            per_output: return ``R_s`` per output in the outputs' structure instead
                of their sum (e.g. to give each task its own term under PCGrad).
        """
        if not callable(forward):
            raise TypeError(f"forward must be callable, got {type(forward).__name__}")
        if not isinstance(embeddings, Tensor) or not embeddings.is_floating_point():
            raise TypeError("embeddings must be a floating-point Tensor")
        if embeddings.dim() < 2:
            raise ValueError(
                f"embeddings must be [B, ..., H], got shape {list(embeddings.shape)}"
            )
        _check_precision(embeddings)
        keep = self._token_mask(embeddings, mask)
        if self.dropout == "replay":
            check_rng_device(rng_state, embeddings.device)
        work_dtype = torch.promote_types(embeddings.dtype, torch.float32)
        base = embeddings.detach().to(work_dtype)
        reference = _detach_outputs(clean_outputs)

        def run(inputs: Tensor) -> Outputs:
            with extra_pass(self.dropout, module, rng_state):
                return forward(inputs)

        delta = self._start(base, keep)
        start_divergence: Tensor | None = None
        for step in range(self.steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                divergences = output_divergences(
                    run(base + delta), reference, kind, "forward(embeddings + delta)", "clean_outputs"
                )
                total = torch.stack([value for _, value in divergences]).sum()
                (grad,) = torch.autograd.grad(total, delta, allow_unused=True)
            if step == 0:
                start_divergence = total.detach()
            delta = self._step(delta.detach(), grad, keep)
        if self.steps == 0:
            delta = project_to_ball(delta, self.norm, self.epsilon)

        target = reference if self.detach_clean else clean_outputs
        perturbed = embeddings.to(work_dtype) + delta
        divergences = output_divergences(
            run(perturbed), target, kind, "forward(embeddings + delta)", "clean_outputs"
        )
        values = [value for _, value in divergences]
        r_s = torch.stack(values).sum()

        norms = delta_norms(delta, self.norm)
        if keep is not None and _parse_norm(self.norm)[1]:
            real = keep.squeeze(-1)
            norm_mean = (norms * real).sum() / real.sum().clamp_min(1)
        else:
            norm_mean = norms.mean()
        self.stats = SMARTStats(
            r_s=r_s.detach(),
            per_output=dict(zip(output_keys(clean_outputs), (v.detach() for v in values), strict=True)),
            start_divergence=start_divergence,
            delta_norm_max=norms.max(),
            delta_norm_mean=norm_mean,
        )
        if per_output:
            return regroup(clean_outputs, values)
        return r_s
