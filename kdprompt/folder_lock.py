"""One writer at a time per folder, and the clean-up of temporaries that killed writers left.

A writer holds :func:`folder_lock` on its target while it writes. Whoever holds that lock therefore
knows that no live process is writing the target, so every temporary of it on disk belongs to a
writer that died (SIGKILL, power cut) and can go: :func:`remove_stale_temporaries`. A lock proves
this where an age rule cannot: a temporary older than this process may belong to a slow writer that
started first. The kernel drops an ``flock`` when its holder dies, so a killed writer never leaves a
stale lock; the lock file itself stays (removing it would let two writers lock two inodes of one name).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

# kdprompt.io.atomic_path names its temporary ``.<name>.<8 random chars>.tmp`` (tempfile.mkdtemp).
_RANDOM = r"[a-z0-9_]{8}"


def temporary_pattern(name: str) -> re.Pattern[str]:
    """The names :func:`kdprompt.io.atomic_path` (and ``tempfile.mkdtemp(prefix=f".{name}.")``) give
    the temporaries of ``name``."""
    return re.compile(rf"\.{re.escape(name)}\.{_RANDOM}\.tmp")


def lock_path(target: Path) -> Path:
    """The lock file of ``target``: ``.<name>.lock`` beside it (the target itself may be swapped).

    The path is resolved first, so writers that name one folder differently share one lock.
    """
    target = Path(target).resolve()
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def folder_lock(target: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold the exclusive lock of ``target`` (waiting for it unless ``blocking`` is False).

    Yields:
        True when the lock is held; False only with ``blocking=False`` when another process holds it.
        Where ``flock`` is missing (Windows) or the lock file cannot be created (a read-only parent)
        it yields ``blocking`` unguarded: a writer goes on (atomic renames still keep the target
        consistent, only concurrent writers are not serialised); a probe learns nothing is proven.
    """
    try:
        import fcntl
    except ImportError:
        yield blocking
        return
    path = lock_path(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a")  # noqa: SIM115 (closed below)
    except OSError as exc:
        logger.warning("cannot lock %s (%s): writing without a lock", target, exc.strerror)
        yield blocking
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the :func:`kdprompt.io.atomic_path` temporaries of ``target``; hold its lock first.

    Returns:
        The temporaries removed.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = temporary_pattern(target.name)
    stale = [p for p in target.parent.iterdir() if pattern.fullmatch(p.name)]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


__all__ = ["folder_lock", "lock_path", "remove_stale_temporaries", "temporary_pattern"]
