"""Atomic writes leave files and folders with the modes a plain write would give (umask respected)."""

from __future__ import annotations

import os
import stat

import torch
from safetensors.torch import save_file

from kdprompt.io import atomic_path, atomic_write


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_respect_the_umask_not_the_writers_private_modes(tmp_path):
    old = os.umask(0o022)
    try:
        # safetensors writes its file 0600 on its own: a bundle would be unreadable by another user.
        weights = atomic_write(tmp_path / "w.safetensors", lambda p: save_file({"a": torch.zeros(2)}, str(p)))
        with atomic_path(tmp_path / "bundle") as folder:
            folder.mkdir()
            save_file({"b": torch.ones(1)}, str(folder / "encoder.safetensors"))
            (folder / "sub").mkdir(mode=0o700)
        assert _mode(weights) == 0o644
        assert _mode(tmp_path / "bundle") == 0o755
        assert _mode(tmp_path / "bundle" / "encoder.safetensors") == 0o644
        assert _mode(tmp_path / "bundle" / "sub") == 0o755
        os.umask(0o077)
        private = atomic_write(tmp_path / "p.safetensors", lambda p: save_file({"a": torch.zeros(2)}, str(p)))
        assert _mode(private) == 0o600
    finally:
        os.umask(old)


def test_a_crash_between_the_two_renames_of_a_folder_swap_is_repaired(tmp_path):
    """The old folder sits aside as .NAME.old with nothing at NAME: the next writer or loader restores it."""
    from kdprompt.io import recover_swap

    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "a.txt").write_text("old")
    os.replace(folder, tmp_path / ".bundle.old")  # what a kill after the first rename leaves
    recover_swap(folder)
    assert (folder / "a.txt").read_text() == "old"
    assert not (tmp_path / ".bundle.old").exists()

    (tmp_path / ".bundle.old").mkdir()  # a completed swap whose cleanup was cut short
    with atomic_path(folder) as new:
        new.mkdir()
        (new / "a.txt").write_text("new")
    assert (folder / "a.txt").read_text() == "new"
    assert not (tmp_path / ".bundle.old").exists()
