"""Mixed precision through the whole stack: PCGrad + SMART (+ teacher) + gradtools.AdamW.

One small two-task problem is trained twice from the same weights and the same
random streams: once in float32, once under autocast (bf16 on the CPU; fp16 with
a GradScaler on CUDA). Half precision changes the numbers a little, never the
decisions: the predicted classes on held-out data and, step by step, whether
the two tasks' gradients conflict (the sign PCGrad acts on). SMART's
perturbation must stay float32 throughout: epsilon = 1e-5 is far below bf16's
resolution near 1 (2^-8), so a half-precision delta would round away.

Self-contained on purpose: the CUDA test runs as is on a GPU machine
(``pytest tests/test_mixed_precision.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradtools
from gradtools import SMART, MomentumTeacher, PCGrad

VOCAB, HIDDEN, LENGTH = 20, 16, 6
# Tokens 1..18 in three groups of six; a sequence of class c holds four tokens of
# group c among six, so the classes are well separated and a short training run
# reaches large margins (decisions that precision cannot flip).
GROUPS = torch.arange(1, 19).reshape(3, 6)
STEPS = 40
EPSILON = 1e-5
# A step's cosine between the task gradients, computed from bf16 activations, is
# known to about 1e-2 (bf16 keeps 8 significant bits); a conflict sign is only
# compared where the float32 cosine is clear of zero by more than that.
CLEAR_COSINE = 0.05


class TwoTaskNet(nn.Module):
    """Embeddings -> a residual MLP encoder -> mean pool -> a 3-class head and a binary head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.encoder = nn.Sequential(nn.Linear(HIDDEN, 32), nn.GELU(), nn.Linear(32, HIDDEN))
        self.classes = nn.Linear(HIDDEN, 3)
        self.binary = nn.Linear(HIDDEN, 1)

    def embed(self, ids: Tensor) -> Tensor:
        embeds = self.norm(self.embedding(ids))
        device = ids.device.type
        if torch.is_autocast_enabled(device):
            # Autocast leaves LayerNorm in float32; hand the encoder half-precision
            # embeddings, as models that keep activations in half precision do, so
            # that SMART has to keep its delta in float32 by itself.
            embeds = embeds.to(torch.get_autocast_dtype(device))
        return embeds

    def forward(self, task: int, embeds: Tensor, mask: Tensor) -> Tensor:
        hidden = torch.tanh(self.encoder(embeds) + embeds) * mask.unsqueeze(-1)
        pooled = hidden.sum(1) / mask.sum(1, keepdim=True)
        return self.classes(pooled) if task == 0 else self.binary(pooled).squeeze(-1)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_data(rows: int, seed: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ids, mask, 3-class labels, binary labels ("is it class 0?")."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (rows,), generator=g)
    ids = torch.randint(1, VOCAB, (rows, LENGTH), generator=g)
    ids[:, :4] = GROUPS[labels.unsqueeze(1), torch.randint(0, 6, (rows, 4), generator=g)]
    ids = ids[:, torch.randperm(LENGTH, generator=g)]
    mask = torch.ones(rows, LENGTH)
    binary = (labels == 0).float()
    return ids.to(device), mask.to(device), labels.to(device), binary.to(device)


@dataclass
class Run:
    """What one training run produced."""

    net: TwoTaskNet
    cosines: list[float] = field(default_factory=list)
    conflicts: list[bool] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)  # steps a GradScaler skipped
    losses: list[float] = field(default_factory=list)
    smart_input_dtypes: set[torch.dtype] = field(default_factory=set)
    delta_seen: list[float] = field(default_factory=list)  # max |perturbed - clean| per pass
    delta_norm_max: list[float] = field(default_factory=list)


def task_objective(
    run: Run,
    smart: SMART,
    teacher: MomentumTeacher,
    task: int,
    ids: Tensor,
    embeds: Tensor,
    mask: Tensor,
    target: Tensor,
) -> Tensor:
    """The task's loss + R_s + the Bregman term; records what SMART's passes saw."""
    net = run.net
    out = net(task, embeds, mask)
    if task == 0:
        kind, task_loss = "kl", F.cross_entropy(out.float(), target)
    else:
        kind, task_loss = "bkl", F.binary_cross_entropy_with_logits(out.float(), target)

    def forward(perturbed: Tensor) -> Tensor:
        run.smart_input_dtypes.add(perturbed.dtype)
        gap = (perturbed.detach().float() - embeds.detach().float()).abs().max()
        run.delta_seen.append(float(gap))
        return net(task, perturbed, mask)

    r_s = smart(forward, embeds, out, kind=kind, mask=mask)
    assert smart.stats is not None and smart.stats.delta_norm_max is not None
    run.delta_norm_max.append(float(smart.stats.delta_norm_max))
    bregman = teacher.bregman(lambda m: m(task, m.embed(ids), mask), out, kind=kind)
    return task_loss + r_s + bregman


