"""`kdprompt demo --quick` end to end, and reuse of the pre-trained tiny CLIPs on a second run."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_quick_demo_runs_and_reuses_pretrained_models(cli, tmp_path):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    first = cli("demo", "--quick", "--out", out, "--cache-dir", cache)
    assert first.exit_code == 0, first.output
    summary = json.loads((out / "demo-quick" / "summary.json").read_text())
    rows = summary["pretrain"]
    assert [r["model"].split(" (")[0] for r in rows] == ["zero-shot teacher", "zero-shot student"]
    for row in rows:
        assert 0 <= row["pretrain domain"] <= 100 and 0 <= row["downstream"] <= 100
    b2n = summary["base_to_novel"]
    assert [r["model"].split(" (")[0] for r in b2n] == [
        "zero-shot teacher",
        "promptsrc teacher",
        "maple teacher",
    ]
    assert all(0 <= r["hm"] <= 100 for r in b2n)
    final = summary["final"]
    assert [r["model"] for r in final] == [
        "zero-shot teacher",
        "promptsrc teacher",
        "zero-shot student",
        "distilled student",
        "student bundle",
    ]
    assert all(r["images_per_s"] > 0 and r["image_tower_params"] > 0 for r in final)
    assert final[3]["image_tower_params"] * 3 <= final[1]["image_tower_params"]
    # The shipped bundle classifies exactly as the student it was exported from.
    assert {k: final[4][k] for k in ("base", "novel", "hm")} == {
        k: final[3][k] for k in ("base", "novel", "hm")
    }
    assert (out / "demo-quick" / "bundle" / "manifest.json").is_file()
    assert (out / "demo-quick" / "summary.png").stat().st_size > 1000
    assert (cache / "pretrained" / "kd-tiny-teacher-synthetic-quick.safetensors").is_file()
    assert "| model |" in (out / "demo-quick" / "summary.md").read_text()
    assert (cache / "demo-quick-teacher-promptsrc" / "manifest.json").is_file()

    second = cli("demo", "--quick", "--out", out, "--cache-dir", cache)
    assert second.exit_code == 0, second.output
    assert second.output.count("reusing") == 2
    assert json.loads((out / "demo-quick" / "summary.json").read_text())["pretrain"] == rows
