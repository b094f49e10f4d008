"""PCGrad and SMART under data parallelism: two gloo processes on the CPU.

Each test spawns two ranks (see rank_launcher.py), trains three steps, saves what
every rank ended with, and compares it here with one process that does the
same arithmetic on all the data:

- PCGrad: the ranks' task losses are means over their half of each batch, so the
  mean over ranks of a task's gradient is the gradient of the mean over the
  union of the halves. The reference therefore runs PCGrad on the union, with
  mean losses, in one process.
- SMART: each rank computes R_s and the Bregman term on its own batch and the
  gradients are averaged over ranks like those of any loss; the reference
  averages the two ranks' losses (the same perturbation noise, drawn from the
  same per-rank generators) in one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rank_launcher import run_ranks
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import gradtools
from gradtools import SMART, MomentumTeacher, PCGrad

WORLD = 2
STEPS = 3
ROWS_PER_RANK = 4
LR = 1e-2

# ---------------------------------------------------------------------- PCGrad

NUM_TASKS = 3
# A task and a negated one pull the trunk in opposite directions: real conflicts.
SIGNS = (1.0, -0.8, 1.2)


class MultiTaskNet(nn.Module):
    """A shared trunk and one head per task; ``forward`` returns every head's output."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(NUM_TASKS))

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [head(z).squeeze(-1) for head in self.heads]


def make_multitask_net() -> MultiTaskNet:
    torch.manual_seed(0)  # every rank and the reference start from the same weights
    return MultiTaskNet()


def global_batches(step: int) -> list[tuple[Tensor, Tensor]]:
    """Each task's batch of the step over all ranks (every rank can rebuild it)."""
    g = torch.Generator().manual_seed(1000 + step)
    rows = WORLD * ROWS_PER_RANK
    return [(torch.randn(rows, 5, generator=g), torch.randn(rows, generator=g)) for _ in SIGNS]


def rank_slice(batch: tuple[Tensor, Tensor], rank: int) -> tuple[Tensor, Tensor]:
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    return batch[0][rows], batch[1][rows]


def multitask_losses(
    model: Callable[[Tensor], list[Tensor]], batches: list[tuple[Tensor, Tensor]]
) -> list[Tensor]:
    """Task t's loss: a mean over its own batch (task t's head on task t's inputs)."""
    return [
        SIGNS[t] * F.mse_loss(model(x)[t], y) for t, (x, y) in enumerate(batches)
    ]


