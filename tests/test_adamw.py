"""gradtools.AdamW against torch.optim.AdamW: bitwise in float32 over the same steps."""

from __future__ import annotations

import copy
import io
import itertools
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradtools
from gradtools import adamw as adamw_module

TorchAdamW = torch.optim.AdamW


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A small model with a frozen layer, a 0-dim parameter and a parameter that gets no grad."""
    torch.manual_seed(seed)
    model = nn.Module()
    model.embed = nn.Embedding(11, 6)
    model.hidden = nn.Linear(6, 8)
    model.frozen = nn.Linear(8, 8)
    model.frozen.requires_grad_(False)
    model.out = nn.Linear(8, 3)
    model.temperature = nn.Parameter(torch.tensor(1.5))  # 0-dim
    model.unused = nn.Parameter(torch.randn(4))  # never reached by the loss
    return model.to(dtype)


def loss_of(model: nn.Module, step: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 11, (5,), generator=g)
    target = torch.randn(5, 3, generator=g, dtype=dtype)
    x = model.embed(tokens)
    x = torch.tanh(model.hidden(x))
    x = model.frozen(x)
    return ((model.out(x) * model.temperature - target) ** 2).mean()


def run(
    make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    *,
    steps: int = 6,
    dtype: torch.dtype = torch.float32,
    groups: str = "one",
    none_grads_at: tuple[int, ...] = (),
    scheduler: bool = False,
    seed: int = 0,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_model(dtype, seed)
    if groups == "one":
        param_groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    else:  # several groups with their own hyperparameters
        param_groups = [
            {"params": list(model.embed.parameters()), "lr": 3e-2, "weight_decay": 0.0},
            {"params": list(model.hidden.parameters()), "betas": (0.8, 0.99), "eps": 1e-6},
            {
                "params": [
                    *model.frozen.parameters(),
                    *model.out.parameters(),
                    model.temperature,
                    model.unused,
                ]
            },
        ]
    opt = make_optimizer(param_groups)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(model, step, dtype).backward()
        if step in none_grads_at:
            model.hidden.weight.grad = None  # e.g. a layer skipped this step
        opt.step()
        if sched is not None:
            sched.step()
    return model, opt


def assert_bitwise(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert pa.dtype == pb.dtype
        assert torch.equal(pa, pb), f"{name} differs: max |diff| {(pa - pb).abs().max().item()}"


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for index in sa:
        assert sa[index].keys() == sb[index].keys()
        for key in sa[index]:
            assert torch.equal(sa[index][key], sb[index][key]), (index, key)


GRID = list(
    itertools.product(
        [0.0, 1e-2, 0.3],  # weight_decay
        [False, True],  # amsgrad
        [False, True],  # maximize
    )
)


@pytest.mark.parametrize(("weight_decay", "amsgrad", "maximize"), GRID)
@pytest.mark.parametrize("groups", ["one", "several"])
def test_for_loop_is_bitwise_identical_to_torch(
    weight_decay: float, amsgrad: bool, maximize: bool, groups: str
) -> None:
    kwargs = dict(lr=1e-2, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    ours, our_opt = run(lambda g: gradtools.AdamW(g, foreach=False, **kwargs), groups=groups)
    theirs, their_opt = run(lambda g: TorchAdamW(g, foreach=False, **kwargs), groups=groups)
    assert_bitwise(ours, theirs)
    assert_same_state(our_opt, their_opt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", [False, True])
def test_dtypes_none_grads_and_scheduler_match_torch(dtype: torch.dtype, foreach: bool) -> None:
    options = dict(dtype=dtype, none_grads_at=(1, 2, 4), scheduler=True, groups="several")
    ours, our_opt = run(lambda g: gradtools.AdamW(g, lr=2e-2, foreach=foreach), **options)
    theirs, their_opt = run(lambda g: TorchAdamW(g, lr=2e-2, foreach=foreach), **options)
    assert_bitwise(ours, theirs)
    assert_same_state(our_opt, their_opt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_tensor_lr_is_bitwise_identical_to_torch(dtype: torch.dtype, amsgrad: bool) -> None:
    # torch derives the step size and the decay factor from a tensor lr in the
    # tensor's dtype (float32), not in Python floats; issue 11 item 10a.
    def kwargs() -> dict[str, Any]:
        return dict(lr=torch.tensor(1e-2), weight_decay=0.1, amsgrad=amsgrad, foreach=False)

    options = dict(dtype=dtype, none_grads_at=(2,), scheduler=True, groups="several")
    ours, our_opt = run(lambda g: gradtools.AdamW(g, **kwargs()), **options)
    theirs, their_opt = run(lambda g: TorchAdamW(g, **kwargs()), **options)
    assert_bitwise(ours, theirs)
    assert_same_state(our_opt, their_opt)
    assert torch.is_tensor(our_opt.param_groups[1]["lr"])  # kept as given, as torch does


def test_untouched_and_frozen_parameters_do_not_move() -> None:
    before = make_model()
    model, opt = run(lambda g: gradtools.AdamW(g, lr=1e-1, weight_decay=0.5))
    # weight decay must not reach a parameter that never had a gradient
    assert torch.equal(model.unused, before.unused)
    assert torch.equal(model.frozen.weight, before.frozen.weight)
    assert model.unused not in opt.state
    assert not torch.equal(model.out.weight, before.out.weight)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_foreach_matches_for_loop(amsgrad: bool) -> None:
    loop, _ = run(lambda g: gradtools.AdamW(g, lr=1e-2, amsgrad=amsgrad, foreach=False))
    each, _ = run(lambda g: gradtools.AdamW(g, lr=1e-2, amsgrad=amsgrad, foreach=True))
    for pa, pb in zip(loop.parameters(), each.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_foreach_default_follows_torch_device_rule() -> None:
    from gradtools.adamw import _choose_implementation

    cpu = [torch.zeros(2)]
    group = {"foreach": None, "fused": None}
    assert _choose_implementation(group, cpu) == "for-loop"
    assert _choose_implementation({"foreach": True, "fused": None}, cpu) == "foreach"
    assert _choose_implementation({"foreach": None, "fused": True}, cpu) == "compiled"


@pytest.mark.slow
@pytest.mark.parametrize("amsgrad", [False, True])
def test_compiled_matches_for_loop(amsgrad: bool) -> None:
    kwargs = dict(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, maximize=amsgrad)
    options = dict(none_grads_at=(2,), scheduler=True, groups="several")
    loop, loop_opt = run(lambda g: gradtools.AdamW(g, foreach=False, **kwargs), **options)
    with warnings.catch_warnings():
        # a silent fallback would make this test vacuous
        warnings.filterwarnings("error", message=".*falling back", category=RuntimeWarning)
        fused, fused_opt = run(lambda g: gradtools.AdamW(g, fused=True, **kwargs), **options)
    for pa, pb in zip(loop.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    for index, state in loop_opt.state_dict()["state"].items():
        assert torch.equal(state["step"], fused_opt.state_dict()["state"][index]["step"])


def assert_within_one_rounding(a: nn.Module, b: nn.Module) -> None:
    """Each value of ``a`` is at most one rounding (ulp of its dtype) away from ``b``'s."""
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert pa.dtype == pb.dtype
        wide_a, wide_b = pa.double(), pb.double()
        ulp = torch.finfo(pa.dtype).eps * torch.maximum(wide_a.abs(), wide_b.abs())
        gap = (wide_a - wide_b).abs() - ulp.clamp_min(torch.finfo(pa.dtype).tiny)
        assert gap.max().item() <= 0, f"{name}: {(wide_a - wide_b).abs().max().item()} apart"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dtype", "amsgrad"),
    [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False)],
    ids=["bf16", "bf16-amsgrad", "fp16"],
)
def test_compiled_on_half_precision_matches_torch_fused(dtype: torch.dtype, amsgrad: bool) -> None:
    # Issue 11 item 1: the hyperparameters used to be cast to the parameter
    # dtype, where 0.999 rounds to 1.0 in bf16 and the update divides by eps.
    # torch's fused CPU kernel does the math in float32 and rounds on the store.
    kwargs = dict(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, maximize=amsgrad)
    options = dict(dtype=dtype, none_grads_at=(2,), scheduler=True, groups="several")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*falling back", category=RuntimeWarning)
        ours, our_opt = run(lambda g: gradtools.AdamW(g, fused=True, **kwargs), **options)
    theirs, their_opt = run(lambda g: TorchAdamW(g, fused=True, **kwargs), **options)
    assert_within_one_rounding(ours, theirs)
    for index, state in their_opt.state_dict()["state"].items():
        for key, value in state.items():
            assert our_opt.state_dict()["state"][index][key].dtype == value.dtype, key


