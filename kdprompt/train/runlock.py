"""One run at a time per run directory: an ``flock`` on ``run_dir/run.lock``, held for the life of the run.

The kernel drops an ``flock`` when its holder's last descriptor closes, so a killed run never leaves a
stale lock: the file may stay, only the lock matters. Its text names the holder (PID and host) for the
error a second run prints. The file is never removed: unlinking a lock file lets two runs lock two
different inodes of the same name.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from kdprompt.errors import KdpromptError

LOCK_NAME = "run.lock"


class RunLock:
    """A held run lock; :meth:`release` (or the process ending) frees it."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        """Free the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _holder(fd: int) -> str:
    try:
        found = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {found['pid']} on host {found['host']}, started {found['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it is just starting"


def acquire_run_lock(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` for this process (creating the directory) without waiting.

    Raises:
        KdpromptError: another live run holds the lock; the message names its PID and host.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            # A filesystem without flock (some network mounts): run unguarded rather than not at all.
            os.close(fd)
            print(
                f"warning: cannot lock {path} ({err.strerror}); do not start two runs named alike",
                file=sys.stderr,
            )
            return RunLock(path, None)
        holder = _holder(fd)
        os.close(fd)
        raise KdpromptError(
            f"run directory {run_dir} is in use by another run ({holder}; lock {path}): wait for it to "
            "finish, or pick another name=..."
        ) from None
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
    return RunLock(path, fd)