class CollectiveLog:
    """Counts the torch.distributed calls made while it is installed (this process only)."""

    NAMES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
             "reduce_scatter_tensor", "all_to_all_single", "reduce")

    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.dtype, int]] = []

    @contextlib.contextmanager
    def installed(self):  # type: ignore[no-untyped-def]
        originals = {name: getattr(dist, name) for name in self.NAMES}

        def counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
            def call(tensor: Any, *args: Any, **kwargs: Any) -> Any:
                if isinstance(tensor, Tensor):
                    self.calls.append((name, tensor.dtype, tensor.numel()))
                else:
                    self.calls.append((name, torch.float32, -1))
                return original(tensor, *args, **kwargs)

            return call

        for name, original in originals.items():
            setattr(dist, name, counting(name, original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)


# (No annotations on comm hooks: DDP checks them, and this module's are strings.)
def counting_noop_hook(counter, bucket):  # type: ignore[no-untyped-def]
    """A DDP comm hook that only counts: any call means DDP reduced gradients itself."""
    counter[0] += 1
    fut: torch.futures.Future[Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def counting_allreduce_hook(counter, bucket):  # type: ignore[no-untyped-def]
    """DDP's own averaging (divide, then sum over ranks), counting its calls."""
    counter[0] += 1
    buffer = bucket.buffer().div_(dist.get_world_size())
    work = dist.all_reduce(buffer, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _pcgrad_worker(rank: int, world: int, out_dir: str) -> None:
    results: dict[str, Any] = {}
    for mode in ("ddp_no_sync", "unwrapped"):
        net = make_multitask_net()
        ddp_reductions = [0]
        if mode == "ddp_no_sync":
            ddp = DistributedDataParallel(net)
            ddp.register_comm_hook(ddp_reductions, counting_noop_hook)
            model: Callable[[Tensor], list[Tensor]] = ddp
            no_sync: Callable[[], Any] = ddp.no_sync
        else:
            model, no_sync = net, contextlib.nullcontext
        opt = PCGrad(
            gradtools.AdamW(net.parameters(), lr=LR),
            # Deliberately different per rank: the wrapper must use rank 0's orders.
            generator=torch.Generator().manual_seed(100 + rank),
            process_group=dist.group.WORLD,
            # Both storage layouts: autograd's tensors, and one flat row per task.
            gradient_buckets=mode == "unwrapped",
        )
        orders, collectives = [], []
        for step in range(STEPS):
            log = CollectiveLog()
            batches = [rank_slice(b, rank) for b in global_batches(step)]
            opt.zero_grad()
            with no_sync(), log.installed():
                opt.backward(multitask_losses(model, batches))
                opt.step()
            assert opt.stats is not None
            orders.append(opt.stats.orders.clone())
            collectives.append(log.calls)
        results[mode] = {
            "params": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "orders": orders,
            "collectives": collectives,
            "ddp_reductions": ddp_reductions[0],
        }

    # Negative control: the same PCGrad step on a DDP model outside no_sync. DDP's
    # hooks fire in every task's backward pass and the shared trunk is "marked
    # ready" again by the second task: this is what no_sync prevents.
    ddp = DistributedDataParallel(make_multitask_net())
    opt = PCGrad(gradtools.AdamW(ddp.parameters(), lr=LR), process_group=dist.group.WORLD)
    batches = [rank_slice(b, rank) for b in global_batches(0)]
    try:
        opt.backward(multitask_losses(ddp, batches))
        results["without_no_sync"] = "no error"
    except RuntimeError as e:
        results["without_no_sync"] = str(e)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def pcgrad_reference() -> tuple[dict[str, Tensor], list[Tensor]]:
    """One process, PCGrad on the union of the ranks' batches (mean losses), rank 0's seed."""
    net = make_multitask_net()
    opt = PCGrad(gradtools.AdamW(net.parameters(), lr=LR), generator=torch.Generator().manual_seed(100))
    orders = []
    for step in range(STEPS):
        opt.zero_grad()
        opt.backward(multitask_losses(net, global_batches(step)))
        opt.step()
        assert opt.stats is not None
        orders.append(opt.stats.orders.clone())
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, orders


@pytest.mark.slow  # two spawned processes importing torch: 10-20 s on a loaded 2-core machine
def test_pcgrad_data_parallel_equals_one_process_on_the_union(tmp_path: Path) -> None:
    run_ranks(_pcgrad_worker, WORLD, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    expected, expected_orders = pcgrad_reference()

    for mode in ("ddp_no_sync", "unwrapped"):
        for rank, result in enumerate(ranks):
            got = result[mode]
            for name, want in expected.items():
                torch.testing.assert_close(
                    got["params"][name], want, rtol=0, atol=1e-6,
                    msg=lambda m, mode=mode, rank=rank, name=name: f"{mode} rank {rank} {name}: {m}",
                )
                # Replicas must not drift apart, not even in the last bit.
                assert torch.equal(got["params"][name], ranks[0][mode]["params"][name])
            for step in range(STEPS):
                assert torch.equal(got["orders"][step], expected_orders[step])

            # Communication: one collective carries every task's gradients, once per
            # step (not one per task or per tensor); the rest is a few small integer
            # messages (the visiting orders; which task reached which parameter).
            net = make_multitask_net()
            trunk = sum(p.numel() for p in net.trunk.parameters())
            head = sum(p.numel() for p in net.heads[0].parameters())
            for calls in got["collectives"]:
                carrying = [c for c in calls if c[1].is_floating_point]
                assert len(carrying) == 1, calls
                # Every task reaches the trunk and its own head.
                assert carrying[0][:1] == ("all_reduce",)
                assert carrying[0][2] == NUM_TASKS * (trunk + head)
                metadata = [c for c in calls if not c[1].is_floating_point]
                assert len(metadata) <= 3, calls

        # With no_sync, DDP never reduced anything itself: no double reduction.
        assert ranks[0][mode]["ddp_reductions"] == 0

    for result in ranks:
        assert "mark a variable ready only once" in result["without_no_sync"]


# ---------------------------------------------------------------------- SMART

VOCAB, HIDDEN, CLASSES, SEQ = 13, 8, 3, 5


class TinyEncoder(nn.Module):
    """Embedding layer, then an encoder and a classifier that take the embeddings.

    ``forward`` consumes embeddings (what SMART perturbs), so the clean pass and
    SMART's extra passes all go through the DistributedDataParallel wrapper.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.encoder = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN))
        self.classifier = nn.Linear(HIDDEN, CLASSES)

    def embed(self, ids: Tensor) -> Tensor:
        return self.norm(self.embedding(ids))

    def forward(self, embeds: Tensor, mask: Tensor) -> Tensor:
        hidden = torch.tanh(self.encoder(embeds)) * mask.unsqueeze(-1)
        pooled = hidden.sum(1) / mask.sum(1, keepdim=True)
        return self.classifier(pooled)


def make_tiny_encoder() -> TinyEncoder:
    torch.manual_seed(3)
    return TinyEncoder()


def smart_batch(step: int, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    rows = WORLD * ROWS_PER_RANK
    ids = torch.randint(1, VOCAB, (rows, SEQ), generator=g)
    lengths = torch.randint(2, SEQ + 1, (rows,), generator=g)
    mask = (torch.arange(SEQ) < lengths.unsqueeze(1)).float()
    labels = torch.randint(0, CLASSES, (rows,), generator=g)
    part = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    return ids[part], mask[part], labels[part]


def make_smart(rank: int) -> SMART:
    # Large enough radius that R_s is far from rounding noise; per-rank noise streams.
    return SMART(epsilon=1e-2, noise_std=1e-2, step_size=1e-1, steps=1,
                 generator=torch.Generator().manual_seed(7 + rank))


def make_teacher(net: nn.Module) -> MomentumTeacher:
    # A fast EMA so three updates move the teacher visibly.
    return MomentumTeacher(net, warmup_steps=1, warmup_beta=0.5, beta=0.8)


def smart_loss(
    net: TinyEncoder,
    model: Callable[[Tensor, Tensor], Tensor],
    smart: SMART,
    teacher: MomentumTeacher,
    batch: tuple[Tensor, Tensor, Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's loss = CE + R_s + D_Breg on its own batch; also R_s and D_Breg."""
    ids, mask, labels = batch
    embeds = net.embed(ids)
    logits = model(embeds, mask)
    r_s = smart(lambda e: model(e, mask), embeds, logits, kind="kl", mask=mask)
    bregman = teacher.bregman(lambda m: m(m.embed(ids), mask), logits, kind="kl")
    return F.cross_entropy(logits, labels) + r_s + bregman, r_s.detach(), bregman.detach()


def _smart_worker(rank: int, world: int, out_dir: str) -> None:
    net = make_tiny_encoder()
    ddp = DistributedDataParallel(net)
    reductions = [0]
    ddp.register_comm_hook(reductions, counting_allreduce_hook)
    opt = gradtools.AdamW(net.parameters(), lr=LR)
    smart, teacher = make_smart(rank), make_teacher(net)
    terms = []
    for step in range(STEPS):
        opt.zero_grad()
        loss, r_s, bregman = smart_loss(net, ddp, smart, teacher, smart_batch(step, rank))
        loss.backward()
        opt.step()
        teacher.update(net)
        terms.append((r_s, bregman))
    torch.save(
        {
            "params": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "teacher": {k: v.clone() for k, v in teacher.module.state_dict().items()},
            "terms": terms,
            "reductions": reductions[0],
        },
        Path(out_dir) / f"rank{rank}.pt",
    )


def smart_reference() -> tuple[dict[str, Tensor], dict[str, Tensor], list[list[tuple[Tensor, Tensor]]]]:
    """One process: the mean over the two ranks' SMART losses, each with its rank's noise."""
    net = make_tiny_encoder()
    opt = gradtools.AdamW(net.parameters(), lr=LR)
    smarts = [make_smart(r) for r in range(WORLD)]
    teacher = make_teacher(net)
    terms: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(WORLD)]
    for step in range(STEPS):
        opt.zero_grad()
        losses = []
        for r in range(WORLD):
            loss, r_s, bregman = smart_loss(net, net, smarts[r], teacher, smart_batch(step, r))
            losses.append(loss)
            terms[r].append((r_s, bregman))
        (sum(losses) / WORLD).backward()  # type: ignore[operator]
        opt.step()
        teacher.update(net)
    return (
        {k: v.detach().clone() for k, v in net.state_dict().items()},
        {k: v.clone() for k, v in teacher.module.state_dict().items()},
        terms,
    )


@pytest.mark.slow  # two spawned processes importing torch: 10-20 s on a loaded 2-core machine
def test_smart_under_ddp_is_the_mean_of_per_rank_losses(tmp_path: Path) -> None:
    run_ranks(_smart_worker, WORLD, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    params, teacher, terms = smart_reference()
    initial = make_tiny_encoder().state_dict()

    for rank, result in enumerate(ranks):
        for name in params:
            torch.testing.assert_close(result["params"][name], params[name], rtol=0, atol=1e-6)
            torch.testing.assert_close(result["teacher"][name], teacher[name], rtol=0, atol=1e-6)
            # Every rank's teacher is the same EMA of the same replicas, to the bit.
            assert torch.equal(result["teacher"][name], ranks[0]["teacher"][name])
            assert torch.equal(result["params"][name], ranks[0]["params"][name])
        # The terms were computed on the rank's own batch, not a global one.
        for step in range(STEPS):
            for got, want in zip(result["terms"][step], terms[rank][step], strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        # DDP reduced once per step (one bucket), although SMART ran the model
        # three times per step through the wrapper.
        assert result["reductions"] == STEPS
    # The terms are real (not zero) and differ between the ranks' batches.
    assert all(float(r_s) > 0 and float(b) >= 0 for r_s, b in terms[0])
    assert float(terms[0][1][1]) > 0  # the teacher lags the student after an update
    assert not torch.equal(ranks[0]["terms"][0][0], ranks[1]["terms"][0][0])
    # And the teacher did move.
    assert not torch.equal(teacher["classifier.weight"], initial["classifier.weight"])
