"""Data-parallel training under torchrun: one process per device, identical replicas.

    torchrun --nproc_per_node 2 -m bert_demo train --out runs/ddp ...

torchrun starts one process per device and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`from_env` joins the
process group they describe (NCCL on CUDA, one device per process, gloo on the
CPU). Without those variables everything here is a no-op on a single process.

How the training loop uses it (see :mod:`bert_demo.training.train`):

- Batches: the batch-size flags are per process. At each step the global batch
  of a task is the single-process batch of ``world_size`` times that size (the
  same seeded, length-bucketed order), and rank r takes its rows r, r + N, ...:
  every rank a disjoint share, like a ``DistributedSampler`` reshuffled each pass.
- Gradients: each rank's losses are means over its own rows; gradients are
  averaged over ranks. With PCGrad the wrapper does it per task before the
  surgery (``process_group``); otherwise :meth:`Ranks.average_gradients` runs
  one all-reduce after ``backward()``. The model is not wrapped in
  ``DistributedDataParallel``: PCGrad runs one backward pass per task, which DDP's
  hooks reject ("marked as ready twice"), the trainer calls the encoder's
  methods rather than ``forward`` (DDP only hooks ``forward``), and SMART's
  extra passes and the teacher need no reduction of their own.
- Replicas start equal (rank 0's weights are broadcast) and stay equal: they
  apply the same averaged gradient. Checkpoints verify it before saving.
- Side effects come from rank 0 only: the run folder, metrics.jsonl, dev
  evaluation, checkpoints, final.json and the progress bar. Its errors reach
  every rank (:meth:`Ranks.on_main`) instead of leaving the others waiting.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _unflatten_dense_tensors

T = TypeVar("T")
CPU = torch.device("cpu")

# Rank 0 evaluates on the dev sets while the other ranks wait in a collective;
# allow for a long evaluation on a CPU before calling a silent rank dead.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes, and their collectives.

    ``group`` is ``None`` for a single process, where every method is a cheap no-op.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: dist.ProcessGroup | None = None
    # Where collective tensors live: the CUDA device for NCCL, else the CPU.
    comm_device: torch.device = CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.group is not None and self.world_size > 1

    # ------------------------------------------------------------------ data

    def shard(self, rows: Sequence[int]) -> list[int]:
        """This rank's share of a global batch: positions rank, rank + N, ...

        A batch shorter than a multiple of N (the end of a pass) is filled up by
        repeating its first rows, as ``DistributedSampler`` pads, so every rank
        gets the same number of rows and the mean of the ranks' mean losses is
        the mean over the global batch.
        """
        rows = list(rows)
        if not self.distributed:
            return rows
        if not rows:
            raise ValueError("shard: empty global batch")
        padded = rows + [rows[i % len(rows)] for i in range(-len(rows) % self.world_size)]
        return padded[self.rank :: self.world_size]

    # ------------------------------------------------------------------ rank 0's work

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and hand its result (or its exception) to every rank."""
        if not self.distributed:
            return fn()
        outcome: list[Any] = [None]
        if self.is_main:
            try:
                outcome[0] = ("ok", fn())
            except Exception as error:  # re-raised below, on every rank
                outcome[0] = ("error", _picklable(error))
        dist.broadcast_object_list(outcome, src=self._global_rank(0), group=self.group,
                                   device=self.comm_device)
        kind, value = outcome[0]
        if kind == "error":
            raise value
        return value

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order (pickled: for small things)."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    # ------------------------------------------------------------------ tensors

    def broadcast_module(self, module: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers (as DDP does when it wraps)."""
        if not self.distributed:
            return
        tensors = [t.data for t in module.parameters()] + list(module.buffers())
        for same in _by_device_and_dtype(tensors).values():
            flat = torch.cat([t.reshape(-1) for t in same])
            dist.broadcast(flat, src=self._global_rank(0), group=self.group)
            torch._foreach_copy_(same, _unflatten_dense_tensors(flat, same))

    def average_gradients(self, params: Iterable[Tensor]) -> None:
        """Replace every ``.grad`` by its mean over ranks: one all-reduce per dtype.

        A parameter that has a gradient on some ranks only (a head no row of this
        rank reached) gets zeros on the others first, so every rank packs the same
        tensors; one that has none anywhere keeps ``None``.
        """
        if not self.distributed:
            return
        params = [p for p in params if p.requires_grad]
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8,
                                device=self.comm_device)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX, group=self.group)
        grads = []
        for p, anywhere in zip(params, has_grad.tolist(), strict=True):
            if not anywhere:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for same in _by_device_and_dtype(grads).values():
            flat = torch.cat([g.reshape(-1) for g in same])
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.world_size)
            torch._foreach_copy_(same, _unflatten_dense_tensors(flat, same))

    def mean_of(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each number (every rank passes the same keys)."""
        if not self.distributed:
            return values
        keys = sorted(values)
        gathered = self.all_gather(keys)
        if any(other != keys for other in gathered):
            raise RuntimeError(f"ranks logged different statistics: {gathered}")
        vector = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                              device=self.comm_device)
        dist.all_reduce(vector, group=self.group)
        return dict(zip(keys, (vector / self.world_size).tolist(), strict=True))

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when it is true on any (e.g. an interrupt one rank saw)."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.uint8, device=self.comm_device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    def check_replicas_equal(self, module: nn.Module) -> None:
        """Raise if any rank's weights differ from the others' (before a checkpoint).

        Compares per-tensor float64 sums of the values and of their squares: equal
        replicas give equal bits, hence equal sums; a drifted replica (a missed
        all-reduce, a rank-dependent code path) shows up at once.
        """
        if not self.distributed:
            return
        named = list(module.state_dict().items())
        sums = torch.stack(
            [torch.stack([t.double().sum(), t.double().square().sum()]) for _, t in named]
        ).to(self.comm_device)
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        differ = (low != high).any(dim=1).nonzero().flatten().tolist()
        if differ:
            names = ", ".join(named[k][0] for k in differ[:3])
            raise RuntimeError(
                f"the ranks' model replicas differ ({len(differ)} tensors, e.g. {names}); "
                "not saving a checkpoint of one rank's weights"
            )

    # ------------------------------------------------------------------ helpers

    def _global_rank(self, group_rank: int) -> int:
        assert self.group is not None
        return dist.get_global_rank(self.group, group_rank)

    def shutdown(self, together: bool = True) -> None:
        """Leave the process group.

        ``together`` (after a normal end): wait for every rank first, so that no
        rank closes its connections while another may still be finishing its last
        collective (gloo aborts on a closed peer). ``False`` after an error: a
        failing rank must not wait for ranks that are busy elsewhere.
        """
        if self.distributed:
            if together:
                dist.barrier(group=self.group)
            dist.destroy_process_group()

    def exit_process(self, code: int) -> None:
        """End a finished torchrun worker at once, its output flushed and its files closed.

        A gloo worker that returns normally is now and then aborted by the C++ runtime
        while the interpreter exits ("terminate called without an active exception",
        SIGABRT after every file is written; seen in 3 of 120 two-process runs of
        tests/test_distributed_demo.py's torchrun command on a loaded 2-core CPU, and
        in a CI rehearsal on a fresh clone), turning a finished run into a failed one. Nothing is left to do by then,
        so the worker skips the interpreter's teardown.
        """
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _picklable(error: Exception) -> Exception:
    """``error`` itself if it can travel to the other ranks, else its text in a RuntimeError."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def _by_device_and_dtype(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(t.device, t.dtype)].append(t)
    return groups


def rank_seed(seed: int, rank: int) -> int:
    """The seed of the random stream of rank ``rank`` > 0 once the model is built.

    Each rank draws its own dropout masks and SMART noise for its own rows; the
    model's initial weights come from ``seed`` on every rank, and rank 0 simply
    continues that stream, so one process trains exactly as without torchrun.
    """
    if rank <= 0:
        raise ValueError(f"rank_seed is for ranks > 0, got rank {rank}")
    return (seed * 1_000_003 + rank * 7_919) % (2**63)


def from_env(device: str | None) -> tuple[Ranks, str | None]:
    """Join the process group torchrun describes; returns it and the device to train on.

    Outside torchrun (``WORLD_SIZE`` unset or 1) returns a single-process
    :class:`Ranks` and ``device`` unchanged. Under torchrun, ``--device`` may be
    ``cpu`` (gloo) or ``cuda`` (NCCL, process i on ``cuda:LOCAL_RANK``); the
    default is ``cuda`` when CUDA is available.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(
                f"WORLD_SIZE={world} but {name} is not set: launch with torchrun "
                "(torchrun --nproc_per_node N -m bert_demo train ...)"
            )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    name = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(name)
    if chosen.type == "cuda":
        if chosen.index is not None:
            raise ValueError(
                f"--device {name}: under torchrun each process uses cuda:LOCAL_RANK; "
                "pass --device cuda (or leave it out)"
            )
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices: "
                "start at most one process per GPU (--nproc_per_node)"
            )
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
        backend, comm_device = "nccl", chosen
    elif chosen.type == "cpu":
        backend, comm_device = "gloo", CPU
    else:
        raise ValueError(f"--device {name}: torchrun training supports cpu (gloo) and cuda (NCCL)")
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    ranks = Ranks(rank, world, local_rank, dist.group.WORLD, comm_device)
    return ranks, str(chosen)
