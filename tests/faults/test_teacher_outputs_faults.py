"""kill -9 between the parts of `kdprompt teacher-outputs`: the rerun resumes and ends with identical files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_WORLD, train_tiny_teacher

from kdprompt.faults import CRASH_ENV

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, world_root, tiny_teacher_weights):
    return train_tiny_teacher(tmp_path_factory.mktemp("outputs-faults"), world_root, tiny_teacher_weights)


def precompute(trained, shards: Path, out: Path, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    args = [
        "teacher-outputs",
        "demo/distill-student",
        f"teacher={trained['teacher']}",
        f"cache={trained['cache']}",
        f"student.model.pretrained={trained['student']}",
        f"data.root={trained['world_root']}",
        *[f"data.{kv}" for kv in TINY_WORLD],
        f"shards_dir={shards}",
        "shard_maxcount=16",
        f"teacher_outputs.path={out}",
        "teacher_outputs.views=2",
    ]
    return subprocess.run(
        [sys.executable, "-m", "kdprompt", *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_kill_between_parts_then_rerun_resumes_with_identical_files(trained, tmp_path):
    shards = tmp_path / "shards"
    full = precompute(trained, shards, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "resumed"
    crashed = precompute(trained, shards, out, crash_at="teacher_outputs.part_written@3")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    written = sorted((out / "parts").glob("*.safetensors"))
    assert len(written) == 3  # atomic parts: no temporaries under final names
    assert '"complete": false' in (out / "manifest.json").read_text()
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in written}

    resumed = precompute(trained, shards, out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # The finished parts were kept, not redone ...
    assert {
        p: ((out / "parts" / p).stat().st_ino, (out / "parts" / p).stat().st_mtime_ns) for p in stamps
    } == stamps
    # ... and the result is the uninterrupted run's, byte for byte.
    names = sorted(p.name for p in (tmp_path / "full" / "parts").iterdir())
    assert names == sorted(p.name for p in (out / "parts").iterdir()) and len(names) > 3
    for name in names:
        assert (out / "parts" / name).read_bytes() == (tmp_path / "full" / "parts" / name).read_bytes(), name
    assert (out / "manifest.json").read_text() == (tmp_path / "full" / "manifest.json").read_text()
