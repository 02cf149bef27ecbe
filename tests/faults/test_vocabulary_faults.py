"""`kdprompt export --index ivf` SIGKILLed while it rebuilds the shipped cache's index: the old bundle survives."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_artefact_faults import bundle_content, kdprompt_killed_at

from kdprompt.text_features import build_cache, load_cache

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.mark.parametrize("point", ["cache.written", "export.cache_copied"])
def test_a_killed_reindexing_export_keeps_the_old_bundle_and_a_rerun_is_whole(
    cli, student_run, bundle_dir, tmp_path, point
):
    own = load_cache(student_run["cache"])
    cache = tmp_path / "cache"
    build_cache(
        torch.randn(3000, own.embed_dim, generator=torch.Generator().manual_seed(0)),
        [f"class {i:04d}" for i in range(3000)],
        cache,
        teacher_fingerprint=own.teacher_fingerprint,
        logit_scale=own.logit_scale,
    )  # flat: the export rebuilds it as IVF (the cache.written pass inside the bundle's temporary)
    args = ("export", student_run["student"], "--cache", cache, "--index", "ivf")
    reference = tmp_path / "reference"
    assert cli(*args[:2], reference, *args[2:]).exit_code == 0
    out = tmp_path / "out" / "bundle"
    shutil.copytree(bundle_dir, out)
    old = bundle_content(out)

    kdprompt_killed_at(point, *args[:2], out, *args[2:], "--overwrite")
    assert bundle_content(out) == old
    assert load_cache(cache).manifest["index"] == {"kind": "flat"}  # the source cache is never touched

    rerun = cli(*args[:2], out, *args[2:], "--overwrite")
    assert rerun.exit_code == 0, rerun.output
    assert bundle_content(out) == bundle_content(reference)
    assert bundle_content(out)["cache"]["index"]["kind"] == "ivf"
