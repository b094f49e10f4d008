"""The momentum teacher: EMA schedule, no aliasing, no gradients, Bregman term, resuming."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from gradtools import SMART, MomentumTeacher, capture_rng_state


class Student(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Linear(5, 8)
        self.norm = nn.BatchNorm1d(8)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(8, 3)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(torch.tanh(self.norm(self.body(x)))))


def _student(seed: int = 0, dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> Student:
    torch.manual_seed(seed)
    return Student(dropout).to(dtype)


def _fake_optimizer_step(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device))
        model.get_buffer("steps_seen").add_(1)


def test_teacher_equals_a_hand_computed_ema_across_the_beta_switch() -> None:
    student = _student(dtype=torch.float64)
    teacher = MomentumTeacher(student, total_steps=30)  # 10% of 30: 3 updates with 0.99
    assert teacher.warmup_steps == 3
    expected = {n: p.detach().clone() for n, p in student.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    betas = []
    for _ in range(7):
        _fake_optimizer_step(student, gen)
        teacher.update(student)
        beta = teacher.stats.last_beta
        assert beta is not None
        betas.append(beta)
        for name, p in student.named_parameters():
            expected[name] = beta * expected[name] + (1 - beta) * p.detach()
    assert betas == [0.99, 0.99, 0.99, 0.999, 0.999, 0.999, 0.999]
    for name, p in teacher.module.named_parameters():
        assert torch.allclose(p, expected[name], rtol=1e-12, atol=1e-14), name
    # Buffers are copied, not averaged.
    assert teacher.module.get_buffer("steps_seen") == 7
    assert torch.equal(
        teacher.module.get_buffer("norm.running_mean"), student.get_buffer("norm.running_mean")
    )


def test_the_warmup_count_is_configurable_and_required() -> None:
    student = _student()
    assert MomentumTeacher(student, total_steps=1000).warmup_steps == 100
    assert MomentumTeacher(student, total_steps=70).warmup_steps == 7
    assert MomentumTeacher(student, total_steps=1000, warmup_fraction=0.25).warmup_steps == 250
    only = MomentumTeacher(student, warmup_steps=0, beta=0.9)
    assert [only.beta_at(i) for i in (1, 2)] == [0.9, 0.9]
    custom = MomentumTeacher(student, warmup_steps=2, warmup_beta=0.5, beta=0.75)
    assert [custom.beta_at(i) for i in (1, 2, 3)] == [0.5, 0.5, 0.75]
    with pytest.raises(ValueError, match="total_steps"):
        MomentumTeacher(student)
    with pytest.raises(ValueError, match="beta"):
        MomentumTeacher(student, total_steps=10, beta=1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        MomentumTeacher(student, warmup_steps=-1)


def test_the_teacher_never_aliases_the_student() -> None:
    student = _student()
    teacher = MomentumTeacher(student, total_steps=10)
    student_ptrs = {t.data_ptr() for t in [*student.parameters(), *student.buffers()]}
    teacher_tensors = [*teacher.module.parameters(), *teacher.module.buffers()]
    assert not student_ptrs & {t.data_ptr() for t in teacher_tensors}
    before = [t.clone() for t in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(3.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.module.parameters(), strict=True))
    assert not any(p.requires_grad for p in teacher.module.parameters())


def test_bregman_gradients_reach_the_student_and_never_the_teacher() -> None:
    student = _student(2)
    teacher = MomentumTeacher(student, total_steps=10)
    x = torch.randn(6, 5)
    _fake_optimizer_step(student, torch.Generator().manual_seed(3))
    out = student(x)
    prox = teacher.bregman(lambda m: m(x), out, kind="kl")
    assert prox.item() > 0
    prox.backward()
    for p in student.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.module.parameters())
    assert teacher.stats.bregman is not None and torch.equal(teacher.stats.bregman, prox.detach())
    assert not teacher.outputs(lambda m: m(x)).requires_grad  # type: ignore[union-attr]


def test_with_smart_gradients_still_skip_the_teacher() -> None:
    student = _student(3)
    teacher = MomentumTeacher(student, warmup_steps=0)
    x = torch.randn(6, 5, requires_grad=True)
    out = student(x)
    embeds = x.unsqueeze(1)  # [B, 1, 5]: one "token" per example
    reg = SMART(1e-2, 1e-2)(lambda e: student(e.squeeze(1)), embeds, out)
    loss = nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 0, 1, 2]))
    (loss + 5.0 * reg + teacher.bregman(lambda m: m(x), out)).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.module.parameters())


def test_a_fresh_teacher_agrees_with_its_student() -> None:
    student = _student(4).eval()
    teacher = MomentumTeacher(student, total_steps=10)
    x = torch.randn(6, 5)
    assert teacher.bregman(lambda m: m(x), student(x)).item() == 0.0
    # With dropout live in the student, replaying its masks in the teacher keeps it zero.
    noisy = _student(5, dropout=0.5)
    replaying = MomentumTeacher(noisy, total_steps=10, dropout="replay")
    rng = capture_rng_state()
    out = noisy(x)
    assert replaying.bregman(lambda m: m(x), out, rng_state=rng).item() == 0.0
    assert MomentumTeacher(noisy, total_steps=10).bregman(lambda m: m(x), out).item() > 0


def test_mu_zero_gives_exactly_the_plain_gradients() -> None:
    x = torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def grads(with_teacher: bool) -> list[Tensor | None]:
        student = _student(6, dropout=0.2)
        teacher = MomentumTeacher(student, total_steps=10)
        _fake_optimizer_step(student, torch.Generator().manual_seed(0))
        torch.manual_seed(9)
        out = student(x)
        loss = nn.functional.cross_entropy(out, y)
        if with_teacher:
            loss = loss + 0.0 * teacher.bregman(lambda m: m(x), out)
        loss.backward()
        return [p.grad for p in student.parameters()]

    for a, b in zip(grads(False), grads(True), strict=True):
        assert a is not None and b is not None and torch.equal(a, b)


def test_state_dict_resumes_the_same_trajectory() -> None:
    student = _student(7)
    teacher = MomentumTeacher(student, total_steps=20)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        _fake_optimizer_step(student, gen)
        teacher.update(student)
    saved = teacher.state_dict()
    resumed = MomentumTeacher(_student(8), warmup_steps=0)
    resumed.load_state_dict(saved)
    assert resumed.num_updates == 3 and resumed.warmup_steps == 2 and resumed.next_beta == 0.999
    _fake_optimizer_step(student, gen)
    teacher.update(student)
    resumed.update(student)
    for a, b in zip(teacher.module.parameters(), resumed.module.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="missing"):
        resumed.load_state_dict({"module": saved["module"]})


def test_update_refuses_a_different_model() -> None:
    teacher = MomentumTeacher(_student(), total_steps=10)
    with pytest.raises(ValueError, match="model"):
        teacher.update(nn.Linear(5, 3))
    with pytest.raises(ValueError, match="float64"):
        teacher.update(_student(dtype=torch.float64))


def test_dropout_policy_of_the_teacher_pass() -> None:
    noisy = _student(9, dropout=0.5)
    x = torch.randn(32, 5)
    off = MomentumTeacher(noisy, total_steps=10)
    assert torch.equal(off.outputs(lambda m: m(x)), off.outputs(lambda m: m(x)))  # type: ignore[arg-type]
    keep = MomentumTeacher(noisy, total_steps=10, dropout="keep")
    assert not torch.equal(keep.outputs(lambda m: m(x)), keep.outputs(lambda m: m(x)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rng_state="):
        MomentumTeacher(noisy, total_steps=10, dropout="replay").outputs(lambda m: m(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_ema_and_replayed_teacher_pass() -> None:
    device = torch.device("cuda")
    student = _student(10, dropout=0.5).to(device)
    teacher = MomentumTeacher(student, total_steps=10, dropout="replay")
    x = torch.randn(8, 5, device=device)
    rng = capture_rng_state(device)
    out = student(x)
    assert teacher.bregman(lambda m: m(x), out, rng_state=rng).item() == 0.0
    expected = [p.detach().clone() for p in teacher.module.parameters()]
    _fake_optimizer_step(student, torch.Generator(device=device).manual_seed(0))
    teacher.update(student)
    for t, e, s in zip(teacher.module.parameters(), expected, student.parameters(), strict=True):
        assert torch.allclose(t, 0.99 * e + 0.01 * s.detach(), rtol=1e-6, atol=1e-7)