@pytest.mark.parametrize("foreach", [False, True])
def test_bfloat16_for_loop_and_foreach_are_bitwise_identical_to_torch(foreach: bool) -> None:
    kwargs = dict(lr=1e-2, weight_decay=0.1, foreach=foreach)
    options = dict(dtype=torch.bfloat16, none_grads_at=(2,), scheduler=True, groups="several")
    ours, our_opt = run(lambda g: gradtools.AdamW(g, **kwargs), **options)
    theirs, their_opt = run(lambda g: TorchAdamW(g, **kwargs), **options)
    assert_bitwise(ours, theirs)
    assert_same_state(our_opt, their_opt)


def test_compiled_path_falls_back_to_foreach_without_a_compiler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_compile(*args: object, **kwargs: object) -> Callable[..., None]:
        def kernel(*a: object, **k: object) -> None:
            raise RuntimeError("no C++ compiler found")

        return kernel

    monkeypatch.setattr(adamw_module, "_compiled", adamw_module._CompiledKernels())
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="falling back to the foreach"):
        fused, fused_opt = run(lambda g: gradtools.AdamW(g, lr=1e-2, fused=True))
    each, each_opt = run(lambda g: gradtools.AdamW(g, lr=1e-2, foreach=True))
    assert_bitwise(fused, each)
    assert_same_state(fused_opt, each_opt)


