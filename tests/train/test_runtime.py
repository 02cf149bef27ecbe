"""Learning-rate schedules (kdprompt.train.runtime): per-step cosine, and Dassl's per-epoch cosine."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

from kdprompt.config.distill import DistillTrainConfig
from kdprompt.config.teacher import TeacherTrainConfig
from kdprompt.train.runtime import cosine_lr, dassl_epoch_lr, scheduled_lr

BASE, WARMUP_LR = 0.0035, 1e-5


class _ConstantWarmup(LRScheduler):
    """Dassl's constant warm-up wrapper as ``dassl/optim/lr_scheduler.py`` behaves, re-stated for the test:
    ``warmup`` epochs at ``cons_lr``, then the wrapped scheduler's lr, stepping it only after the warm-up."""

    def __init__(self, optimizer: torch.optim.Optimizer, successor: LRScheduler, warmup: int, cons_lr: float):
        self.successor, self.warmup, self.cons_lr = successor, warmup, cons_lr
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        if self.last_epoch >= self.warmup:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]

    def step(self, epoch: int | None = None) -> None:
        if self.last_epoch >= self.warmup:
            self.successor.step()
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step()


def _dassl_reference(epochs: int, warmup: int) -> list[float]:
    """The lr each epoch trains at when Dassl's scheduler is built (``build_lr_scheduler``: cosine with
    T_max = MAX_EPOCH, WARMUP_RECOUNT true) and stepped after each epoch's last batch, as the PromptKD,
    PromptSRC and MaPLe trainers do."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE)
    scheduler: LRScheduler = CosineAnnealingLR(optimizer, float(epochs))
    if warmup > 0:
        scheduler = _ConstantWarmup(optimizer, scheduler, warmup, WARMUP_LR)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # the epoch's updates (no gradients here), then the scheduler, as Dassl orders them
        scheduler.step()
    return lrs


def _cfg(schedule: str, warmup: int = 1, epochs: int = 5) -> TeacherTrainConfig:
    return TeacherTrainConfig(
        lr=BASE, epochs=epochs, warmup_epochs=warmup, warmup_lr=WARMUP_LR, lr_schedule=schedule
    )


@pytest.mark.parametrize(("epochs", "warmup"), [(5, 1), (20, 1), (3, 0), (6, 2), (1, 1)])
def test_dassl_schedule_matches_dassl_scheduler_stepped_per_epoch(epochs, warmup):
    per_epoch = 7
    reference = _dassl_reference(epochs, warmup)
    cfg = _cfg("dassl", warmup, epochs)
    for step in range(epochs * per_epoch):
        lr = scheduled_lr(cfg, step, per_epoch, epochs * per_epoch)
        assert lr == pytest.approx(reference[step // per_epoch], rel=1e-12, abs=1e-15)


def test_dassl_epoch_lr_formula_with_one_warmup_epoch():
    epochs = 5
    lrs = [dassl_epoch_lr(e, epochs, BASE, 1, WARMUP_LR) for e in range(epochs)]
    assert lrs[0] == WARMUP_LR
    for e in range(1, epochs):
        assert lrs[e] == pytest.approx(BASE * (1 + math.cos(math.pi * (e - 1) / epochs)) / 2)
    assert lrs[1] == pytest.approx(BASE) and min(lrs[1:]) > 0.3 * BASE  # never decays to 0


def _mean_after_warmup(schedule: str, epochs: int = 5, per_epoch: int = 100) -> float:
    cfg, total = _cfg(schedule, 1, epochs), epochs * per_epoch
    lrs = [scheduled_lr(cfg, s, per_epoch, total) for s in range(per_epoch, total)]
    return sum(lrs) / len(lrs) / BASE


def test_mean_lr_after_warmup_over_five_epochs():
    # MaPLe's 5 epochs: the per-step cosine averages half of base, Dassl's per-epoch one 0.73.
    assert _mean_after_warmup("cosine_per_step") == pytest.approx(0.50, abs=0.01)
    assert _mean_after_warmup("dassl") == pytest.approx(0.726, abs=0.001)


def test_default_schedule_is_the_per_step_cosine():
    for cfg in (TeacherTrainConfig(), DistillTrainConfig()):
        assert cfg.lr_schedule == "cosine_per_step"
    cfg, per_epoch, total = TeacherTrainConfig(), 6, 120
    for step in range(total):
        expected = cosine_lr(step, total, cfg.lr, cfg.warmup_epochs * per_epoch, cfg.warmup_lr)
        assert scheduled_lr(cfg, step, per_epoch, total) == expected


def test_dassl_schedule_spans_the_epochs_max_steps_reaches():
    # max_steps inside epoch 3 of 10: the cosine runs over the 3 epochs the run has.
    cfg, per_epoch = _cfg("dassl", 1, 10), 4
    assert scheduled_lr(cfg, 8, per_epoch, 10) == pytest.approx(dassl_epoch_lr(2, 3, BASE, 1, WARMUP_LR))
