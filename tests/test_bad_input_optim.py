"""Bad input to gradtools.AdamW, SMART and MomentumTeacher: a clear error naming the argument.

Each case asserts the exception type and that the message names the offending
argument (and the param group, for per-group values), so a NaN or an infinity
never trains silently into a NaN model (issue 11, items 3, 10b and 10c).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradtools

NAN, INF = math.nan, math.inf


def params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(3))]


def adamw(**kwargs: Any) -> Callable[[], object]:
    return lambda: gradtools.AdamW(params(), **kwargs)


def adamw_groups(*overrides: dict[str, Any]) -> Callable[[], object]:
    return lambda: gradtools.AdamW([{"params": params(), **o} for o in overrides])


def adamw_added_later(**group: Any) -> Callable[[], object]:
    def build() -> object:
        opt = gradtools.AdamW(params())
        opt.add_param_group({"params": params(), **group})
        return opt

    return build


def smart(**kwargs: Any) -> Callable[[], object]:
    return lambda: gradtools.SMART(**kwargs)


def teacher(**kwargs: Any) -> Callable[[], object]:
    kwargs.setdefault("total_steps", 100)
    return lambda: gradtools.MomentumTeacher(nn.Linear(2, 2), **kwargs)


# (build, exception type, regex the message must match: the argument's name)
CASES: dict[str, tuple[Callable[[], object], type[Exception], str]] = {
    # AdamW constructor: torch's texts where torch refuses the value too.
    "adamw-lr-negative": (adamw(lr=-1e-3), ValueError, r"^Invalid learning rate: -0.001$"),
    "adamw-lr-nan": (adamw(lr=NAN), ValueError, r"learning rate: nan"),
    "adamw-lr-inf": (adamw(lr=INF), ValueError, r"learning rate: inf .*lr must be finite"),
    "adamw-lr-string": (adamw(lr="1e-3"), TypeError, r"^lr must be a number, got str"),
    "adamw-lr-tensor-2": (adamw(lr=torch.tensor([1e-3, 1e-3])), ValueError, r"Tensor lr"),
    "adamw-lr-tensor-inf": (adamw(lr=torch.tensor(INF)), ValueError, r"learning rate.*finite"),
    "adamw-eps-negative": (adamw(eps=-1.0), ValueError, r"^Invalid epsilon value: -1.0$"),
    "adamw-eps-inf": (adamw(eps=INF), ValueError, r"epsilon value: inf .*eps must be finite"),
    "adamw-eps-nan": (adamw(eps=NAN), ValueError, r"epsilon value: nan"),
    "adamw-beta1-one": (adamw(betas=(1.0, 0.999)), ValueError, r"beta parameter at index 0"),
    "adamw-beta1-nan": (adamw(betas=(NAN, 0.999)), ValueError, r"beta parameter at index 0"),
    "adamw-beta2-one": (adamw(betas=(0.9, 1.0)), ValueError, r"beta parameter at index 1"),
    "adamw-beta2-inf": (adamw(betas=(0.9, INF)), ValueError, r"beta parameter at index 1"),
    "adamw-betas-scalar": (adamw(betas=0.9), TypeError, r"^betas must be a pair"),
    "adamw-betas-triple": (adamw(betas=(0.9, 0.99, 0.999)), TypeError, r"^betas must be a pair"),
    "adamw-wd-negative": (adamw(weight_decay=-1.0), ValueError, r"^Invalid weight_decay value"),
    "adamw-wd-inf": (adamw(weight_decay=INF), ValueError, r"weight_decay must be finite"),
    "adamw-wd-nan": (adamw(weight_decay=NAN), ValueError, r"weight_decay value: nan"),
    # Per-group values, which torch does not check at all.
    "adamw-group0-lr-nan": (
        adamw_groups({"lr": NAN}),
        ValueError,
        r"learning rate: nan in param group 0$",
    ),
    "adamw-group1-eps-inf": (
        adamw_groups({}, {"eps": INF}),
        ValueError,
        r"epsilon value: inf in param group 1 .*eps must be finite",
    ),
    "adamw-group1-betas": (
        adamw_groups({}, {"betas": (0.9, 1.0)}),
        ValueError,
        r"beta parameter at index 1: 1.0 in param group 1$",
    ),
    "adamw-added-group-wd": (
        adamw_added_later(weight_decay=-1.0),
        ValueError,
        r"weight_decay value: -1.0 in param group 1$",
    ),
    "adamw-added-group-lr-inf": (
        adamw_added_later(lr=INF),
        ValueError,
        r"learning rate: inf in param group 1 .*lr must be finite",
    ),
    # SMART: the perturbation is float32, so its scales must be finite float32 values.
    "smart-epsilon-1e300": (smart(epsilon=1e300), ValueError, r"^epsilon must be at most 3.403e\+38"),
    "smart-noise-1e39": (smart(noise_std=1e39), ValueError, r"^noise_std must be at most"),
    "smart-step-inf": (smart(step_size=INF), ValueError, r"^step_size must be finite"),
    "smart-epsilon-nan": (smart(epsilon=NAN), ValueError, r"^epsilon must be finite"),
    "smart-epsilon-negative": (smart(epsilon=-1e-5), ValueError, r"^epsilon must be finite and >= 0"),
    "smart-epsilon-string": (smart(epsilon="1e-5"), TypeError, r"^epsilon must be a number"),
    "smart-steps-negative": (smart(steps=-1), ValueError, r"^steps must be an int >= 0"),
    "smart-steps-float": (smart(steps=1.5), ValueError, r"^steps must be an int >= 0"),
    "smart-norm": (smart(norm="l3-token"), ValueError, r"^norm must be one of"),
    "smart-dropout": (smart(dropout="sometimes"), ValueError, r"^dropout must be one of"),
    # MomentumTeacher: momenta and the warmup share are fractions; counts are ints.
    "teacher-beta-above-one": (teacher(beta=1.5), ValueError, r"^beta must lie in \[0, 1\]"),
    "teacher-beta-nan": (teacher(beta=NAN), ValueError, r"^beta must lie in \[0, 1\], got nan"),
    "teacher-warmup-beta": (teacher(warmup_beta=-0.1), ValueError, r"^warmup_beta must lie"),
    "teacher-fraction-two": (teacher(warmup_fraction=2.0), ValueError, r"^warmup_fraction must"),
    "teacher-fraction-inf": (teacher(warmup_fraction=INF), ValueError, r"^warmup_fraction must"),
    "teacher-beta-string": (teacher(beta="0.99"), TypeError, r"^beta must be a number"),
    "teacher-total-negative": (teacher(total_steps=-5), ValueError, r"^total_steps must be"),
    "teacher-warmup-float": (teacher(warmup_steps=2.5), ValueError, r"^warmup_steps must be"),
    "teacher-dropout": (teacher(dropout="never"), ValueError, r"^dropout must be one of"),
    "teacher-not-a-model": (
        lambda: gradtools.MomentumTeacher("model", total_steps=10),  # type: ignore[arg-type]
        TypeError,
        r"^model must be a torch.nn.Module",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_hyperparameter_is_refused_naming_it(case: str) -> None:
    build, error, message = CASES[case]
    with pytest.raises(error, match=message):
        build()


def test_refused_added_group_leaves_the_optimizer_unchanged() -> None:
    opt = gradtools.AdamW(params())
    with pytest.raises(ValueError, match="param group 1"):
        opt.add_param_group({"params": params(), "lr": NAN})
    assert len(opt.param_groups) == 1


def test_constructor_texts_are_torchs_where_torch_refuses() -> None:
    for kwargs in ({"lr": -1.0}, {"eps": NAN}, {"betas": (0.9, 1.0)}, {"weight_decay": -2.0}):
        with pytest.raises(ValueError) as theirs:
            torch.optim.AdamW(params(), **kwargs)
        with pytest.raises(ValueError) as ours:
            gradtools.AdamW(params(), **kwargs)
        assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_smart_on_a_pure_half_precision_model_says_what_to_do(dtype: torch.dtype) -> None:
    # Issue 11 item 10c: the float32 perturbed sum used to reach a bf16 Linear
    # and fail inside it ("mat1 and mat2 must have the same dtype").
    torch.manual_seed(0)
    model = nn.Linear(8, 3).to(dtype)
    embeds = torch.randn(2, 4, 8, dtype=dtype)
    clean = model(embeds)
    with pytest.raises(TypeError, match=rf"embeddings are {dtype}.*torch.autocast\('cpu'"):
        gradtools.SMART()(model, embeds, clean)


def test_smart_accepts_half_precision_embeddings_under_autocast() -> None:
    # The supported way: float32 weights under autocast; delta stays float32.
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    embeds = torch.randn(2, 4, 8).to(torch.bfloat16)
    smart = gradtools.SMART(epsilon=1e-3, noise_std=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r_s = smart(model, embeds, model(embeds))
    assert torch.isfinite(r_s)
    assert smart.stats is not None and smart.stats.delta_norm_max is not None
    epsilon_in_float32 = torch.tensor(1e-3, dtype=torch.float32).item()
    assert 0 < smart.stats.delta_norm_max.item() <= epsilon_in_float32
