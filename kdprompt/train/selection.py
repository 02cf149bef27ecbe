"""Model selection on a held-out labelled split, never the test split: what the teacher and distill stages share.

``selection: val`` evaluates the model at every epoch end on the few-shot val split (CoOp's protocol:
``min(K, 4)`` shots per class of the classes trained on, drawn right after the train draw) and ships
the best epoch's trainable state, which is kept in checkpoints under ``best.`` so a resumed run ends
with the same choice.

For comparison: PromptKD's student uses ``TEST.FINAL_MODEL best_val`` with the *base-class test
split* as its val set (PromptKD ``datasets/oxford_pets.py``: ``super().__init__(train_x=train_x,
val=test_base, test=test_novel)``), so its published numbers are selected on test data. Nothing here
reads a test split.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from kdprompt.data.protocol import fewshot_protocol
from kdprompt.data.source import DataSource
from kdprompt.data.sources import load_split
from kdprompt.data.types import Split
from kdprompt.errors import KdpromptError
from kdprompt.evaluate import ImageTextClassifier, accuracy, predict
from kdprompt.train.checkpoint import Checkpoint

if TYPE_CHECKING:
    from kdprompt.train.run import Run

BEST_PREFIX = "best."


def load_labelled_val(data: DataSource) -> Split:
    """The whole val split of ``data``, or an error saying why ``selection: val`` cannot work."""
    val = load_split(data, "val")
    if len(val) == 0:
        note = val.meta.get("note")
        raise KdpromptError(
            f"selection: val needs a non-empty val split, and the val split of the {data.source} data is empty"
            + (f" ({note})" if note else "")
            + "; use selection: last (selection never falls back to the test split)"
        )
    return val


def teacher_val_split(teacher: Any) -> Split:
    """The labelled val data the teacher's run drew: its few-shot val split of the classes it trained on.

    The same data, shots, classes and seed as the teacher (from its ``teacher.json``), so the student
    is selected on exactly the labels the teacher was allowed to see.

    Raises:
        KdpromptError: the teacher records no data, or its data has no val split.
    """
    from kdprompt.models.teacher import TEACHER_FILE

    if teacher.data_config is None:
        raise KdpromptError(
            f"selection: val validates on the val split of the teacher's data, but {teacher.path} records "
            "no data (trained outside `kdprompt teacher`?); use selection: last"
        )
    val = load_labelled_val(teacher.data_config)
    meta = json.loads((teacher.path / TEACHER_FILE).read_text(encoding="utf-8"))
    fewshot = meta.get("fewshot") or {}
    train = load_split(teacher.data_config, "train")  # the train draw comes first in Dassl's RNG stream
    _, val = fewshot_protocol(
        train, val, fewshot.get("shots"), fewshot.get("classes", "base"), int(meta.get("seed", 1))
    )
    assert val is not None
    if len(val) == 0:
        raise KdpromptError(
            f"selection: val: the val split of the teacher's data has no images of the "
            f"{fewshot.get('classes', 'all')} classes; use selection: last"
        )
    return val


@torch.no_grad()
def val_accuracy(clf: ImageTextClassifier, split: Split, device: torch.device, module: nn.Module) -> float:
    """Top-1 (%) of ``clf`` on ``split`` among its classes, ``module`` in eval mode meanwhile."""
    was_training = module.training
    module.eval()
    try:
        classifier = clf.class_features(list(split.classnames))
        preds, labels = predict(clf.encode_images, classifier, split, clf.transform, device)
    finally:
        module.train(was_training)
    return accuracy(preds, labels)


class BestOnVal:
    """The epoch with the best val accuracy so far and its trainable state (a copy, on the CPU).

    Checkpoints carry it: the counters ``best_val`` / ``best_epoch`` and the tensors under ``best.``.
    """

    def __init__(self) -> None:
        self.acc = -1.0
        self.epoch = -1
        self.state: dict[str, Tensor] | None = None

    def update(self, run: Run, acc: float, state: Callable[[], dict[str, Tensor]]) -> None:
        """Log ``val_acc`` of the epoch that just ended and keep ``state()`` if it is the best so far."""
        finished = run.step // run.per_epoch  # 1-based number of the epoch just finished
        if run.metrics is not None:
            run.metrics.log({"val_acc": acc, "epoch": finished - 1}, run.step)
        if acc > self.acc:  # ties keep the earlier epoch
            self.acc, self.epoch = acc, finished
            self.state = {k: v.detach().cpu().clone() for k, v in state().items()}

    def counters(self) -> dict[str, Any]:
        return {"best_val": self.acc, "best_epoch": self.epoch}

    def tensors(self) -> dict[str, Tensor]:
        return {f"{BEST_PREFIX}{k}": v for k, v in (self.state or {}).items()}

    def restore(self, ckpt: Checkpoint) -> None:
        """Take the best state and counters back from a checkpoint."""
        best = {k[len(BEST_PREFIX) :]: v for k, v in ckpt.weights.items() if k.startswith(BEST_PREFIX)}
        self.state = best or None
        counters = ckpt.state.get("counters", {})
        self.acc = float(counters.get("best_val", -1.0))
        self.epoch = int(counters.get("best_epoch", -1))

    def describe(self) -> str:
        """``val (epoch E, A%)``: what metrics.json and the artefact record."""
        return f"val (epoch {self.epoch}, {self.acc:.2f}%)"


def without_best(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's weights less the ``best.`` copies."""
    return {k: v for k, v in weights.items() if not k.startswith(BEST_PREFIX)}


__all__ = [
    "BEST_PREFIX",
    "BestOnVal",
    "load_labelled_val",
    "teacher_val_split",
    "val_accuracy",
    "without_best",
]
