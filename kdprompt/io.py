"""Atomic file writes: a crash never leaves a half-written file under its final name."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdprompt.faults import crash_point
from kdprompt.folder_lock import folder_lock, remove_stale_temporaries


@contextmanager
def atomic_path(path: str | os.PathLike, *, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    Works for files and directories. On an exception the temporary is removed and ``path`` is untouched.
    The new content is fsynced before the rename and the parent directory after it, so a power cut never
    leaves a torn file under the final name. Replacing a directory takes two renames (the old one moves to
    ``.NAME.old`` first); a crash between them is repaired by :func:`recover_swap`, which every later
    ``atomic_path`` on the same path (and any loader) runs first.

    With ``exclusive`` (whole artefacts: bundles, caches) the write holds the target's
    :func:`~kdprompt.folder_lock.folder_lock`, so two writers of one folder take turns, and the
    temporaries that killed writers left beside it are removed first (none can be a live writer's).
    """
    if exclusive:
        with folder_lock(path):
            remove_stale_temporaries(Path(path))
            with atomic_path(path) as target:
                yield target
        return
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_swap(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        _default_modes(target)
        _fsync_tree(target)
        if final.is_dir() and not final.is_symlink():
            # os.replace cannot replace a non-empty directory: move the old one aside first.
            old = _swap_aside(final)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            crash_point("atomic_path.swapped_aside")
            os.replace(target, final)
            _fsync_dir(final.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, final)
            _fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def recover_swap(path: str | os.PathLike) -> None:
    """Finish a directory replacement that a crash interrupted between its two renames.

    If ``path`` is missing but its ``.NAME.old`` survives, the old content is put back (the new one was
    never in place); if both exist, the swap had completed and the leftover is removed. Read-only
    locations are left as they are.
    """
    final = Path(path)
    old = _swap_aside(final)
    if not old.is_dir():
        return
    try:
        if final.exists() or final.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
    except OSError:
        pass


def _fsync_tree(target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        for sub in sorted(target.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if sub.is_symlink():
                continue
            (_fsync_dir if sub.is_dir() else _fsync_file)(sub)
        _fsync_dir(target)
    elif target.exists():
        _fsync_file(target)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # platforms without directory handles
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_modes(target: Path) -> None:
    """Give ``target`` (and, for a directory, everything in it) the modes a plain ``open``/``mkdir`` would.

    Some writers (safetensors, for one) create 0600 files: a bundle exported by one user would then be
    unreadable by the serving image's user. Links are left alone.
    """
    mask = _current_umask()
    paths = [target, *target.rglob("*")] if target.is_dir() else [target]
    for path in paths:
        if path.is_symlink() or not path.exists():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
