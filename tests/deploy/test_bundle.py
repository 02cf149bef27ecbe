"""Ship the student: export a bundle, load it offline without a teacher or text tower, predict, eval, ONNX."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kdprompt
from kdprompt.data.sources import load_split
from kdprompt.deploy import export_bundle, load_bundle
from kdprompt.deploy.encoder import (
    ImageEncoder,
    build_projector,
    build_visual,
    fold_projector,
    open_clip_config,
)
from kdprompt.deploy.export import manifest_digest, seal_manifest
from kdprompt.errors import KdpromptError
from kdprompt.evaluate import evaluate_base_novel
from kdprompt.models import ModelSpec, create_clip
from kdprompt.models.student import MLPProjector, Student, StudentClassifier, StudentConfig, load_student

pytestmark = pytest.mark.slow


def _test_split(student_run):
    from kdprompt.models.teacher import load_teacher

    return load_split(load_teacher(student_run["teacher"]).data_config, "test")


def test_bundle_files_and_manifest(bundle_dir, student_run):
    files = sorted(str(p.relative_to(bundle_dir)) for p in bundle_dir.rglob("*") if p.is_file())
    assert files == [
        "cache/index.faiss",
        "cache/manifest.json",
        "cache/text_features.safetensors",
        "encoder.safetensors",
        "image_encoder.onnx",
        "manifest.json",
        "open_clip_config.json",
        "preprocess.json",
    ]
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["format"] == "kdprompt-student-bundle" and manifest["format_version"] == 1
    assert manifest["kdprompt_version"] == kdprompt.__version__
    params = manifest["parameters"]
    assert params["total"] == params["image_tower"] + params["prompts"] + params["projector"]
    assert params["prompts"] > 0  # the fixture's student is prompted: prompts are folded in
    assert 0 < params["image_tower"] < params["teacher_image_tower"]
    assert manifest["model"]["projector"] == [
        {"type": "linear", "in": 64, "out": 128},
        {"type": "relu"},
        {"type": "linear", "in": 128, "out": 128},
    ]
    assert manifest["preprocess"]["size"] == [32, 32] and manifest["preprocess"]["interpolation"] == "bicubic"
    student_meta = json.loads((student_run["student"] / "student.json").read_text())
    assert manifest["teacher"]["fingerprint"] == student_meta["teacher"]["fingerprint"]
    assert manifest["cache"]["teacher_fingerprint"] == student_meta["cache"]["teacher_fingerprint"]
    assert manifest["onnx"]["max_abs_diff"] <= 1e-4
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    assert json.loads((bundle_dir / "open_clip_config.json").read_text())["vision_cfg"]["width"] == 64


def test_bundle_loads_without_teacher_text_tower_network_or_pickle(bundle_dir, tmp_path, monkeypatch):
    import open_clip

    moved = tmp_path / "elsewhere"
    shutil.copytree(bundle_dir, moved)

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"loading a bundle called {what}")

        return fail

    monkeypatch.setattr(torch, "load", forbidden("torch.load (pickle)"))
    monkeypatch.setattr(open_clip.model.CLIP, "__init__", forbidden("CLIP (a text tower)"))
    monkeypatch.setattr(open_clip.transformer.TextTransformer, "__init__", forbidden("a text tower"))
    monkeypatch.setattr(open_clip, "create_model_and_transforms", forbidden("open_clip.create_model"))
    monkeypatch.setattr("kdprompt.models.teacher.load_teacher", forbidden("the teacher"))
    monkeypatch.setattr("socket.socket.connect", forbidden("the network"))
    bundle = kdprompt.load_bundle(moved)
    assert len(bundle.classnames) == 48
    assert bundle.predict(torch.zeros(3, 32, 32), k=3)[0].labels


def test_bundle_agrees_with_the_student_run(bundle_dir, student_run):
    split = _test_split(student_run)
    student, cache = load_student(student_run["student"])
    classifier = StudentClassifier(student, cache)
    bundle = load_bundle(bundle_dir)
    paths = [s.image for s in split.samples]
    with torch.no_grad():
        batch = torch.stack([bundle.transform(Image.open(p).convert("RGB")) for p in paths])
        student_logits = cache.logits(classifier.encode_images(batch))
    predictions = bundle.predict(paths, k=5, batch_size=32)
    assert [p.indices[0] for p in predictions] == student_logits.argmax(-1).tolist()  # 100% agreement
    top = student_logits.softmax(-1).topk(5)
    assert torch.allclose(torch.tensor([p.probs for p in predictions]), top.values, atol=1e-5)
    assert predictions[0].source == paths[0]
    assert evaluate_base_novel(bundle, split) == {
        **evaluate_base_novel(classifier, split),
        "model": bundle.name,
    }


def test_eval_cli_gives_the_bundle_the_accuracies_of_its_run(cli, bundle_dir, student_run, tmp_path):
    result = cli("eval", "--student", student_run["student"], "--bundle", bundle_dir, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    student, bundle = json.loads((tmp_path / "metrics.json").read_text())
    assert bundle["kind"] == "bundle" and bundle["n_all"] == student["n_all"] > 0
    for key in ("base", "novel", "hm", "all"):
        assert bundle[key] == student[key]


def test_onnx_features_match_torch(bundle_dir, student_run):
    split = _test_split(student_run)
    torch_bundle, onnx_bundle = load_bundle(bundle_dir), load_bundle(bundle_dir, backend="onnx")
    images = torch.stack([torch_bundle.preprocess(s.image) for s in split.samples[:7]])
    for batch in (images[:1], images):  # the batch axis is dynamic
        expected = torch_bundle.encode_images(batch)
        assert (onnx_bundle.encode_images(batch) - expected).abs().max() <= 1e-4
    assert [p.labels for p in onnx_bundle.predict(images)] == [p.labels for p in torch_bundle.predict(images)]


def test_predict_accepts_paths_bytes_pil_and_tensors(bundle_dir, student_run):
    from torchvision.transforms.functional import pil_to_tensor

    bundle = load_bundle(bundle_dir)
    path = Path(_test_split(student_run).samples[0].image)
    pil = Image.open(path).convert("RGB")
    inputs = [path, str(path), path.read_bytes(), pil, pil_to_tensor(pil), bundle.transform(pil)]
    predictions = bundle.predict(inputs, k=3)
    assert len({tuple(p.labels) for p in predictions}) == 1
    assert all(np.allclose(p.probs, predictions[0].probs, atol=1e-6) for p in predictions)
    assert len(bundle.predict(pil, k=100)[0].labels) == 48  # k is capped at the number of classes
    batch = torch.stack([bundle.transform(pil)] * 2)
    assert len(bundle.predict(batch)) == 2
    with pytest.raises(KdpromptError, match="cannot decode image image"):
        bundle.predict([b"not an image"])
    with pytest.raises(KdpromptError, match="preprocessed image of shape"):
        bundle.predict(torch.zeros(3, 16, 16))
    with pytest.raises(KdpromptError, match="k must be at least 1"):
        bundle.predict(pil, k=0)


def test_predict_cli_skips_non_images_by_name(cli, bundle_dir, student_run, tmp_path):
    split = _test_split(student_run)
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for i, sample in enumerate(split.samples[:3]):
        shutil.copy(sample.image, folder / ("nested" if i else "") / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    result = cli("predict", bundle_dir, folder, "--k", "2", "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    errors = {Path(x["image"]).name: x["error"] for x in lines if "error" in x}
    assert set(errors) == {"notes.txt", "broken.jpg"} and "notes.txt: not an image" in errors["notes.txt"]
    predicted = [x for x in lines if "labels" in x]
    assert len(predicted) == 3 and all(len(x["labels"]) == 2 for x in predicted)
    expected = load_bundle(bundle_dir).predict([x["image"] for x in predicted], k=2)
    assert [x["labels"] for x in predicted] == [p.labels for p in expected]
    assert "skipped: cannot decode image" in result.stderr

    table = cli("predict", bundle_dir, folder / "img0.png")
    assert table.exit_code == 0 and "| image | top-1 |" in table.stdout and "img0.png" in table.stdout
    none = cli("predict", bundle_dir, folder / "notes.txt")
    assert none.exit_code == 2 and "none of the 1 file(s)" in none.output
    missing = cli("predict", bundle_dir, tmp_path / "nope.png")
    assert missing.exit_code == 2 and "nope.png does not exist" in missing.output


def test_export_cli_refuses_to_overwrite_and_stays_atomic(cli, student_run, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    first = cli("export", student_run["student"].parent, out)
    assert first.exit_code == 0, first.output
    assert "parameters:" in first.output and "kdprompt predict" in first.output
    before = (out / "manifest.json").read_text()
    again = cli("export", student_run["student"], out)
    assert again.exit_code == 2 and "--overwrite" in again.output
    # A failure half-way through an overwrite leaves the old bundle as it was, and no temporary behind.
    import kdprompt.deploy.onnx as onnx_module

    def broken(*args, **kwargs):
        raise KdpromptError("simulated ONNX failure")

    monkeypatch.setattr(onnx_module, "export_onnx", broken)
    failed = cli("export", student_run["student"], out, "--onnx", "--overwrite")
    assert failed.exit_code == 2 and "simulated ONNX failure" in failed.output
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.lock", "bundle"]  # the lock file stays
    not_run = cli("export", tmp_path, tmp_path / "b2")
    assert not_run.exit_code == 2 and "not a student run" in not_run.output


def test_damaged_or_foreign_bundles_are_refused_with_the_fix(bundle_dir, student_run, tmp_path):
    with pytest.raises(KdpromptError, match="it is a student run: export it first"):
        load_bundle(student_run["student"])
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    (copy / "encoder.safetensors").write_bytes((copy / "encoder.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(KdpromptError, match=r"changed since export: encoder.safetensors.*kdprompt export"):
        load_bundle(copy)
    (copy / "cache" / "index.faiss").unlink()
    with pytest.raises(KdpromptError, match=r"missing: cache/index.faiss"):
        load_bundle(copy)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(KdpromptError, match=r"format version 99.*upgrade kdprompt"):
        load_bundle(copy)
    shutil.rmtree(copy)
    shutil.copytree(bundle_dir, copy)
    (copy / "image_encoder.onnx").unlink()
    manifest["files"].pop("image_encoder.onnx")
    (copy / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))
    with pytest.raises(KdpromptError, match=r"export RUN OUT --onnx"):
        load_bundle(copy, backend="onnx")


def _edited_copy(bundle_dir: Path, to: Path, edit, seal: bool = True) -> Path:
    """A copy of the bundle whose manifest ``edit`` changed (and re-sealed, unless ``seal`` is False)."""
    shutil.copytree(bundle_dir, to)
    manifest = json.loads((to / "manifest.json").read_text())
    edit(manifest)
    (to / "manifest.json").write_text(json.dumps(seal_manifest(manifest) if seal else manifest))
    return to


def test_a_hand_edited_manifest_is_detected(bundle_dir, tmp_path):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["manifest_sha256"] == manifest_digest(manifest)
    edited = _edited_copy(bundle_dir, tmp_path / "b", lambda m: m.update(logit_scale=1.0), seal=False)
    with pytest.raises(
        KdpromptError, match=r"manifest.json does not match its manifest_sha256.*kdprompt export"
    ):
        load_bundle(edited)
    unsealed = _edited_copy(bundle_dir, tmp_path / "c", lambda m: m.pop("manifest_sha256"), seal=False)
    with pytest.raises(KdpromptError, match=r"manifest.json has no manifest_sha256"):
        load_bundle(unsealed, verify=False)


def _drop_files(m):
    del m["files"]


def _escape(rel):
    return lambda m: m["files"].update({rel: "0" * 64})


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_drop_files, r"files must be an object mapping every file.*it is missing"),
        (lambda m: m["files"].pop("encoder.safetensors"), r"files does not list encoder.safetensors"),
        (_escape("../../etc/hostname"), r"outside the bundle \('../../etc/hostname'\)"),
        (_escape("/etc/hostname"), r"outside the bundle \('/etc/hostname'\)"),
        (_escape("cache/../../x"), r"outside the bundle"),
        (lambda m: m.pop("cache"), r"cache must be an object with the teacher_fingerprint, it is missing"),
        (lambda m: m.pop("model"), r"model must be an object"),
        (lambda m: m.pop("preprocess"), r"preprocess must be an object"),
        (lambda m: m["preprocess"].update(size=7), r"preprocess is not a valid open_clip PreprocessCfg"),
        (lambda m: m.update(format_version="1"), r"format_version must be an integer, got '1'"),
    ],
)
def test_a_malformed_manifest_is_one_clear_error(bundle_dir, tmp_path, edit, match):
    # Even re-sealed (so the digest passes), the manifest must list every file, inside the bundle.
    bad = _edited_copy(bundle_dir, tmp_path / "b", edit)
    with pytest.raises(KdpromptError, match=match) as err:
        load_bundle(bad)
    assert "re-export" in str(err.value)


def test_a_listed_file_linking_out_of_the_bundle_is_never_read(bundle_dir, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    outside = tmp_path / "outside.json"
    shutil.copy(copy / "preprocess.json", outside)  # same bytes: only the location is wrong
    (copy / "preprocess.json").unlink()
    (copy / "preprocess.json").symlink_to(outside)
    with pytest.raises(
        KdpromptError, match=r"changed since export: preprocess.json \(a link out of the bundle\)"
    ):
        load_bundle(copy)


def test_predict_cli_reports_a_damaged_manifest_without_traceback(cli, bundle_dir, tmp_path):
    bad = _edited_copy(bundle_dir, tmp_path / "b", lambda m: m.pop("cache"))
    result = cli("predict", bad, bundle_dir / "preprocess.json")
    assert result.exit_code == 2 and "cache must be an object" in result.output
    assert "Traceback" not in result.output


def test_export_overwrite_replaces_only_a_bundle(cli, student_run, tmp_path):
    cache_copy = tmp_path / "cache-copy"
    shutil.copytree(student_run["cache"], cache_copy)
    project = tmp_path / "project"
    project.mkdir()
    (project / "manifest.json").write_text("{}")
    (project / "thesis.tex").write_text("years of work")
    for folder in (cache_copy, project):
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        result = cli("export", student_run["student"], folder, "--overwrite")
        assert result.exit_code == 2 and f"{folder} exists and is not a kdprompt bundle" in result.output
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("export", student_run["student"], empty).exit_code == 0
    load_bundle(empty)


def test_cache_cli_replaces_a_cache_only_with_overwrite(cli, student_run, bundle_dir, tmp_path):
    from kdprompt.text_features import load_cache

    classes = tmp_path / "classes.txt"
    classes.write_text("red circle\nteal hexagon\n")
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    refused = cli("cache", student_run["teacher"], "--classes", classes, "--out", bundle, "--overwrite")
    assert (
        refused.exit_code == 2
        and f"{bundle}: it is a non-empty directory that is not a cache" in refused.output
    )
    load_bundle(bundle)  # untouched

    cache = tmp_path / "cache"
    shutil.copytree(student_run["cache"], cache)
    kept = cli("cache", student_run["teacher"], "--classes", classes, "--out", cache)
    assert kept.exit_code == 2 and f"{cache} already holds a text-feature cache" in kept.output
    assert "--overwrite" in kept.output and load_cache(cache).num_classes == 48
    replaced = cli("cache", student_run["teacher"], "--classes", classes, "--out", cache, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert load_cache(cache).classnames == ["red circle", "teal hexagon"]


def test_invalid_teacher_json_is_one_clear_error(cli, student_run, tmp_path):
    teacher = tmp_path / "runs" / "t" / "teacher"
    shutil.copytree(student_run["teacher"], teacher)
    (teacher / "teacher.json").write_text('{"model": ')
    classes = tmp_path / "classes.txt"
    classes.write_text("red circle\n")
    result = cli("cache", teacher, "--classes", classes, "--out", tmp_path / "c")
    assert result.exit_code == 2 and f"{teacher / 'teacher.json'} is not readable JSON" in result.output
    (teacher / "teacher.json").write_text("[]")
    result = cli("cache", teacher, "--classes", classes, "--out", tmp_path / "c")
    assert result.exit_code == 2 and "teacher.json is not a JSON object" in result.output
    (teacher / "teacher.json").write_text("{}")
    result = cli("cache", teacher, "--classes", classes, "--out", tmp_path / "c")
    assert result.exit_code == 2 and "lacks or has malformed field(s) fingerprint" in result.output
    assert not (tmp_path / "c").exists()


def test_folding_the_projector_batchnorm_keeps_its_output():
    torch.manual_seed(0)
    projector = MLPProjector(16, 32)
    bn = projector[1]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    projector.eval()
    folded, specs = fold_projector(projector)
    x = torch.randn(5, 16)
    assert torch.allclose(folded(x), projector(x), atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in folded.modules())
    rebuilt = build_projector(specs)
    rebuilt.load_state_dict(folded.state_dict())
    assert torch.equal(rebuilt(x), folded(x))


@pytest.mark.parametrize("adaptation", ["prompts", "full", "projector"])
def test_encoder_equals_the_student_for_every_adaptation(adaptation):
    torch.manual_seed(0)
    clip = create_clip(ModelSpec(name="kd-tiny-student"))
    cfg = StudentConfig(model=ModelSpec(name="kd-tiny-student"), adaptation=adaptation, depth=2, n_ctx=3)
    student = Student(clip, cfg, out_dim=128)
    student.train()
    student(torch.randn(8, 3, 32, 32))  # give the BatchNorm running statistics to fold
    student.eval()
    encoder, specs = ImageEncoder.from_student(student)
    # What load_bundle does: rebuild from the open_clip config alone, then load the weights.
    rebuilt = ImageEncoder(
        build_visual(open_clip_config("kd-tiny-student", encoder.visual)),
        build_projector(specs),
        encoder.prompts.detach() if encoder.prompts is not None else None,
    )
    rebuilt.load_state_dict(encoder.state_dict(), strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x), student(x), atol=1e-5)
    assert (encoder.prompts is not None) == (adaptation == "prompts")


def test_open_clip_config_rebuilds_a_real_architecture_and_records_quick_gelu():
    clip = create_clip(ModelSpec(name="ViT-B-32"))
    config = open_clip_config("ViT-B-32", clip.model.visual)
    assert config["quick_gelu"] is False
    rebuilt = build_visual(config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in clip.model.visual.state_dict().items()
    }
    with pytest.raises(KdpromptError, match="lacks vision_cfg"):
        build_visual({"embed_dim": 512})


def test_bundle_predict_bytes_from_memory(bundle_dir):
    buffer = io.BytesIO()
    Image.new("RGB", (50, 40), (200, 30, 30)).save(buffer, format="JPEG")
    prediction = load_bundle(bundle_dir).predict(buffer.getvalue(), k=1)[0]
    assert prediction.source == "image[0]" and 0 < prediction.probs[0] <= 1


def test_bench_predict_prints_bundle_and_teacher_throughput(cli, bundle_dir, student_run):
    result = cli(
        "bench",
        "predict",
        bundle_dir,
        "--teacher",
        student_run["teacher"],
        "--images",
        "16",
        "--repeats",
        "1",
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout[result.stdout.index("{") :])
    assert figures["images"] == 16
    for key in ("bundle_images_per_s", "teacher_images_per_s", "bundle_onnx_images_per_s", "speedup"):
        assert figures[key] > 0
    assert figures["student_image_tower_parameters"] < figures["teacher_image_tower_parameters"]
    assert figures["bundle_bytes"] == sum(p.stat().st_size for p in bundle_dir.rglob("*") if p.is_file())


def test_export_needs_no_base_weights_of_the_student(student_run, bundle_dir, tmp_path):
    # student.safetensors holds the whole tower: a run whose base weights are gone still exports.
    run = tmp_path / "run" / "student"
    shutil.copytree(student_run["student"], run)
    meta = json.loads((run / "student.json").read_text())
    meta["student"]["model"]["pretrained"] = str(tmp_path / "deleted.safetensors")
    (run / "student.json").write_text(json.dumps(meta))
    export_bundle(run, tmp_path / "b")
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(
        load_bundle(tmp_path / "b").encode_images(x), load_bundle(bundle_dir).encode_images(x)
    )


def bundle_of_classes(cli, student_run, folder: Path, classes: str):
    """``kdprompt cache`` of the teacher for ``classes`` (one per line), then ``kdprompt export`` with it."""
    folder.mkdir()
    (folder / "classes.txt").write_text(classes)
    made = cli(
        "cache", student_run["teacher"], "--classes", folder / "classes.txt", "--out", folder / "cache"
    )
    assert made.exit_code == 0, made.output
    result = cli("export", student_run["student"], folder / "bundle", "--cache", folder / "cache")
    assert result.exit_code == 0, result.output
    return load_bundle(folder / "bundle")


def test_export_ships_another_class_list_of_the_same_teacher(cli, student_run, tmp_path):
    from kdprompt.text_features import build_cache

    bundle = bundle_of_classes(cli, student_run, tmp_path / "b3", "teal hexagon\nred circle\nmagenta star\n")
    assert bundle.classnames == ["teal hexagon", "red circle", "magenta star"]
    assert bundle.manifest["classes"]["num_classes"] == 3
    assert set(bundle.predict(torch.zeros(3, 32, 32), k=5)[0].labels) == set(bundle.classnames)

    foreign = tmp_path / "foreign"
    build_cache(
        torch.nn.functional.normalize(torch.randn(2, 128), dim=-1),
        ["a", "b"],
        foreign,
        teacher_fingerprint="0" * 64,
        logit_scale=100.0,
    )
    refused = cli("export", student_run["student"], tmp_path / "b4", "--cache", foreign)
    assert refused.exit_code == 2 and "built for another teacher" in refused.output
    assert not (tmp_path / "b4").exists()


def test_bundle_labels_are_readable_class_names(cli, student_run, tmp_path):
    bundle = bundle_of_classes(
        cli, student_run, tmp_path / "b", "american_bulldog\nApply_Eye_Makeup\nred circle\n"
    )
    # The names identify the classes (cache, sha256); the labels users see read like the prompts.
    assert bundle.classnames == ["american_bulldog", "Apply_Eye_Makeup", "red circle"]
    assert bundle.labels == ["american bulldog", "Apply Eye Makeup", "red circle"]
    assert bundle.cache.manifest["prompts"][:2] == [
        "a photo of a american bulldog.",
        "a photo of a Apply Eye Makeup.",
    ]
    [pred] = bundle.predict(torch.zeros(3, 32, 32), k=3)
    assert set(pred.labels) == set(bundle.labels)
    assert [bundle.labels[i] for i in pred.indices] == pred.labels


def test_bundle_ranks_through_its_exact_index_like_the_matrix_product(bundle_dir):
    from kdprompt.text_features.index import index_kind

    bundle = load_bundle(bundle_dir)
    assert index_kind(bundle.cache.index) == "flat"
    assert bundle.manifest["cache"]["index"] == bundle.cache.manifest["index"] == {"kind": "flat"}
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    predictions = bundle.predict(images, k=5)
    feats = torch.nn.functional.normalize(bundle.encode_images(images), dim=-1)
    top = (bundle.logit_scale * feats @ bundle.cache.features.T).softmax(-1).topk(5)
    assert [p.indices for p in predictions] == top.indices.tolist()
    np.testing.assert_allclose([p.probs for p in predictions], top.values.numpy(), rtol=1e-5, atol=1e-7)
    assert {p.probabilities for p in predictions} == {"full"}
    assert predictions[0].to_dict()["probabilities"] == "full"


def test_an_ivf_bundle_records_its_recall_predicts_and_refuses_another_index(
    cli, student_run, tmp_path, monkeypatch
):
    import faiss

    from kdprompt.text_features import INDEX_FILE, build_cache, load_cache, ranking
    from kdprompt.text_features.index import index_kind
    from kdprompt.text_features.ranking import build_index, plan_index

    own = load_cache(student_run["cache"])
    features = torch.randn(3000, own.embed_dim, generator=torch.Generator().manual_seed(0))
    names = [f"class {i:04d}" for i in range(3000)]
    build_cache(
        features,
        names,
        tmp_path / "cache",
        teacher_fingerprint=own.teacher_fingerprint,
        logit_scale=own.logit_scale,
    )
    out = tmp_path / "bundle"
    result = cli("export", student_run["student"], out, "--cache", tmp_path / "cache", "--index", "ivf")
    assert result.exit_code == 0, result.output
    assert "index: ivf (approximate: 76 lists, nprobe" in result.output and "recall@1" in result.output
    bundle = load_bundle(out)
    entry = bundle.manifest["cache"]["index"]
    assert entry == bundle.cache.manifest["index"] and entry["kind"] == "ivf" and entry["nlist"] == 76
    assert {"nprobe", "recall@1", "recall@5", "recall_queries"} <= set(entry)
    assert index_kind(bundle.cache.index) == "ivf"

    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    feats = torch.nn.functional.normalize(bundle.encode_images(images), dim=-1)
    exact = (feats @ bundle.cache.features.T).topk(3).indices.tolist()
    for prediction, truth in zip(bundle.predict(images, k=3), exact, strict=True):
        assert 1 <= len(prediction.indices) <= 3 and min(prediction.indices) >= 0
        assert prediction.probs == sorted(prediction.probs, reverse=True)
        assert prediction.probabilities in ("full", "candidates")
        if prediction.probabilities == "full":  # every class reached: the exact ranking
            assert prediction.indices == truth

    # Past the full-softmax limit the CLI says how the probabilities were computed, once.
    monkeypatch.setattr(ranking, "FULL_SOFTMAX_MAX_CLASSES", 1000)
    for i in range(2):
        Image.new("RGB", (40, 40), (60 * i, 90, 200)).save(tmp_path / f"img{i}.png")
    as_json = cli("predict", out, tmp_path / "img0.png", tmp_path / "img1.png", "--json")
    assert as_json.exit_code == 0, as_json.output
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [row["probabilities"] for row in rows] == ["candidates", "candidates"]
    table = cli("predict", out, tmp_path / "img0.png", tmp_path / "img1.png")
    assert table.exit_code == 0 and table.stderr.count("softmax over the classes the FAISS index") == 1

    # An index of another kind than the cache manifest records is refused, even unverified.
    flat = build_index(bundle.cache.features, plan_index(3000, "flat"))
    faiss.write_index(flat, str(out / "cache" / INDEX_FILE))
    with pytest.raises(KdpromptError, match=r"changed since export: cache/index\.faiss"):
        load_bundle(out)
    with pytest.raises(KdpromptError, match="index of kind 'flat' but the cache manifest records kind 'ivf'"):
        load_bundle(out, verify=False)


def test_cache_cli_builds_the_index_asked_for_and_says_so(cli, student_run, tmp_path):
    from kdprompt.text_features import load_cache
    from kdprompt.text_features.index import index_kind

    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"shape {i}\n" for i in range(100)))
    exact = cli("cache", student_run["teacher"], "--classes", classes, "--out", tmp_path / "flat")
    assert exact.exit_code == 0, exact.output
    assert "index: flat (exact search)" in exact.output  # auto: exact below the threshold
    ivf = cli(
        "cache", student_run["teacher"], "--classes", classes, "--out", tmp_path / "ivf", "--index", "ivf"
    )
    assert ivf.exit_code == 0, ivf.output
    entry = load_cache(tmp_path / "ivf").manifest["index"]
    assert entry["kind"] == "ivf" and entry["nlist"] == 2  # min(sqrt(100), 100 // 39)
    assert f"index: ivf (approximate: 2 lists, nprobe {entry['nprobe']}, recall@1" in ivf.output
    assert index_kind(load_cache(tmp_path / "ivf").index) == "ivf"
    unknown = cli("cache", student_run["teacher"], "--classes", classes, "--index", "annoy")
    assert unknown.exit_code == 2 and "'annoy' is not one of 'auto', 'flat', 'ivf', 'hnsw'" in unknown.output


def test_predict_labels_only_the_classes_it_returns(bundle_dir, monkeypatch):
    """A prediction spells the labels of its top k, not of the whole vocabulary (1M names: ~60 ms a call)."""
    from kdprompt.deploy import bundle as bundle_module

    loaded = load_bundle(bundle_dir)
    spelled = []
    spell = bundle_module.prompt_classname
    monkeypatch.setattr(bundle_module, "prompt_classname", lambda name: spelled.append(name) or spell(name))
    _, height, width = loaded.input_size
    predictions = loaded.predict_tensor(torch.zeros(3, 3, height, width), k=2)
    assert len(spelled) == 3 * 2 < len(loaded.classnames)
    assert predictions[0].labels == [loaded.labels[i] for i in predictions[0].indices]


def test_vocabulary_bundle_serves_a_synthetic_vocabulary_of_the_students_teacher(student_run, tmp_path):
    """apps.vocab_bundle: the student's bundle over N synthetic classes of its teacher's width."""
    from click.testing import CliRunner

    from kdprompt.apps.vocab_bundle import main as vocab_bundle_main
    from kdprompt.apps.vocab_bundle import vocabulary_bundle

    out = tmp_path / "bundle"
    manifest = vocabulary_bundle(student_run["student"], tmp_path / "cache", out, classes=300)
    assert manifest["classes"]["num_classes"] == 300 and manifest["cache"]["index"]["kind"] == "flat"
    loaded = load_bundle(out)
    _, height, width = loaded.input_size
    prediction = loaded.predict_tensor(torch.zeros(1, 3, height, width), k=3)[0]
    assert len(prediction.labels) == 3 and all(label.startswith("class ") for label in prediction.labels)
    refused = CliRunner().invoke(vocab_bundle_main, [str(tmp_path), str(tmp_path / "c"), str(tmp_path / "b")])
    assert refused.exit_code == 2 and "is not a student run" in refused.output
