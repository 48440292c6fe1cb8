"""One writer per output: a run that writes an artifact or export (and its `.partial` work folder) holds an
exclusive lock on `.<name>.lock` beside it for the whole run. A second run aimed at the same --out is refused at once
instead of interleaving its writes. The lock is the kernel's (flock), so a killed run never leaves it held: the
next run takes it, whatever file the killed one left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator


class OutputInUse(ValueError):
    """Another process is writing the same output."""


def lock_path(out: Path) -> Path:
    """The lock file of an output: hidden, beside it (so a whole-directory replace never touches it)."""
    return out.parent / f".{out.name}.lock"


def _holder(path: Path) -> str:
    """'pid N, since HH:MM:SS' as the holder wrote it, or '' when it cannot be read."""
    try:
        pid, started = path.read_text().split()[:2]
        return f" (pid {int(pid)}, since {time.strftime('%H:%M:%S', time.localtime(float(started)))})"
    except (OSError, ValueError):
        return ""


@contextlib.contextmanager
def out_lock(out: str | Path) -> Iterator[None]:
    """Hold the output's lock while the block runs, or raise OutputInUse naming the holder and the fix."""
    out = Path(out).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputInUse(f"{out} is being written by another baseq-export run{_holder(path)}: wait for it to "
                              "finish, or choose another --out") from None
        try:  # the file we locked must still be the one at path (a finishing holder unlinks it): else retry
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {time.time():.0f}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held: a waiting run re-checks the inode and retries
        os.close(fd)
