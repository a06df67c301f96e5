"""One writer at a time: an exclusive lock file that names the process holding it.

The lock is `fcntl.flock` on the file, which the kernel drops when its holder exits or is killed, so a
lock left behind by a dead run is stale by construction and the next writer simply takes it. The file
itself stays (deleting a locked file races with the next writer opening it); it holds the pid of the
current holder so that a second writer can say who is in the way.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

POLL_SECONDS = 0.1


class LockBusyError(RuntimeError):
    """Another live process holds the lock; the message names the lock file and its pid."""


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return f"process {text}" if text.isdigit() else "another process"


@contextmanager
def exclusive_lock(path: Path, wait: float = 0.0, what: str = "this") -> Iterator[None]:
    """Hold `path` locked for the block; wait up to `wait` seconds for a live holder, then stop."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusyError(
                        f"{path}: {_holder(fd)} is already updating {what}; wait for it to finish "
                        "(or pass a longer --wait) and run again"
                    ) from None
                time.sleep(POLL_SECONDS)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
