"""Run a function in several gloo processes on this machine, bounded and cleaned up.

Used by the data-parallel tests. Every process joins one gloo group over
127.0.0.1 through a TCP store that the parent opens on a port the kernel picks
(port 0, so no guessed or racy port), with a timeout on every collective, and
the parent waits a bounded time and kills whatever is left.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HOST = "127.0.0.1"
# A collective that waits longer than this means a rank died or diverged: fail
# instead of hanging the suite.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def _entry(
    rank: int, worker: Callable[..., None], world: int, port: int, args: tuple[Any, ...]
) -> None:
    # gloo picks a network interface for its pair connections; keep it on loopback.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    store = dist.TCPStore(HOST, port, world, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        worker(rank, world, *args)
        # Leave together: gloo aborts a rank whose peer closes the connection while
        # it is still finishing its last collective. (Not after an error: the
        # failing rank must not wait for the others.)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(
    worker: Callable[..., None], world: int, *args: Any, timeout_s: float = 120.0
) -> None:
    """Call ``worker(rank, world, *args)`` in ``world`` spawned processes of one gloo group.

    ``worker`` must be importable (a module-level function). A worker's exception
    is re-raised here with its traceback; a run longer than ``timeout_s`` is
    killed and reported as a ``TimeoutError``.
    """
    store = dist.TCPStore(HOST, 0, world, is_master=True, wait_for_workers=False)
    context = mp.start_processes(
        _entry,
        args=(worker, world, store.port, args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{world} ranks did not finish within {timeout_s:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
        del store