def test_correct_bias_false_follows_the_uncorrected_formula() -> None:
    lr, wd, beta1, beta2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-8
    model, _ = run(
        lambda g: gradtools.AdamW(g, lr=lr, weight_decay=wd, correct_bias=False),
        dtype=torch.float64,
    )
    # Reference written out in float64: no bias correction in either moment.
    reference = make_model(torch.float64)
    params = [p for p in reference.parameters() if p.requires_grad]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step in range(6):
        reference.zero_grad(set_to_none=True)
        loss_of(reference, step, torch.float64).backward()
        with torch.no_grad():
            for p, mi, vi in zip(params, m, v, strict=True):
                if p.grad is None:
                    continue
                mi.mul_(beta1).add_((1 - beta1) * p.grad)
                vi.mul_(beta2).add_((1 - beta2) * p.grad**2)
                p.mul_(1 - lr * wd).sub_(lr * mi / (vi.sqrt() + eps))
    for pa, pb in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)
    corrected, _ = run(lambda g: gradtools.AdamW(g, lr=lr, weight_decay=wd), dtype=torch.float64)
    assert not torch.allclose(corrected.out.weight, model.out.weight)


def test_state_dict_round_trip_continues_exactly() -> None:
    straight, _ = run(lambda g: gradtools.AdamW(g, lr=1e-2, amsgrad=True), steps=6)

    model = make_model()
    opt = gradtools.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    for step in range(3):
        opt.zero_grad()
        loss_of(model, step, torch.float32).backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = make_model(seed=1)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    resumed_opt = gradtools.AdamW(resumed.parameters(), lr=123.0, amsgrad=True)
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed_opt.param_groups[0]["lr"] == 1e-2
    for step in range(3, 6):
        resumed_opt.zero_grad()
        loss_of(resumed, step, torch.float32).backward()
        resumed_opt.step()
    assert_bitwise(resumed, straight)


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
def test_state_dicts_are_interchangeable_with_torch(direction: str) -> None:
    first_cls, second_cls = (
        (TorchAdamW, gradtools.AdamW)
        if direction == "torch->ours"
        else (gradtools.AdamW, TorchAdamW)
    )
    reference, _ = run(lambda g: TorchAdamW(g, lr=1e-2, foreach=False), steps=6)

    model = make_model()
    opt = first_cls(model.parameters(), lr=1e-2, foreach=False)
    for step in range(3):
        opt.zero_grad()
        loss_of(model, step, torch.float32).backward()
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    second = second_cls(model.parameters(), lr=1e-2, foreach=False)
    second.load_state_dict(state)
    for step in range(3, 6):
        second.zero_grad()
        loss_of(model, step, torch.float32).backward()
        second.step()
    assert_bitwise(model, reference)


BAD_ARGUMENTS = [
    {"lr": -1e-3},
    {"eps": -1.0},
    {"betas": (1.0, 0.999)},
    {"betas": (-0.1, 0.999)},
    {"betas": (0.9, 1.0)},
    {"weight_decay": -0.1},
    {"lr": torch.tensor([1e-3, 1e-3])},
]


@pytest.mark.parametrize("kwargs", BAD_ARGUMENTS, ids=lambda k: ",".join(k))
def test_constructor_errors_match_torch(kwargs: dict[str, Any]) -> None:
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError) as theirs:
        TorchAdamW(params, **kwargs)
    with pytest.raises(ValueError) as ours:
        gradtools.AdamW(params, **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_defaults_match_torch() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    ours = gradtools.AdamW(params).defaults
    theirs = TorchAdamW(params).defaults
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "fused"):
        assert ours[key] == theirs[key], key
    assert ours["correct_bias"] is True


def test_fused_and_foreach_together_are_refused() -> None:
    with pytest.raises(RuntimeError, match="fused"):
        gradtools.AdamW([nn.Parameter(torch.zeros(2))], fused=True, foreach=True)


def test_sparse_gradients_are_refused_with_a_clear_error() -> None:
    embed = nn.Embedding(10, 3, sparse=True)
    opt = gradtools.AdamW(embed.parameters())
    embed(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_loss_falls_on_a_small_regression() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.1
    model = nn.Linear(5, 1)
    opt = gradtools.AdamW(model.parameters(), lr=5e-2, weight_decay=0.0)
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = ((model(x).squeeze(1) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-2 * losses[0]


def test_closure_is_evaluated_and_returned() -> None:
    model = nn.Linear(2, 1)
    before = model.weight.detach().clone()
    opt = gradtools.AdamW(model.parameters())
    seen: list[float] = []

    def closure() -> float:
        opt.zero_grad()
        loss = model(torch.ones(1, 2)).sum()
        loss.backward()
        seen.append(float(loss.detach()))
        return seen[-1]

    assert opt.step(closure) == seen[0]
    assert len(seen) == 1
    assert not torch.equal(model.weight, before)
