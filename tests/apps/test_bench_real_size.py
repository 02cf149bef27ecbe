"""`kdprompt bench distill --real-size` through the same code path with tiny models (the real sizes are
for a GPU, or for patience: a ViT-L-14 step on a small CPU takes tens of seconds)."""

from __future__ import annotations

import json

import pytest

RECIPE = "base2novel/oxford_pets/distill-vit-b-16"
TINY = [
    RECIPE,
    "student.model.name=kd-tiny-student",
    "student.depth=2",
    "--real-size",
    "--teacher-set",
    "model.name=kd-tiny-teacher",
    "--teacher-set",
    "method.vision_depth=2",
    "--teacher-set",
    "method.text_depth=2",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--classes",
    "5",
    "--decode-images",
    "8",
    "--device",
    "cpu",
]


def test_real_size_table_and_json(cli, tmp_path):
    out = tmp_path / "bench.json"
    result = cli("bench", "distill", *TINY, "--batch-sizes", "2,3", "--json", out)
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    rows = figures["rows"]
    keys = {(r["batch_size"], r["student"], r["mode"]) for r in rows}
    assert keys == {
        (b, s, m) for b in (2, 3) for s in ("prompts", "full") for m in ("promptkd", "online", "cached")
    }
    assert "| batch | student | mode | images/s |" in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("| 3 | full |")]) == 3
    for r in rows:
        ms = r["phase_ms"]
        assert r["images_per_s"] > 0 and ms["student"] > 0 and ms["optimiser"] > 0
        # Only PromptKD's loop re-encodes the class texts; only the cached loop skips the teacher's tower.
        assert (ms["text"] > 0) == (r["mode"] == "promptkd")
        assert 0 < 1000 * r["batch_size"] / r["images_per_s"] == pytest.approx(r["step_ms"])
        assert r["student_fraction_of_matmul_peak"] > 0
    flops = {(r["student"], r["batch_size"]): r["student_flops_per_step"] for r in rows}
    # Full adaptation also computes every tower weight's gradient; FLOPs grow with the batch.
    assert flops["full", 2] > flops["prompts", 2] > 0 and flops["prompts", 3] > flops["prompts", 2]
    assert figures["matmul_flops_per_s"]["fp32"] > 0 and figures["decode"]["images_per_s"] > 0
    assert figures["throughput_settings"] == {"allow_tf32": False, "channels_last": False, "compile": False}


def test_teacher_read_from_store_not_computed(cli, tmp_path, monkeypatch):
    from kdprompt.apps import bench_real_size

    calls = {"encode": 0}
    encode = bench_real_size.StepContext.encode_images

    def counting(self, images):
        calls["encode"] += 1
        return encode(self, images)

    monkeypatch.setattr(bench_real_size.StepContext, "encode_images", counting)
    out = tmp_path / "bench.json"
    result = cli(
        "bench",
        "distill",
        *TINY,
        "--batch-sizes",
        "2",
        "--students",
        "prompts",
        "--modes",
        "cached",
        "--json",
        out,
    )
    assert result.exit_code == 0, result.output
    # The store is filled once per distinct batch (3: warm-up + timed steps); the 3 steps read it.
    assert calls["encode"] == 3
    assert json.loads(out.read_text())["rows"][0]["phase_ms"]["text"] == 0


def test_unknown_mode_is_one_clear_error(cli):
    result = cli("bench", "distill", *TINY, "--modes", "online,offline")
    assert result.exit_code == 2
    assert "offline" in result.output and "promptkd, online, cached" in result.output
    assert "Traceback" not in result.output
