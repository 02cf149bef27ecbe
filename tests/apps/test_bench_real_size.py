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


def test_cached_loop_reads_a_real_cache_never_running_the_teacher(cli, tmp_path, monkeypatch):
    from kdprompt.apps import bench_real_size
    from kdprompt.models.teacher import PromptedClip
    from kdprompt.models.towers import PromptedVisionTower
    from kdprompt.teacher_outputs.reader import TeacherOutputs
    from kdprompt.teacher_outputs.replay import ReplayTransform

    calls = {"tower": 0, "rows": 0, "replays": 0}
    during_steps: list[dict[str, int]] = []
    teacher_towers: list[PromptedVisionTower] = []  # the prompted student has one too: not counted

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            if name != "tower" or any(self is t for t in teacher_towers):
                calls[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    init = PromptedClip.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        teacher_towers.append(self.vision_tower)

    monkeypatch.setattr(PromptedClip, "__init__", recording)
    monkeypatch.setattr(PromptedVisionTower, "forward", counting("tower", PromptedVisionTower.forward))
    monkeypatch.setattr(TeacherOutputs, "features", counting("rows", TeacherOutputs.features))
    monkeypatch.setattr(ReplayTransform, "__call__", counting("replays", ReplayTransform.__call__))
    time_mode = bench_real_size.time_mode

    def timed(step, ctx, *args, **kwargs):
        before = dict(calls)
        out = time_mode(step, ctx, *args, **kwargs)
        during_steps.append({k: calls[k] - before[k] for k in calls})
        return out

    monkeypatch.setattr(bench_real_size, "time_mode", timed)
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
    # The precompute ran the teacher's image tower over the stored views (2 images x 4 views, the default
    # V: one forward of 8 after a warm-up forward); the 3 cached steps (1 warm-up + 2 timed) never did: each
    # replayed its 2 stored views and read their 2 rows from the parts through the reader.
    assert calls["tower"] == 2
    assert during_steps == [{"tower": 0, "rows": 3, "replays": 6}]
    figures = json.loads(out.read_text())
    pre = figures["precompute"]
    assert (pre["images"], pre["views"]) == (2, 4) and pre["bytes"] > 0
    # The rate is the part's (what grows with the images); the one-off setup is reported beside it.
    assert pre["image_views_per_s"] == pytest.approx(8 / pre["part_seconds"])
    assert 0 < pre["part_seconds"] <= pre["seconds"]
    assert pre["setup_seconds"] == pytest.approx(pre["seconds"] - pre["part_seconds"])
    row = figures["rows"][0]
    assert row["phase_ms"]["teacher"] == row["phase_ms"]["text"] == 0
    details = row["detail_ms"]
    assert details["replay"] > 0 and details["rows"] > 0
    assert details["replay"] + details["rows"] <= row["phase_ms"]["data"]
    assert "| 2 | prompts | cached |" in result.output and "(replay " in result.output
    assert figures["recipe_cost"] == []  # no online row to compare with


def test_whole_recipe_cost_is_the_formula_over_the_measured_figures(cli, tmp_path):
    out = tmp_path / "bench.json"
    result = cli(
        "bench",
        "distill",
        *TINY,
        # V comes from the recipe's teacher_outputs section (the bench writes its cache elsewhere).
        f"teacher_outputs.path={tmp_path / 'unused'}",
        "teacher_outputs.views=3",
        "--batch-sizes",
        "2",
        "--students",
        "prompts",
        "--modes",
        "online,cached",
        "--json",
        out,
    )
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "unused").exists()
    figures = json.loads(out.read_text())
    rate = {r["mode"]: r["images_per_s"] for r in figures["rows"]}
    pre = figures["precompute"]
    assert pre["views"] == 3
    (cost,) = figures["recipe_cost"]
    online = 20 / rate["online"]  # the recipe's train.epochs = 20
    cached = 3 / pre["image_views_per_s"] + 20 / rate["cached"]
    assert cost["epochs"] == 20 and cost["views"] == 3
    assert cost["online_s_per_image"] == pytest.approx(online)
    assert cost["cached_s_per_image"] == pytest.approx(cached)
    assert cost["recipe_speedup"] == pytest.approx(online / cached)
    assert cost["epoch_speedup"] == pytest.approx(rate["cached"] / rate["online"])
    assert "whole recipe, prompts student, batch 2 (20 epochs over E images, V = 3 views):" in result.output
    assert f"online = 20·E/online = 20·E/{rate['online']:.4g} = {online:.4g}·E s" in result.output
    assert (
        f"cached = V·E/precompute + 20·E/cached = 3·E/{pre['image_views_per_s']:.4g} + "
        f"20·E/{rate['cached']:.4g} = " in result.output
    )
    assert f"= {cached:.4g}·E s" in result.output
    assert f"per epoch cached/online images/s = {rate['cached'] / rate['online']:.3g}x" in result.output


def test_unknown_mode_is_one_clear_error(cli):
    result = cli("bench", "distill", *TINY, "--modes", "online,offline")
    assert result.exit_code == 2
    assert "offline" in result.output and "promptkd, online, cached" in result.output
    assert "Traceback" not in result.output
