"""Artefacts on disk survive a kill: `kdprompt export` and `kdprompt cache` SIGKILLed between their phases.

Each crash runs the real command in a subprocess with ``KDPROMPT_CRASH_AT`` set and checks it died by
SIGKILL; then the old bundle (or cache) must still be at its path, intact and loadable, or nothing at all
for a first export, and a rerun must give what an uninterrupted run gives. Also: a damaged input that a
later step would trip over (a garbage ``index.faiss``, an invalid ``teacher.json``) is one clear error
when it is opened.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kdprompt.deploy import export_bundle, load_bundle
from kdprompt.text_features import load_cache

pytestmark = [pytest.mark.faults, pytest.mark.slow]

EXPORT_POINTS = [
    "export.encoder_written",
    "export.cache_copied",
    "export.manifest_written",
    "atomic_path.swapped_aside",
]


def kdprompt_killed_at(point: str, *args: object) -> None:
    """Run ``python -m kdprompt ARGS`` with a crash point set; assert it died there by SIGKILL."""
    env = {**os.environ, "KDPROMPT_CRASH_AT": point, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kdprompt", *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]


def bundle_content(path: Path) -> dict:
    """What an export wrote, less its timestamp: the manifest (with every file's sha256), once verified."""
    load_bundle(path)  # checks every file against the manifest, which covers all the content
    manifest = json.loads((path / "manifest.json").read_text())
    return {k: v for k, v in manifest.items() if k not in ("created", "manifest_sha256")}


@pytest.fixture(scope="module")
def reference(student_run, tmp_path_factory) -> dict:
    """An uninterrupted export of the session's student run."""
    out = tmp_path_factory.mktemp("reference") / "bundle"
    export_bundle(student_run["student"], out)
    return bundle_content(out)


@pytest.mark.parametrize("point", EXPORT_POINTS)
def test_a_killed_export_overwrite_keeps_the_old_bundle(
    cli, student_run, bundle_dir, reference, tmp_path, point
):
    out = tmp_path / "out" / "bundle"
    shutil.copytree(bundle_dir, out)  # the old bundle: with ONNX, unlike the new export
    old = bundle_content(out)
    kdprompt_killed_at(point, "export", student_run["student"], out, "--overwrite")

    image = tmp_path / "image.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    predicted = cli("predict", out, image, "--json")
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.stdout)["image"] == str(image)
    assert bundle_content(out) == old and (out / "image_encoder.onnx").is_file()
    assert not (out.parent / ".bundle.old").exists()

    rerun = cli("export", student_run["student"], out, "--overwrite")
    assert rerun.exit_code == 0, rerun.output
    assert bundle_content(out) == reference
    # The killed export's hidden temporary (.bundle.*.tmp, up to a whole bundle) is gone; the lock stays.
    assert sorted(p.name for p in out.parent.iterdir()) == [".bundle.lock", "bundle"]


def test_a_killed_first_export_leaves_nothing_at_out(cli, student_run, reference, tmp_path):
    out = tmp_path / "bundle"
    kdprompt_killed_at("export.manifest_written", "export", student_run["student"], out)
    assert not out.exists()
    rerun = cli("export", student_run["student"], out)  # no --overwrite needed: nothing was there
    assert rerun.exit_code == 0, rerun.output
    assert bundle_content(out) == reference


def test_a_killed_cache_overwrite_keeps_the_old_cache(cli, student_run, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(student_run["cache"], cache)
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    classes = tmp_path / "classes.txt"
    classes.write_text("red circle\nteal hexagon\n")
    args = ("cache", student_run["teacher"], "--classes", classes, "--out", cache, "--overwrite")
    kdprompt_killed_at("atomic_path.swapped_aside", *args)
    assert not cache.exists()  # killed between the two renames: the old cache is aside, as .cache.old

    assert load_cache(cache).num_classes == 48  # loading puts it back
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before
    rerun = cli(*args)
    assert rerun.exit_code == 0, rerun.output
    assert load_cache(cache).classnames == ["red circle", "teal hexagon"]
    assert sorted(p.name for p in cache.parent.iterdir() if p.name.startswith(".cache")) == [".cache.lock"]


def distill_args(student_run, tmp_path: Path, teacher: Path, cache: Path) -> list[object]:
    return [
        "distill",
        "demo/distill-student",
        "name=d",
        f"output_dir={tmp_path / 'runs'}",
        f"teacher={teacher}",
        f"cache={cache}",
        f"student.model.pretrained={student_run['root'] / 'student.safetensors'}",
        f"data.root={student_run['world_root']}",
        f"shards_dir={tmp_path / 'shards'}",
        "evaluate=false",
    ]


def test_distill_refuses_a_garbage_index_when_it_opens_the_cache(cli, student_run, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(student_run["cache"], cache)
    (cache / "index.faiss").write_bytes(b"\0garbage" * 40)
    result = cli(*distill_args(student_run, tmp_path, student_run["teacher"], cache))
    assert result.exit_code == 2, result.output
    assert f"{cache / 'index.faiss'} is not a readable FAISS index" in result.output
    assert "kdprompt cache" in result.output


def test_distill_refuses_an_invalid_teacher_json(cli, student_run, tmp_path):
    teacher = tmp_path / "t" / "teacher"
    shutil.copytree(student_run["teacher"], teacher)
    (teacher / "teacher.json").write_text("{not json")
    result = cli(*distill_args(student_run, tmp_path, teacher, student_run["cache"]))
    assert result.exit_code == 2, result.output
    assert f"{teacher / 'teacher.json'} is not readable JSON" in result.output
