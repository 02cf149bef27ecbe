"""``kdprompt teacher``: prompt learning (PromptSRC or MaPLe) on few-shot labelled data, then the cache."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kdprompt.config.fingerprint import recipe_fingerprint
from kdprompt.config.loading import dump_recipe
from kdprompt.config.teacher import TeacherRecipe
from kdprompt.data.dataset import SplitDataset
from kdprompt.data.protocol import few_shot, subsample_classes, val_shots
from kdprompt.data.sources import load_split
from kdprompt.data.types import Split
from kdprompt.errors import KdpromptError
from kdprompt.evaluate import accuracy, predict
from kdprompt.io import write_json_atomic, write_text_atomic
from kdprompt.models.loading import create_clip
from kdprompt.models.prompt_methods import TeacherOutputs
from kdprompt.models.teacher import PromptedClip, save_teacher
from kdprompt.train.checkpoint import restore_rng_on_resume, resume_training, save_training_checkpoint
from kdprompt.train.metrics import MetricsLog, plot_curves
from kdprompt.train.runtime import cosine_lr, ended_early, make_accelerator, set_lr


def run_dir_of(recipe: TeacherRecipe) -> Path:
    """``<output_dir>/<name>/teacher``."""
    return Path(recipe.output_dir) / recipe.name / "teacher"


def cache_dir_of(recipe: TeacherRecipe) -> Path:
    """Where the teacher's text-feature cache goes (``cache/<name>`` unless set)."""
    return recipe.cache_dir or Path("cache") / recipe.name


