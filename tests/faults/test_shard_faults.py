"""Shard writing killed (SIGKILL) at each of its phases: the next start ends with what an uninterrupted
write gives, byte for byte, and no temporary is left behind.

Two real writers, each in a subprocess with ``KDPROMPT_CRASH_AT`` set: the materialisation of a
recipe's training shards (:func:`kdprompt.data.materialize.shards_for`, what ``pretrain`` and
``distill`` run first) and ``kdprompt shards``. The rerun happens in this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kdprompt.data.materialize import shards_for
from kdprompt.data.synthetic import SyntheticData, materialize
from kdprompt.faults import CRASH_ENV

pytestmark = pytest.mark.faults

# 48 captioned images in 3 shards of 16: a few seconds per write.
WORLD = {
    "domain": "pretrain",
    "image_size": 32,
    "train_per_class": 1,
    "val_per_class": 1,
    "test_per_class": 1,
}
MATERIALISE = (
    "import sys\n"
    "from kdprompt.data.materialize import shards_for\n"
    "from kdprompt.data.synthetic import SyntheticData\n"
    f"shards_for(SyntheticData(root=sys.argv[1], **{WORLD}), 'train', sys.argv[2], maxcount=16)\n"
)


def world(root: str) -> SyntheticData:
    return SyntheticData(root=root, **WORLD)


def killed(args: list[str], crash: str) -> None:
    """Run ``python ARGS`` with the crash point set; it must die by SIGKILL there."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", CRASH_ENV: crash}
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (crash, proc.returncode, proc.stderr[-2000:])


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, lock files left out (they are never removed)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".old"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, world_root) -> dict[str, bytes]:
    """The shards folder of one uninterrupted materialisation (the world is built here, once)."""
    materialize(world(world_root))
    shards_dir = tmp_path_factory.mktemp("reference")
    shards_for(world(world_root), "train", shards_dir, maxcount=16)
    return files_of(shards_dir)


@pytest.mark.parametrize(
    "crash",
    [
        "shards.tar_written@2",
        "shards.tars_written",
        "shards.committed",
        "shards.moved",
        "shards.folder_written",
    ],
)
def test_materialisation_killed_then_rerun_equals_uninterrupted(tmp_path, world_root, reference, crash):
    killed(["-c", MATERIALISE, world_root, str(tmp_path)], crash)
    # nothing looks complete
    assert [p for p in tmp_path.iterdir() if (p / "sizes.json").exists() and not p.name.startswith(".")] == []
    shards_for(world(world_root), "train", tmp_path, maxcount=16)
    assert files_of(tmp_path) == reference
    assert leftovers(tmp_path) == []


def test_rebuild_of_an_old_incomplete_folder_killed_mid_swap(tmp_path, world_root, reference):
    # What an older version left when killed before sizes.json: shards in place, no sizes.json.
    for name, data in reference.items():
        if not name.endswith("sizes.json"):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(data)
    killed(["-c", MATERIALISE, world_root, str(tmp_path)], "atomic_path.swapped_aside")
    shards_for(world(world_root), "train", tmp_path, maxcount=16)
    assert files_of(tmp_path) == reference
    assert leftovers(tmp_path) == []


def shards_cli(world_root: str, out: Path) -> list[str]:
    return [
        "-m",
        "kdprompt",
        "shards",
        "synthetic",
        str(out),
        f"root={world_root}",
        *(f"{k}={v}" for k, v in WORLD.items()),
        "--maxcount",
        "16",
    ]


@pytest.mark.parametrize(
    ("crash", "rerun_refused"),
    [
        ("shards.tar_written@2", False),  # before the commit: the killed write is discarded
        ("shards.tars_written", False),
        ("shards.committed", True),  # after it: the next start finishes it, then will not overwrite
        ("shards.moved", True),
    ],
)
def test_shards_command_killed_then_rerun_equals_uninterrupted(
    tmp_path, world_root, cli, crash, rerun_refused
):
    materialize(world(world_root))
    expected = tmp_path / "expected"
    assert cli(*shards_cli(world_root, expected)[2:]).exit_code == 0
    out = tmp_path / "out"
    killed(shards_cli(world_root, out), crash)
    result = cli(*shards_cli(world_root, out)[2:])
    if rerun_refused:
        assert result.exit_code == 2 and "finished an interrupted earlier write" in result.output
        assert "--overwrite" in result.output and "Traceback" not in result.output
    else:
        assert result.exit_code == 0, result.output
    assert files_of(out) == files_of(expected)
    assert leftovers(tmp_path) == []
