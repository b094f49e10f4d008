"""SMART's adversarial regularizer: the ball, the ascent, masking, dtypes, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from gradtools import SMART, capture_rng_state
from gradtools.divergences import symmetric_kl
from gradtools.smart import NORMS, delta_norms, normalize_direction, project_to_ball

SETTINGS = settings(max_examples=30, deadline=None)


class TinyEncoder(nn.Module):
    """Embeddings [B, L, H] -> mean over real tokens -> heads; small enough for hypothesis."""

    def __init__(self, hidden: int = 6, classes: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Linear(hidden, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, classes)
        self.score = nn.Linear(hidden, 1)

    def pooled(self, embeds: Tensor, mask: Tensor | None) -> Tensor:
        h = torch.tanh(self.layer(embeds))
        h = self.dropout(torch.tanh(self.mix(h) + h))
        if mask is None:
            return h.mean(dim=1)
        m = mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1)

    def forward(self, embeds: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.head(self.pooled(embeds, mask))

    def multitask(self, embeds: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        pooled = self.pooled(embeds, mask)
        return {"cls": self.head(pooled), "reg": self.score(pooled).squeeze(-1)}


class Recorder:
    """Wraps a forward and keeps every input it was called with."""

    def __init__(self, forward: nn.Module) -> None:
        self.forward = forward
        self.inputs: list[Tensor] = []

    def __call__(self, embeds: Tensor) -> Tensor:
        self.inputs.append(embeds.detach().clone())
        return self.forward(embeds)


def _model(seed: int = 0, **kwargs: float) -> TinyEncoder:
    torch.manual_seed(seed)
    return TinyEncoder(**kwargs)  # type: ignore[arg-type]


@st.composite
def ball_cases(draw: st.DrawFn) -> dict[str, object]:
    batch, tokens, hidden = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 6))
    lengths = [draw(st.integers(0, tokens)) for _ in range(batch)]
    return {
        "shape": (batch, tokens, hidden),
        "mask": torch.tensor([[1] * n + [0] * (tokens - n) for n in lengths]),
        "norm": draw(st.sampled_from(NORMS)),
        "epsilon": draw(st.sampled_from([0.0, 1e-6, 1e-5, 1e-2, 1.0])),
        "noise_std": draw(st.sampled_from([0.0, 1e-5, 1e-2, 3.0])),
        "step_size": draw(st.sampled_from([0.0, 1e-3, 1e-1, 10.0])),
        "steps": draw(st.integers(0, 3)),
        "seed": draw(st.integers(0, 2**16)),
    }


def _within(norms: Tensor, epsilon: float, norm: str) -> bool:
    # The inf-ball projection is a clamp and exact; scaling onto the L2 sphere may land
    # one float32 rounding above epsilon.
    slack = 0.0 if norm.startswith("inf") else 4 * torch.finfo(torch.float32).eps * epsilon
    return bool((norms <= epsilon + slack).all())


@SETTINGS
@given(ball_cases())
def test_every_perturbation_stays_in_the_ball_and_off_padding(case: dict) -> None:
    batch, tokens, hidden = case["shape"]
    model = _model(case["seed"] % 7, hidden=hidden)
    mask: Tensor = case["mask"]
    # Zero embeddings make each recorded input exactly delta (no rounding of a sum).
    embeds = torch.zeros(batch, tokens, hidden)
    recorder = Recorder(lambda e: model(e, mask))  # type: ignore[arg-type]
    smart = SMART(
        epsilon=case["epsilon"],
        noise_std=case["noise_std"],
        step_size=case["step_size"],
        steps=case["steps"],
        norm=case["norm"],
        generator=torch.Generator().manual_seed(case["seed"]),
    )
    r_s = smart(recorder, embeds, model(embeds, mask), mask=mask)
    assert math.isfinite(r_s.item())
    assert len(recorder.inputs) == case["steps"] + 1
    padding = mask == 0
    for delta in recorder.inputs:
        assert delta.dtype == torch.float32
        assert (delta[padding] == 0).all(), "padding was perturbed"
    final = recorder.inputs[-1]
    assert _within(delta_norms(final, case["norm"]), case["epsilon"], case["norm"])
    assert smart.stats is not None and smart.stats.delta_norm_max is not None
    assert smart.stats.delta_norm_max == delta_norms(final, case["norm"]).max()


@SETTINGS
@given(
    st.sampled_from(NORMS),
    st.integers(0, 2**16),
    st.sampled_from([1e-6, 1e-2, 1.0]),
)
def test_projection_is_the_nearest_point_of_the_ball(norm: str, seed: int, epsilon: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64) * epsilon * 2
    projected = project_to_ball(delta, norm, epsilon)
    norms = delta_norms(projected, norm)
    assert (norms <= epsilon * (1 + 1e-12)).all()
    # A point already inside stays put: rescaling to the sphere would move it.
    inside = delta * 1e-3
    assert torch.equal(project_to_ball(inside, norm, epsilon), inside)
    # Nearest point: no random point of the ball is closer to delta (per token/example).
    per_token = norm.endswith("token")
    dims = (-1,) if per_token else (1, 2)
    distance = (projected - delta).square().sum(dims)
    for _ in range(20):
        candidate = project_to_ball(torch.randn(3, 4, 5, generator=gen, dtype=torch.float64), norm, epsilon)
        assert ((candidate - delta).square().sum(dims) >= distance - 1e-15).all()


def test_normalized_direction_has_unit_norm_and_zero_stays_zero() -> None:
    grad = torch.randn(2, 3, 4)
    grad[0, 1] = 0.0
    for norm in NORMS:
        unit = normalize_direction(grad, norm)
        norms = delta_norms(unit, norm)
        if norm.endswith("token"):
            assert norms[0, 1] == 0
            norms = norms[norms > 0]
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)


def test_one_step_matches_the_algorithm_written_out_by_hand() -> None:
    model = _model(1)
    embeds = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    eps, sigma, eta = 1e-3, 1e-3, 1e-2
    clean = model(embeds, mask)

    noise = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(5)) * sigma
    delta = (noise * mask.unsqueeze(-1)).requires_grad_(True)
    start = symmetric_kl(model(embeds + delta, mask), clean.detach())
    (grad,) = torch.autograd.grad(start, delta)
    step = grad / grad.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    delta = (delta.detach() + eta * step).clamp(-eps, eps) * mask.unsqueeze(-1)
    expected = symmetric_kl(model(embeds + delta, mask), clean)

    smart = SMART(eps, sigma, eta, steps=1, generator=torch.Generator().manual_seed(5))
    got = smart(lambda e: model(e, mask), embeds, clean, mask=mask)
    assert torch.allclose(got, expected, rtol=1e-5, atol=0)
    assert smart.stats is not None
    assert torch.allclose(smart.stats.start_divergence, start.detach())  # type: ignore[arg-type]


@pytest.mark.parametrize("norm", NORMS)
def test_ascent_raises_the_divergence_over_the_noise_start(norm: str) -> None:
    model = _model(2)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    for seed in range(3):
        embeds = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(seed))
        clean = model(embeds, mask).detach()
        values = []
        for steps in (0, 1, 2):
            smart = SMART(1e-2, 1e-2, 1e-1, steps=steps, norm=norm,
                          generator=torch.Generator().manual_seed(100 + seed))
            values.append(smart(lambda e: model(e, mask), embeds, clean, mask=mask).item())
        noise_only, one_step, two_steps = values
        assert one_step > 1.5 * noise_only, (norm, seed, values)
        assert two_steps > noise_only, (norm, seed, values)


@pytest.mark.parametrize("norm", NORMS)
def test_zero_epsilon_and_zero_noise_give_exactly_zero(norm: str) -> None:
    model = _model(3, dropout=0.3)  # training mode: dropout is live
    embeds = torch.randn(2, 4, 6)
    rng = capture_rng_state()
    clean = model(embeds)
    smart = SMART(epsilon=0.0, noise_std=0.0, steps=2, norm=norm, dropout="replay")
    r_s = smart(model, embeds, clean, rng_state=rng)
    assert r_s.item() == 0.0
    off = SMART(epsilon=0.0, noise_std=0.0, dropout="off")
    model.eval()
    assert off(model, embeds, model(embeds), module=model).item() == 0.0


def test_dropout_keep_draws_fresh_masks_and_replay_repeats_them() -> None:
    model = _model(4, dropout=0.5)
    embeds = torch.randn(4, 3, 6)
    rng = capture_rng_state()
    clean = model(embeds)
    after_clean = torch.get_rng_state()
    keep = SMART(epsilon=0.0, noise_std=0.0, dropout="keep")(model, embeds, clean)
    assert keep.item() > 1e-3  # fresh masks: R_s also measures dropout noise
    torch.set_rng_state(after_clean)
    replay = SMART(epsilon=0.0, noise_std=0.0, dropout="replay")
    assert replay(model, embeds, clean, rng_state=rng).item() == 0.0
    # Replay puts the caller's random stream back where it was (noise aside: sigma=0
    # still draws the noise tensor, so compare with one plain draw).
    expected = torch.get_rng_state()
    torch.set_rng_state(after_clean)
    torch.randn(embeds.shape)
    assert torch.equal(torch.get_rng_state(), expected)


def test_dropout_off_switches_dropout_off_and_restores_modes() -> None:
    model = _model(5, dropout=0.5)
    embeds = torch.randn(4, 3, 6)
    seen: list[bool] = []

    def forward(e: Tensor) -> Tensor:
        seen.append(model.dropout.training)
        return model(e)

    smart = SMART(dropout="off", steps=2)
    smart(forward, embeds, model(embeds), module=model)
    assert seen == [False, False, False]
    assert model.training and model.dropout.training


def test_lambda_zero_gives_exactly_the_plain_loss_and_gradients() -> None:
    embeds_leaf = torch.randn(3, 4, 6)
    labels = torch.tensor([0, 2, 1])

    def run(with_smart: bool) -> tuple[Tensor, list[Tensor | None]]:
        model = _model(6, dropout=0.2)
        torch.manual_seed(11)
        embeds = embeds_leaf.clone().requires_grad_(True)
        out = model(embeds)
        loss = nn.functional.cross_entropy(out, labels)
        if with_smart:
            loss = loss + 0.0 * SMART(epsilon=1e-2, noise_std=1e-2)(model, embeds, out)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()] + [embeds.grad]

    plain_loss, plain_grads = run(False)
    loss, grads = run(True)
    assert torch.equal(plain_loss, loss)
    assert sum(g is not None for g in plain_grads) == 7  # all but the unused score head
    for a, b in zip(plain_grads, grads, strict=True):
        assert (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def test_ascent_leaves_parameter_grads_alone_and_r_s_reaches_every_parameter() -> None:
    model = _model(7)
    embed_layer = nn.Linear(6, 6)
    raw = torch.randn(2, 4, 6)
    embeds = embed_layer(raw)
    clean = model(embeds)
    smart = SMART(epsilon=1e-2, noise_std=1e-2, steps=2)
    r_s = smart(model, embeds, clean)
    assert all(p.grad is None for p in [*model.parameters(), *embed_layer.parameters()])
    r_s.backward()
    used = [model.layer, model.mix, model.head, embed_layer]
    for module in used:
        for p in module.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_detach_clean_stops_gradients_into_the_clean_side() -> None:
    model = _model(8)
    embeds = torch.randn(2, 4, 6)
    for detach, expect_grad in ((True, False), (False, True)):
        clean = model(embeds).detach().requires_grad_(True)
        SMART(1e-2, 1e-2, detach_clean=detach)(model, embeds, clean).backward()
        assert (clean.grad is not None) == expect_grad


def test_delta_and_perturbed_sum_stay_float32_under_autocast() -> None:
    model = _model(9)
    embeds = torch.randn(2, 4, 6).to(torch.bfloat16)
    recorder = Recorder(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        clean = model(embeds)
        smart = SMART(epsilon=1e-5, noise_std=1e-5)
        r_s = smart(recorder, embeds, clean)
    assert r_s.dtype == torch.float32 and math.isfinite(r_s.item())
    final = recorder.inputs[-1]
    assert final.dtype == torch.float32
    delta = final - embeds.float()
    assert delta.abs().max() > 0, "the perturbation rounded away"
    # x + delta is rounded to float32: at most half an ulp of the sum off delta.
    rounding = final.abs() * 2.0**-24
    assert (delta.abs() <= 1e-5 + rounding).all()
    # The same perturbation in bfloat16 would have vanished entirely.
    assert torch.equal((embeds + delta.to(torch.bfloat16)), embeds)


def test_structured_outputs_and_per_output_terms() -> None:
    model = _model(10)
    embeds = torch.randn(3, 4, 6, requires_grad=True)
    clean = model.multitask(embeds)
    kinds = {"cls": "kl", "reg": "mse"}
    smart = SMART(1e-2, 1e-2, generator=torch.Generator().manual_seed(0))
    total = smart(model.multitask, embeds, clean, kind=kinds)
    again = SMART(1e-2, 1e-2, generator=torch.Generator().manual_seed(0))
    parts = again(model.multitask, embeds, clean, kind=kinds, per_output=True)
    assert isinstance(parts, dict) and set(parts) == {"cls", "reg"}
    assert torch.allclose(parts["cls"] + parts["reg"], total)
    assert parts["cls"].requires_grad and parts["reg"].requires_grad
    assert smart.stats is not None and set(smart.stats.per_output) == {"cls", "reg"}
    tuple_parts = SMART(1e-2, 1e-2)(
        lambda e: tuple(model.multitask(e).values()), embeds, tuple(clean.values()),
        kind=("kl", "mse"), per_output=True,
    )
    assert isinstance(tuple_parts, tuple) and len(tuple_parts) == 2


def test_regression_output_of_the_wrong_shape_is_an_error() -> None:
    model = _model(11)
    embeds = torch.randn(3, 4, 6)
    clean = model.multitask(embeds)["reg"].unsqueeze(-1)  # [B, 1] against the forward's [B]
    with pytest.raises(ValueError, match=r"\[3\].*\[3, 1\]"):
        SMART()(lambda e: model.multitask(e)["reg"], embeds, clean, kind="mse")


def test_bad_arguments_are_named() -> None:
    model = _model(12)
    embeds = torch.randn(2, 4, 6)
    clean = model(embeds)
    with pytest.raises(ValueError, match="epsilon"):
        SMART(epsilon=-1.0)
    with pytest.raises(ValueError, match="noise_std"):
        SMART(noise_std=float("nan"))
    with pytest.raises(ValueError, match="steps"):
        SMART(steps=-1)
    with pytest.raises(ValueError, match="norm"):
        SMART(norm="l1-token")
    with pytest.raises(ValueError, match="dropout"):
        SMART(dropout="sometimes")
    with pytest.raises(ValueError, match="mask"):
        SMART()(model, embeds, clean, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="module="):
        SMART(dropout="off")(model, embeds, clean)
    with pytest.raises(ValueError, match="rng_state="):
        SMART(dropout="replay")(model, embeds, clean)
    with pytest.raises(ValueError, match="kind"):
        SMART()(model, embeds, clean, kind="softmax")


def test_through_bert_demo_position_and_type_embeddings_are_added_once() -> None:
    from bert_demo.model import BertConfig, BertModel

    torch.manual_seed(13)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=12,
    )
    bert = BertModel(config)
    head = nn.Linear(16, 3)
    ids = torch.randint(1, 40, (3, 7))
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1]] * 3)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    bert.eval()
    # The clean pass is the model's own full forward (ids -> embeddings -> encoder).
    clean = head(bert(ids, mask, types).pooler_output)
    embeds = bert.embed(ids, types)
    recorder = Recorder(lambda e: head(bert.encode(e, mask).pooler_output))  # type: ignore[arg-type]

    exact = SMART(epsilon=0.0, noise_std=0.0, steps=1, dropout="off")
    assert exact(recorder, embeds, clean, mask=mask, module=bert).item() == 0.0
    assert all(torch.equal(seen, embeds) for seen in recorder.inputs)

    def adds_positions_again(e: Tensor) -> Tensor:
        # The public bug: feeding perturbed embeddings back through a path that adds
        # position and token-type embeddings a second time.
        table = bert.embeddings
        again = e + table.position_embeddings(torch.arange(7)) + table.token_type_embeddings(types)
        return head(bert.encode(again, mask).pooler_output)

    assert exact(adds_positions_again, embeds, clean, mask=mask, module=bert).item() > 0.0

    recorder.inputs.clear()
    smart = SMART(epsilon=1e-3, noise_std=1e-3, step_size=1e-2, steps=2, dropout="off")
    r_s = smart(recorder, embeds, clean, mask=mask, module=bert)
    assert r_s.item() > 0 and math.isfinite(r_s.item())
    for seen in recorder.inputs[1:]:
        delta = seen - embeds.detach()
        assert (delta[mask == 0] == 0).all()
        assert delta.abs().max() <= 1e-3 + seen.abs().max() * 2.0**-23


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_replay_and_autocast_keep_delta_in_float32() -> None:
    device = torch.device("cuda")
    model = _model(14, dropout=0.3).to(device)
    embeds = torch.randn(4, 5, 6, device=device)
    mask = torch.tensor([[1] * 5, [1] * 4 + [0], [1] * 2 + [0] * 3, [1] * 5], device=device)
    rng = capture_rng_state(device)
    clean = model(embeds, mask)
    exact = SMART(epsilon=0.0, noise_std=0.0, steps=2, dropout="replay")
    assert exact(lambda e: model(e, mask), embeds, clean, mask=mask, rng_state=rng).item() == 0.0
    with pytest.raises(ValueError, match="capture_rng_state"):  # a CPU-only state cannot replay CUDA masks
        exact(lambda e: model(e, mask), embeds, clean, mask=mask, rng_state=capture_rng_state())

    recorder = Recorder(lambda e: model(e, mask))  # type: ignore[arg-type]
    half = embeds.to(torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        clean = model(half, mask)
        r_s = SMART()(recorder, half, clean, mask=mask)
    assert r_s.dtype == torch.float32 and math.isfinite(r_s.item())
    final = recorder.inputs[-1]
    assert final.dtype == torch.float32
    delta = final - half.float()
    assert delta.abs().max() > 0
    assert (delta[mask == 0] == 0).all()
    assert (delta.abs() <= 1e-5 + final.abs() * 2.0**-24).all()
    r_s.backward()
    assert all(p.grad is not None for p in model.layer.parameters())


def test_per_task_terms_compose_with_pcgrad() -> None:
    from gradtools import PCGrad

    model = _model(15)
    embeds = torch.randn(4, 5, 6)
    out = model.multitask(embeds)
    smart = SMART(1e-2, 1e-2, generator=torch.Generator().manual_seed(1))
    r_s = smart(model.multitask, embeds, out, kind={"cls": "kl", "reg": "mse"}, per_output=True)
    assert isinstance(r_s, dict)
    losses = [
        nn.functional.cross_entropy(out["cls"], torch.tensor([0, 1, 2, 0])) + 5.0 * r_s["cls"],
        nn.functional.mse_loss(out["reg"], torch.zeros(4)) + 5.0 * r_s["reg"],
    ]
    # Each head belongs to one task, so PCGrad gives it that task's plain gradient:
    # R_s of that task, and only of that task, must be in it.
    expected_cls = torch.autograd.grad(losses[0], model.head.weight, retain_graph=True)[0]
    expected_reg = torch.autograd.grad(losses[1], model.score.weight, retain_graph=True)[0]
    without_rs = torch.autograd.grad(
        nn.functional.mse_loss(out["reg"], torch.zeros(4)), model.score.weight, retain_graph=True
    )[0]
    assert not torch.allclose(expected_reg, without_rs)
    cross = torch.autograd.grad(r_s["cls"], model.score.weight, retain_graph=True, allow_unused=True)
    assert cross[0] is None  # the classification term does not reach the regression head
    optimizer = PCGrad(torch.optim.SGD(model.parameters(), lr=0.1))
    optimizer.backward(losses)
    assert model.head.weight.grad is not None and model.score.weight.grad is not None
    assert torch.allclose(model.head.weight.grad, expected_cls, rtol=1e-5, atol=1e-7)
    assert torch.allclose(model.score.weight.grad, expected_reg, rtol=1e-5, atol=1e-7)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