def fewshot_splits(recipe: TeacherRecipe) -> tuple[Split, Split | None, list[str]]:
    """The few-shot training split, the optional validation split, and all class names of the data."""
    train = load_split(recipe.data, "train")
    all_classnames = list(train.classnames)
    if recipe.fewshot.classes == "base":
        train = subsample_classes(train, "base")
    train.samples = few_shot(train.samples, recipe.fewshot.shots, recipe.seed)
    if not train.samples:
        raise KdpromptError(
            f"the train split of {recipe.data.source} data has no images of the chosen classes"
        )
    val = None
    if recipe.selection == "val":
        val = load_split(recipe.data, "val")
        if len(val) == 0:
            raise KdpromptError("selection: val needs a non-empty val split; use selection: last")
        if recipe.fewshot.classes == "base":
            val = subsample_classes(val, "base")
        val.samples = few_shot(val.samples, val_shots(recipe.fewshot.shots or 0) or None, recipe.seed)
    return train, val, all_classnames


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of sample indices for ``epoch``: one seeded permutation split across ranks.

    Every rank gets the same number of batches (the permutation is cut to a multiple of ``world``).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    mine = order[: (n // world) * world][rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def _trainable_state(model: PromptedClip) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.learner.state_dict().items()}


@torch.no_grad()
def _val_accuracy(model: PromptedClip, split: Split, device: torch.device) -> float:
    model.eval()
    classifier = model.class_features(split.classnames)
    preds, labels = predict(model.encode_images, classifier, split, model.transform, device)
    model.train()
    return accuracy(preds, labels)


def run_teacher(recipe: TeacherRecipe) -> Path:
    """Train the teacher, write its artefact and text-feature cache, and evaluate; returns the run dir."""
    if not recipe.model.pretrained:
        raise KdpromptError(
            "model.pretrained is not set: a teacher needs base weights that can be loaded again "
            "(an open_clip tag such as `openai`, or a weights file); a random initialisation cannot be rebuilt"
        )
    run_dir = run_dir_of(recipe)
    cfg, method = recipe.train, recipe.method
    accelerator = make_accelerator(run_dir, cfg.mixed_precision)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    set_seed(recipe.seed)
    with accelerator.main_process_first():
        train, val, all_classnames = fewshot_splits(recipe)
    classnames = train.classnames
    clip = create_clip(recipe.model)
    model = PromptedClip(clip, method, name=f"teacher {recipe.name}")
    device = accelerator.device
    aggregation = model.learner.aggregation(cfg.epochs)

    per_epoch = math.ceil((len(train) // world) / cfg.batch_size)
    if per_epoch == 0:
        raise KdpromptError(f"{len(train)} training images cannot be split across {world} processes")
    total_steps = cfg.max_steps or cfg.epochs * per_epoch
    optimizer = torch.optim.SGD(
        model.learner.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )

    ckpt_dir = run_dir / "checkpoints"
    step, restored_rng = 0, None
    best: dict[str, torch.Tensor] | None = None
    counters: dict[str, Any] = {"best_val": -1.0, "best_epoch": -1}
    fingerprint = recipe_fingerprint(recipe)
    ckpt = resume_training(recipe.resume, ckpt_dir, fingerprint, optimizer, main=main)
    if ckpt is not None:
        learner_state = {k[len("learner.") :]: v for k, v in ckpt.weights.items() if k.startswith("learner.")}
        model.learner.load_state_dict(learner_state)
        best = {k[len("best.") :]: v for k, v in ckpt.weights.items() if k.startswith("best.")} or None
        step, counters, restored_rng = ckpt.step, dict(ckpt.state["counters"]), ckpt.state["rng"]
        if aggregation is not None:
            aggregation.load(
                {k[len("gpa.") :]: v for k, v in ckpt.weights.items() if k.startswith("gpa.")}, counters
            )
    model, optimizer = accelerator.prepare(model, optimizer)
    core: PromptedClip = accelerator.unwrap_model(model)
    class_tokens = core.class_tokens(classnames)
    core.learner.prepare_training(core, classnames)

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))
    metrics = MetricsLog(run_dir / "metrics.jsonl", accelerator)
    metrics.truncate_after(step)
    accelerator.init_trackers("teacher")

    def checkpoint(epoch_end: bool) -> None:
        def tensors() -> dict[str, torch.Tensor]:
            out = {f"learner.{k}": v for k, v in _trainable_state(core).items()}
            out.update({f"gpa.{k}": v for k, v in (aggregation.tensors() if aggregation else {}).items()})
            out.update({f"best.{k}": v for k, v in (best or {}).items()})
            return out

        save_training_checkpoint(
            accelerator,
            ckpt_dir,
            step,
            tensors,
            optimizer,
            {**counters, **(aggregation.counters() if aggregation else {})},
            {"epoch_end": epoch_end, "total_steps": total_steps, "recipe_fingerprint": fingerprint},
            recipe.checkpoint.keep_last,
        )

    dataset = SplitDataset(train, core.train_transform)
    stop_at = min(total_steps, step + cfg.stop_after_steps) if cfg.stop_after_steps else total_steps
    bar = tqdm(total=total_steps, initial=step, disable=not main, desc=f"teacher {recipe.name}", unit="step")
    warmup_steps = cfg.warmup_epochs * per_epoch
    window_start, window_images = time.perf_counter(), 0
    model.train()
    while step < stop_at:
        epoch, skip = divmod(step, per_epoch)
        batches = epoch_batches(len(dataset), cfg.batch_size, recipe.seed, epoch, rank, world)[skip:]
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers)
        if restored_rng is not None:
            restore_rng_on_resume(restored_rng, main, recipe.seed + 7919 * rank + step)
            restored_rng = None
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            set_lr(optimizer, cosine_lr(step, total_steps, cfg.lr, warmup_steps, cfg.warmup_lr))
            with accelerator.autocast():
                image_f, text_f = model(images, class_tokens)
                scale = core.logit_scale
                logits = scale * image_f @ text_f.T
                terms = core.learner.training_loss(
                    core, TeacherOutputs(images, labels, image_f, text_f, logits, scale)
                )
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(terms["loss"])
            optimizer.step()
            step += 1
            window_images += len(labels) * world
            bar.update(1)
            if step % cfg.log_every == 0 or step % per_epoch == 0 or step == total_steps:
                row = {k: accelerator.reduce(v.detach().float(), "mean").item() for k, v in terms.items()}
                acc = (logits.argmax(-1) == labels).float().mean()
                row.update(
                    epoch=epoch,
                    lr=optimizer.param_groups[0]["lr"],
                    train_acc=100 * accelerator.reduce(acc, "mean").item(),
                    images_per_s=window_images / max(time.perf_counter() - window_start, 1e-9),
                )
                metrics.log(row, step)
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['train_acc']:.0f}")
                window_start, window_images = time.perf_counter(), 0
            epoch_end = step % per_epoch == 0
            if epoch_end:
                finished = step // per_epoch  # 1-based number of the epoch just finished
                if aggregation is not None:
                    aggregation.epoch_end(finished, core.learner.state_dict())
                if val is not None:
                    val_acc = _val_accuracy(core, val, device)
                    metrics.log({"val_acc": val_acc, "epoch": finished - 1}, step)
                    if val_acc > counters["best_val"]:
                        counters["best_val"], counters["best_epoch"] = val_acc, finished
                        best = _trainable_state(core)
            if step < stop_at and (
                epoch_end or (recipe.checkpoint.every_steps and step % recipe.checkpoint.every_steps == 0)
            ):
                checkpoint(epoch_end)
            if step >= stop_at:
                break
    bar.close()
    checkpoint(step % per_epoch == 0)
    if ended_early(step, total_steps, accelerator):
        return run_dir

    final, selected = _final_state(core, aggregation, counters, best, recipe)
    core.learner.load_state_dict(final)
    if main:
        _finish(recipe, core, run_dir, classnames, all_classnames, train, selected, step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def _final_state(
    core: PromptedClip, aggregation: Any, counters: dict, best, recipe: TeacherRecipe
) -> tuple[dict, str]:
    """The prompts the teacher ships with: best-on-val, the method's aggregate (PromptSRC's GPA), or the last."""
    if recipe.selection == "val" and best is not None:
        return best, f"val (epoch {counters['best_epoch']}, {counters['best_val']:.2f}%)"
    aggregated = aggregation.result() if aggregation is not None else None
    if aggregated is not None:
        return aggregated, "gpa"
    return _trainable_state(core), "last"


def _finish(
    recipe: TeacherRecipe,
    core: PromptedClip,
    run_dir: Path,
    classnames: list[str],
    all_classnames: list[str],
    train: Split,
    selected: str,
    steps: int,
) -> None:
    """Write the artefact, the cache of all classes, the evaluation and the curves (main process)."""
    from kdprompt.text_features.teacher import cache_class_features

    core.eval()
    fingerprint = save_teacher(
        run_dir,
        core,
        classnames=classnames,
        all_classnames=all_classnames,
        extra={
            "data": recipe.data.model_dump(mode="json"),
            "fewshot": recipe.fewshot.model_dump(mode="json"),
            "seed": recipe.seed,
            "selection": selected,
            "train_images": len(train),
            "steps": steps,
        },
    )
    cache_dir = cache_dir_of(recipe)
    cache_class_features(
        core,
        all_classnames,
        cache_dir,
        teacher_fingerprint=fingerprint,
        provenance={
            "teacher": str(run_dir),
            "model": core.spec.model_dump(mode="json"),
            "method": recipe.method.name,
        },
    )
    results: dict[str, Any] = {
        "fingerprint": fingerprint,
        "selection": selected,
        "steps": steps,
        "cache": str(cache_dir),
    }
    if recipe.evaluate:
        from kdprompt.evaluate import ZeroShotClassifier, evaluate_base_novel, evaluation_table

        test = load_split(recipe.data, "test")
        zero_shot = ZeroShotClassifier(
            create_clip(recipe.model), templates="simple", name=f"zero-shot {recipe.model.name}"
        )
        rows = [
            evaluate_base_novel(zero_shot, test, device=core.device),
            evaluate_base_novel(core, test, device=core.device),
        ]
        results["eval"] = rows
        table = evaluation_table(rows)
        write_text_atomic(run_dir / "eval.md", table + "\n")
        tqdm.write("\n" + table)
    write_json_atomic(run_dir / "metrics.json", results)
    plot_curves(
        run_dir / "metrics.jsonl",
        run_dir / "curves.png",
        ["loss", "train_acc", "val_acc", "lr"],
        title=f"teacher {recipe.name} ({recipe.method.name})",
    )
