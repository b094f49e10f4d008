"""Optional TensorBoard logging: the same scalars as metrics.jsonl, under RUN/tensorboard.

``enabled=None`` (the default) logs when the ``tensorboard`` package is installed
and stays silent otherwise; ``enabled=True`` (``--tensorboard``) makes a missing
package an error, ``enabled=False`` turns it off.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bert_demo.run_folder.safe_write import refuse_links

TENSORBOARD_DIR = "tensorboard"
# Record fields that place a record rather than measure something.
_NOT_SCALARS = ("event", "step")


class TensorBoardUnavailable(ValueError):
    """--tensorboard was asked for and the tensorboard package is not installed."""


def tensorboard_installed() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def check_available(enabled: bool | None) -> None:
    """Raise when TensorBoard was asked for explicitly and is not installed."""
    if enabled and not tensorboard_installed():
        raise TensorBoardUnavailable(
            "--tensorboard: the tensorboard package is not installed; "
            "pip install -e '.[tensorboard]' in the clone (or drop --tensorboard)")


class TensorBoardLog:
    """Writes each metrics.jsonl record as scalars ``<event>/<name>`` at its step."""

    def __init__(self, run: Path, enabled: bool | None = None, first_step: int = 1) -> None:
        self.writer: Any = None
        check_available(enabled)
        if enabled is False or not tensorboard_installed():
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides what an earlier writer logged from the first step
        # this writer will log on (a resumed run logs those steps again; a new run, all).
        # A run from elsewhere must not send the event files out of it through a link.
        log_dir = refuse_links(run / TENSORBOARD_DIR, run)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=first_step)

    @property
    def active(self) -> bool:
        return self.writer is not None

    def log(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        event, step = record.get("event", "train"), int(record["step"])
        for name, value in record.items():
            if name in _NOT_SCALARS or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{event}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
