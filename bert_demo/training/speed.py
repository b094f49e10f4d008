"""How a run computes: its precision, its AdamW implementation, its CPU threads.

Precision. ``bf16`` runs the forward passes under ``torch.autocast`` in bfloat16
(matmuls and attention in bf16); parameters, their gradients, the optimizer state,
SMART's perturbation and every loss stay float32 (the heads' outputs are cast
back to float32 before a loss or divergence reads them). ``auto`` picks bf16 where
the hardware runs it natively and fp32 elsewhere: on a CPU without bf16 units
(avx512_bf16 or AMX) oneDNN emulates bf16 and it is slower than fp32.

AdamW implementation (``--optimizer adamw``, i.e. gradtools.AdamW): ``fused`` is
its torch.compile'd one-kernel update; where the compiler does not work it falls
back to ``foreach`` with one line of notice instead of a warning per run.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
ADAMW_IMPLS = ("fused", "foreach", "for-loop")
# CPU flags (Linux /proc/cpuinfo names) of native bf16 matmul units.
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def notice(message: str) -> None:
    """One line on stderr that tells what was chosen for the user (not a warning)."""
    print(f"note: {message}", file=sys.stderr)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty when the system does not list them)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def bf16_is_native(device: torch.device, flags: set[str] | None = None) -> tuple[bool, str]:
    """(whether ``device`` has bf16 hardware, what was found) for ``--precision auto``."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bf16"
    if device.type != "cpu":
        return False, f"no bf16 detection for {device.type}"
    found = sorted(set(_BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
    if found:
        return True, f"the CPU has {', '.join(found)}"
    return False, (f"the CPU has neither {' nor '.join(_BF16_CPU_FLAGS)} "
                   f"(torch's CPU capability: {torch.backends.cpu.get_cpu_capability()})")


def resolve_precision(requested: str, device: torch.device,
                      flags: set[str] | None = None, *, quiet: bool = False) -> str:
    """``fp32`` or ``bf16`` for ``--precision requested``; one notice when auto falls back
    (none with ``quiet``, for a check ahead of the runs that will give it)."""
    if requested not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    native, why = bf16_is_native(device, flags)
    if native:
        return "bf16"
    if not quiet:
        notice(f"--precision auto: using fp32 because {why}; --precision bf16 forces bf16")
    return "fp32"


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """bf16 autocast on ``device`` for ``precision == 'bf16'``; nothing for fp32."""
    if precision == "fp32":
        yield
        return
    if precision != "bf16":
        raise ValueError(f"precision must be fp32 or bf16 here, got {precision!r}")
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


def run_autocast(requested: str | None, trained: str,
                 device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Autocast for evaluating a trained run: ``--precision requested``, or (None) the
    run's own ``trained`` precision, so that evaluating a run on the machine it trained
    on reproduces its dev numbers."""
    return autocast(resolve_precision(requested or trained, device), device)


def fused_adamw_works() -> tuple[bool, str]:
    """Whether gradtools.AdamW(fused=True) compiles here (a one-parameter trial step).

    The trial compiles the kernel the run then reuses (it is cached per process);
    without a working compiler gradtools.AdamW would warn on the first real step.
    """
    import gradtools
    from gradtools.adamw import compile_failure

    # 16 elements: sizes 0 and 1 are specialised by the compiler, others share the kernel.
    trial = torch.nn.Parameter(torch.zeros(16))
    trial.grad = torch.ones(16)
    with warnings.catch_warnings():
        # The fallback's warning is replaced by the demo's one-line notice.
        warnings.simplefilter("ignore")
        gradtools.AdamW([trial], fused=True).step()
    reason = compile_failure()  # recorded whenever the compiled path falls back
    if reason is not None:
        return False, reason
    return True, "compiled"


def resolve_adamw_impl(requested: str) -> str:
    """The AdamW implementation a run uses: ``fused`` only where it compiles."""
    if requested not in ADAMW_IMPLS:
        raise ValueError(f"--adamw-impl must be one of {ADAMW_IMPLS}, got {requested!r}")
    if requested != "fused":
        return requested
    works, why = fused_adamw_works()
    if works:
        return "fused"
    notice(f"--adamw-impl fused: torch.compile is unavailable ({why}); using foreach")
    return "foreach"


def adamw_flags(impl: str) -> dict[str, bool]:
    """gradtools.AdamW's keyword arguments for an implementation name."""
    return {"fused": {"fused": True, "foreach": False},
            "foreach": {"fused": False, "foreach": True},
            "for-loop": {"fused": False, "foreach": False}}[impl]


def threads_for_jobs(jobs: int, cores: int) -> int:
    """Torch threads of each of ``jobs`` parallel runs sharing ``cores`` cores."""
    return max(1, cores // jobs)