def train(
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None = None,
) -> Run:
    """PCGrad(gradtools.AdamW) over two tasks, each loss + R_s + the Bregman term."""
    torch.manual_seed(0)
    net = TwoTaskNet().to(device)
    opt = PCGrad(
        gradtools.AdamW(net.parameters(), lr=1e-2), generator=torch.Generator().manual_seed(1)
    )
    smart = SMART(
        epsilon=EPSILON, noise_std=EPSILON, step_size=1e-3,
        generator=torch.Generator(device=device).manual_seed(2),
    )
    teacher = MomentumTeacher(net, warmup_steps=0)
    run = Run(net)
    for step in range(STEPS):
        ids, mask, labels, binary = make_data(32, 100 + step, device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            embeds = net.embed(ids)
            losses = [
                task_objective(run, smart, teacher, task, ids, embeds, mask, target)
                for task, target in enumerate((labels, binary))
            ]
        run.losses.extend(float(loss.detach()) for loss in losses)
        opt.zero_grad()
        if scaler is None:
            opt.backward(losses)
            opt.step()
        else:
            opt.backward([scaler.scale(loss) for loss in losses])
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            run.skipped.append(scaler.get_scale() < scale)
        teacher.update(net)
        assert opt.stats is not None
        run.cosines.append(float(opt.stats.cosine[0, 1]))
        run.conflicts.append(bool(opt.stats.conflicts[0, 1]))
    return run


def decisions(run: Run, device: torch.device, autocast_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """Predicted class and binary decision on held-out rows, under the run's precision."""
    ids, mask, _, _ = make_data(256, 7, device)
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                         enabled=autocast_dtype is not None):
        embeds = run.net.embed(ids)
        classes = run.net(0, embeds, mask).float().argmax(1)
        binary = run.net(1, embeds, mask).float() > 0
    return classes, binary


def check_against_float32(half: Run, full: Run, half_decisions, full_decisions) -> None:  # type: ignore[no-untyped-def]
    # Trains without NaN: every loss and every weight (and the teacher's) is finite.
    assert all(math.isfinite(x) for x in half.losses)
    for p in list(half.net.parameters()):
        assert p.dtype == torch.float32 and torch.isfinite(p).all()

    # The same decisions as float32.
    for got, want in zip(half_decisions, full_decisions, strict=True):
        assert torch.equal(got, want)
    # ... and the float32 run did learn (the decisions are not all one class).
    labels = make_data(256, 7, torch.device("cpu"))[2]
    assert (full_decisions[0].cpu() == labels).float().mean() > 0.9

    # The same conflicts, step by step, wherever the sign is clear.
    clear = [k for k, c in enumerate(full.cosines) if abs(c) > CLEAR_COSINE]
    assert len(clear) > STEPS // 2
    assert any(full.conflicts[k] for k in clear) and not all(full.conflicts[k] for k in clear)
    for k in clear:
        assert half.conflicts[k] == full.conflicts[k], f"step {k}: cosine {full.cosines[k]:.3f}"

    # SMART's perturbation stayed float32 and survived: every extra pass saw
    # float32 inputs that differ from the clean embeddings by about epsilon (in
    # bf16 or fp16 near 1, a 1e-5 change rounds to exactly zero).
    assert half.smart_input_dtypes == {torch.float32}
    assert all(0.5 * EPSILON < gap < 2 * EPSILON for gap in half.delta_seen[1::2])
    assert all(math.isclose(n, EPSILON, rel_tol=1e-3) for n in half.delta_norm_max)


def test_bf16_autocast_on_cpu_makes_the_float32_decisions() -> None:
    cpu = torch.device("cpu")
    full = train(cpu, None)
    half = train(cpu, torch.bfloat16)
    check_against_float32(half, full, decisions(half, cpu, torch.bfloat16), decisions(full, cpu, None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_autocast_with_grad_scaler_on_cuda_makes_the_float32_decisions() -> None:
    cuda = torch.device("cuda")
    full = train(cuda, None)
    # A moderate initial scale: the tiny model's gradients do not overflow it, so
    # no step is skipped and the two runs stay step-for-step comparable.
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    half = train(cuda, torch.float16, scaler)
    assert not any(half.skipped), f"GradScaler skipped steps {half.skipped}"
    check_against_float32(
        half, full, decisions(half, cuda, torch.float16), decisions(full, cuda, None)
    )
