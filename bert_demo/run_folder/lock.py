"""One writer per run folder: an exclusive lock held while a process writes the run.

The lock is ``fcntl.flock`` on ``RUN/.lock`` (on Windows ``msvcrt.locking``, which no test
here runs), which also holds the holder's pid and host for the refusal message. The operating system drops the
lock when its process ends, however it ends, so a lock left behind by a killed process
(kill -9) never blocks: the file stays, the lock does not, and the next run takes it over.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
from pathlib import Path
from types import TracebackType

LOCK = ".lock"


def _try_lock(fd: int) -> bool:
    """Lock ``fd`` exclusively without waiting; False when another process holds it."""
    if sys.platform == "win32":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class RunLocked(RuntimeError):
    """Another process holds the run folder's lock."""


class RunLock:
    """The lock of the run folder ``folder``; :meth:`acquire` or use as a context manager."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, what: str = "train") -> RunLock:
        if self._fd is not None:
            return self
        while True:
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
            try:
                fd = os.open(self.path, flags, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise RunLocked(f"{self.path} is a symbolic link; remove it") from None
                raise
            if not _try_lock(fd):
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise RunLocked(
                    f"{self.path.parent} is in use by {holder}; one process at a time writes "
                    f"a run (wait for it to end, or stop it, then {what} again)") from None
            # The holder before us may have removed the file between our open and our flock:
            # then we hold a lock on a file nobody else sees. Start again.
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:  # who holds it, for the refusal message; the lock itself needs no disk space
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} ({what})\n".encode())
        except OSError:
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if sys.platform == "win32":  # an open file cannot be removed there; a stale one is fine
            os.close(fd)
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
            return
        try:  # removed while still locked, so no other process can lock this file meanwhile
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:  # a Trainer dropped without finishing lets go of its folder
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # type: ignore[arg-type]
            self._fd = None
