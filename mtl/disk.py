"""Disk errors a user can meet: a full disk, a read-only folder, checked before writing and named after.

Before a run writes anything, :func:`check_writable` refuses a folder that
cannot be written (a read-only filesystem, no write permission) or whose disk
lacks room for the checkpoints the run keeps. While it runs, the disk can still
fill up: :func:`disk_error` finds such an error in what the writer raised,
whether an ``OSError`` or tensorstore's ``RESOURCE_EXHAUSTED`` text with its
``os_error_code``, so the command line turns it into one line, and
:class:`QuietDiskErrors` keeps Orbax's background threads from logging the same
error as pages of tracebacks.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import re
import sys

from mtl.config import UsageError

# The errors that mean "this folder cannot take more bytes", not a bug.
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}
_CODE = re.compile(r"os_error_code='?(\d+)")


def disk_error(error: BaseException) -> str | None:
    """The reason (``No space left on device``) if ``error`` or its causes are a disk error, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
            return os.strerror(error.errno)
        if (match := _CODE.search(str(error))) and int(match.group(1)) in DISK_ERRNOS:
            return os.strerror(int(match.group(1)))
        error = error.__cause__ or error.__context__
    return None


def check_writable(folder: str | os.PathLike, need_bytes: int = 0, what: str = "--out") -> None:
    """Raises UsageError if ``folder`` (or the nearest folder above it that exists) cannot take ``need_bytes``.

    Nothing is written: the filesystem's read-only flag, the write permission
    and the free space come from ``statvfs`` and ``access``.
    """
    path = pathlib.Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    stat = os.statvfs(existing)
    if stat.f_flag & os.ST_RDONLY:
        raise UsageError(f"{what} {str(folder)!r} is on a read-only filesystem; choose a folder that can be written")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {str(folder)!r} cannot be written: {existing} denies this user write permission")
    free = stat.f_bavail * stat.f_frsize
    if free < need_bytes:
        raise UsageError(
            f"{what} {str(folder)!r} has {_size(free)} free, less than the {_size(need_bytes)} its checkpoints "
            "need (the newest and the best, model and optimizer state); free space or choose another folder"
        )


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


class QuietDiskErrors(logging.Filter):
    """Drops log records that report a disk error (Orbax logs each failed write with a traceback, per thread)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and disk_error(record.exc_info[1]):
            return False
        return disk_error(RuntimeError(record.getMessage())) is None


def quiet_abandoned_writes() -> None:
    """Drops the tracebacks of writes abandoned after an error (a full disk) from ``sys.unraisablehook``.

    When one write of a save fails, Orbax closes the event loop of that save,
    and each of tensorstore's writes still in flight prints "RuntimeError:
    Event loop is closed" as it finishes. The error itself is reported once.
    """
    previous = sys.unraisablehook  # tensorstore reports a callback's error as unraisable

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook
