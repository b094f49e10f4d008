"""Writing files whole or not at all, never through a symbolic link.

A run folder may come from someone else (tar and zip keep symbolic links), so what it
holds must not steer a write or a copy outside it:

- a file is written to a temporary file that :func:`tempfile.mkstemp` creates in the same
  folder (``O_EXCL``, a unique name: never an existing file or link), then renamed over the
  target in one step, so a reader sees the old file or the new one, never half of one;
- a target, or a folder between the run folder and the target, that is a symbolic link is
  refused with :class:`UnsafePath`, naming the link;
- the finished file gets the permissions the umask gives (``mkstemp`` creates 0600);
- the bytes are produced in memory first and written with ``os.write``, so a full disk is an
  ``OSError`` we see (torch and safetensors would report it as their own errors) and is
  reported as :class:`DiskFull`: one line naming the file, the target left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class UnsafePath(ValueError):
    """A path inside a run folder is a symbolic link; bert_demo neither writes nor copies through it."""


class DiskFull(OSError):
    """A write failed for lack of space; the file it was writing is left as it was."""

    def __init__(self, path: Path) -> None:
        super().__init__(errno.ENOSPC, "no space left on device", str(path))
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: no space left on device"


def refuse_links(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """``path`` when neither it nor a folder between ``root`` (exclusive) and it is a symlink.

    Without ``root`` only ``path`` itself is checked. ``root`` itself may be a link (a run
    folder the user keeps elsewhere): it is the user's choice, not the folder's content.
    """
    path = Path(path)
    stop = Path(root) if root is not None else path.parent
    current = path
    while current != stop and current != current.parent:
        if current.is_symlink():
            raise UnsafePath(f"{current} is a symbolic link; bert_demo does not write, read or "
                             "copy a run's files through links (replace it with the file itself)")
        current = current.parent
    return path


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def write_chunk(fd: int, data: memoryview) -> int:
    """One ``os.write`` (a function of its own so that tests can fill the disk)."""
    return os.write(fd, data)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[write_chunk(fd, view):]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None
                 ) -> Iterator[Path]:
    """Yield a new, uniquely named temporary file beside ``path``; it replaces ``path`` at the end.

    For writers that need a file name (matplotlib, the csv module). If the block raises,
    the temporary file is removed and ``path`` is left as it was.
    """
    path = refuse_links(path, root)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        os.close(fd)
        fd = -1
        yield tmp
        refuse_links(path, root)  # nothing put a link there meanwhile
        os.replace(tmp, path)
    except BaseException as e:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        if _disk_full(e):
            raise DiskFull(path) from None
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes | memoryview,
                root: str | os.PathLike[str] | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    path = refuse_links(path, root)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            _write_all(fd, data)
            os.fchmod(fd, 0o666 & ~umask())
        finally:
            os.close(fd)
        refuse_links(path, root)
        os.replace(name, path)
    except BaseException as e:
        Path(name).unlink(missing_ok=True)
        if _disk_full(e):
            raise DiskFull(path) from None
        raise
    return path


def write_text(path: str | os.PathLike[str], text: str,
               root: str | os.PathLike[str] | None = None) -> Path:
    return write_bytes(path, text.encode("utf-8"), root)


def write_json(path: str | os.PathLike[str], value: Any,
               root: str | os.PathLike[str] | None = None) -> Path:
    return write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n", root)


def torch_bytes(obj: Any) -> memoryview:
    """``torch.save(obj)``'s bytes (written by :func:`write_bytes`, so a full disk is seen)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def save_torch(obj: Any, path: str | os.PathLike[str],
               root: str | os.PathLike[str] | None = None) -> Path:
    return write_bytes(path, torch_bytes(obj), root)


def append_line(path: str | os.PathLike[str], line: str,
                root: str | os.PathLike[str] | None = None) -> None:
    """Append one line; a failed append (a full disk) leaves the file as it was."""
    path = refuse_links(path, root)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePath(f"{path} is a symbolic link; bert_demo does not write through "
                             "links") from None
        raise
    try:
        size = os.fstat(fd).st_size
        try:
            _write_all(fd, line.encode("utf-8"))
        except BaseException as e:
            os.ftruncate(fd, size)  # no half line
            if _disk_full(e):
                raise DiskFull(path) from None
            raise
    finally:
        os.close(fd)


def read_bytes(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> bytes:
    """A file's bytes, refusing a symbolic link (so no link can pull another file in)."""
    path = refuse_links(path, root)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePath(f"{path} is a symbolic link; bert_demo does not copy through "
                             "links") from None
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read()
