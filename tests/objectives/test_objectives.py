"""Stage-two distillation objectives against independent, loop-based computations of DESIGN.md §5."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdprompt.errors import KdpromptError
from kdprompt.objectives import OBJECTIVES, DistillBatch, DistillObjectives
from kdprompt.objectives.crd_image import CRDImageObjectiveConfig
from kdprompt.objectives.fd import FDObjectiveConfig
from kdprompt.objectives.icl_image import ICLImageObjectiveConfig
from kdprompt.objectives.kl import KLObjectiveConfig

B, C, D = 4, 5, 3
LAMBDA = 10.0


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture()
def batch() -> DistillBatch:
    g = torch.Generator().manual_seed(0)
    return DistillBatch(
        student=_unit(torch.randn(B, D, generator=g)),
        teacher=_unit(torch.randn(B, D, generator=g)),
        text=_unit(torch.randn(C, D, generator=g)),
        logit_scale=LAMBDA,
    )


# ------------------------------------------------------------------------------- loop references


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0)


def ref_kl_sum(b: DistillBatch, tau: float) -> float:
    """Σ_i τ² KL(softmax(zT_i/τ) ‖ softmax(zS_i/τ)) with dot products written out."""
    s, t, w = _np(b.student), _np(b.teacher), _np(b.text)
    lam = float(b.logit_scale)
    total = 0.0
    for i in range(s.shape[0]):
        z_t = [lam * sum(t[i, d] * w[c, d] for d in range(w.shape[1])) / tau for c in range(w.shape[0])]
        z_s = [lam * sum(s[i, d] * w[c, d] for d in range(w.shape[1])) / tau for c in range(w.shape[0])]
        total += tau**2 * _kl(_softmax(z_t), _softmax(z_s))
    return total


def ref_icl(s: np.ndarray, t: np.ndarray, scale: float) -> float:
    """Mean over anchors k of -log softmax_j(scale · s_k·t_j)[k]."""
    n = s.shape[0]
    total = 0.0
    for k in range(n):
        row = [scale * float(np.dot(s[k], t[j])) for j in range(n)]
        total += -math.log(_softmax(row)[k])
    return total / n


def ref_crd(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    """Σ_k KL(p_T[k] ‖ p_S[k]) / B with p[k] a softmax over j ≠ k."""
    n = s.shape[0]
    total = 0.0
    for k in range(n):
        others = [j for j in range(n) if j != k]
        p_t = _softmax([float(np.dot(t[k], t[j])) / tau for j in others])
        p_s = _softmax([float(np.dot(s[k], s[j])) / tau for j in others])
        total += _kl(p_t, p_s)
    return total / n


# ----------------------------------------------------------------------------------------------- kl


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_kl_matches_loop(batch, tau, reduction):
    kl = OBJECTIVES.get("kl")(KLObjectiveConfig(temperature=tau, reduction=reduction))
    expected = ref_kl_sum(batch, tau) / (B if reduction == "batchmean" else B * C)
    assert kl(batch).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kl_mean_is_promptkd_normalisation(batch, tau):
    """``mean`` is PromptKD's sum / (B·C) and equals ``batchmean`` / C."""
    mean = OBJECTIVES.get("kl")(KLObjectiveConfig(temperature=tau, reduction="mean"))(batch)
    batchmean = OBJECTIVES.get("kl")(KLObjectiveConfig(temperature=tau, reduction="batchmean"))(batch)
    assert batchmean.item() == pytest.approx(mean.item() * C, rel=1e-6)
    assert mean.item() * B * C == pytest.approx(ref_kl_sum(batch, tau), rel=1e-5)


def test_kl_accepts_tensor_logit_scale(batch):
    kl = OBJECTIVES.get("kl")(KLObjectiveConfig())
    as_float = kl(batch)
    batch.logit_scale = torch.tensor(LAMBDA)
    assert torch.allclose(kl(batch), as_float)


# ----------------------------------------------------------------------------------------------- fd


def test_fd_closed_form():
    """s = t + δ·1 everywhere, so the element mean of (s - t)² is δ²."""
    t = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])
    delta = 0.25
    b = DistillBatch(student=t + delta, teacher=t, text=torch.eye(3), logit_scale=1.0)
    fd = OBJECTIVES.get("fd")(FDObjectiveConfig())
    assert fd(b).item() == pytest.approx(delta**2, rel=1e-6)


def test_fd_matches_loop(batch):
    s, t = _np(batch.student), _np(batch.teacher)
    expected = sum((s[i, d] - t[i, d]) ** 2 for i in range(B) for d in range(D)) / (B * D)
    assert OBJECTIVES.get("fd")(FDObjectiveConfig())(batch).item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------- icl


def test_icl_matches_loop_and_learns_its_temperature(batch):
    icl = OBJECTIVES.get("icl_image")(ICLImageObjectiveConfig(init_temperature=0.5, min_temperature=0.01))
    assert icl.log_scale.item() == pytest.approx(math.log(2.0))
    loss = icl(batch)
    assert loss.item() == pytest.approx(ref_icl(_np(batch.student), _np(batch.teacher), 2.0), rel=1e-5)
    loss.backward()
    assert icl.log_scale.grad is not None and icl.log_scale.grad.abs().item() > 0
    assert [n for n, _ in icl.named_parameters()] == ["log_scale"]


def test_icl_temperature_is_exponentiated_then_clamped(batch):
    """init 0.07 < min 0.1: the scale is 1/0.1 = 10, not exp(log(1/0.07)) and not the log value."""
    icl = OBJECTIVES.get("icl_image")(ICLImageObjectiveConfig(init_temperature=0.07, min_temperature=0.1))
    assert icl.scale.item() == pytest.approx(10.0)
    expected = ref_icl(_np(batch.student), _np(batch.teacher), 10.0)
    assert icl(batch).item() == pytest.approx(expected, rel=1e-5)


def test_icl_gradient_reaches_student(batch):
    s = batch.student.clone().requires_grad_(True)
    batch.student = s
    OBJECTIVES.get("icl_image")(ICLImageObjectiveConfig())(batch).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- crd


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_crd_matches_double_loop(batch, tau):
    crd = OBJECTIVES.get("crd_image")(CRDImageObjectiveConfig(temperature=tau))
    expected = ref_crd(_np(batch.student), _np(batch.teacher), tau)
    assert crd(batch).item() == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_crd_gradient_is_finite(batch):
    s = batch.student.clone().requires_grad_(True)
    batch.student = s
    OBJECTIVES.get("crd_image")(CRDImageObjectiveConfig())(batch).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_crd_two_samples_is_zero():
    """With B = 2 each anchor has one other sample, so both distributions are [1] and agree."""
    g = torch.Generator().manual_seed(1)
    b = DistillBatch(
        student=_unit(torch.randn(2, D, generator=g)),
        teacher=_unit(torch.randn(2, D, generator=g)),
        text=torch.eye(D),
        logit_scale=1.0,
    )
    assert OBJECTIVES.get("crd_image")(CRDImageObjectiveConfig())(b).item() == pytest.approx(0.0, abs=1e-7)


def test_crd_needs_two_samples(batch):
    one = DistillBatch(batch.student[:1], batch.teacher[:1], batch.text, batch.logit_scale)
    with pytest.raises(KdpromptError, match="at least 2"):
        OBJECTIVES.get("crd_image")(CRDImageObjectiveConfig())(one)


# ------------------------------------------------------------------------------------ shared facts


@pytest.mark.parametrize(
    ("name", "cfg"),
    [
        ("kl", KLObjectiveConfig(temperature=2.0)),
        ("kl", KLObjectiveConfig(reduction="mean")),
        ("fd", FDObjectiveConfig()),
        ("crd_image", CRDImageObjectiveConfig()),
    ],
)
def test_zero_when_student_is_teacher(batch, name, cfg):
    batch.student = batch.teacher.clone()
    assert OBJECTIVES.get(name)(cfg)(batch).item() == pytest.approx(0.0, abs=1e-6)


def test_registry_names():
    assert OBJECTIVES.names() == ["crd_image", "fd", "icl_image", "kl"]
    with pytest.raises(KdpromptError, match="available: crd_image, fd, icl_image, kl"):
        OBJECTIVES.get("mse")


# ------------------------------------------------------------------------------ DistillObjectives


def test_combiner_weights_and_total(batch):
    cfg = dict(
        kl=KLObjectiveConfig(weight=1000.0, reduction="mean"),
        fd=FDObjectiveConfig(weight=2000.0),
        icl_image=ICLImageObjectiveConfig(weight=0.5),
        crd_image=CRDImageObjectiveConfig(weight=3.0),
    )
    objectives = DistillObjectives(cfg)
    assert objectives.names == ["kl", "fd", "icl_image", "crd_image"]
    out = objectives(batch)
    assert set(out) == {"kl", "fd", "icl_image", "crd_image", "loss"}
    s, t = _np(batch.student), _np(batch.teacher)
    expected = {
        "kl": 1000.0 * ref_kl_sum(batch, 1.0) / (B * C),
        "fd": 2000.0 * float(np.mean((s - t) ** 2)),
        "icl_image": 0.5 * ref_icl(s, t, 1 / 0.07),
        "crd_image": 3.0 * ref_crd(s, t, 0.07),
    }
    for name, value in expected.items():
        assert out[name].item() == pytest.approx(value, rel=1e-4), name
    assert out["loss"].item() == pytest.approx(sum(expected.values()), rel=1e-4)
    assert torch.allclose(out["loss"], sum(out[n] for n in objectives.names))


def test_combiner_only_named_objectives(batch):
    objectives = DistillObjectives(dict(fd=FDObjectiveConfig(weight=2.0)))
    out = objectives(batch)
    assert objectives.names == ["fd"] and set(out) == {"fd", "loss"}
    assert list(objectives.parameters()) == []
    assert torch.equal(out["loss"], out["fd"])


def test_combiner_keeps_icl_temperature_in_state(batch):
    objectives = DistillObjectives(dict(icl_image=ICLImageObjectiveConfig(init_temperature=0.1)))
    params = dict(objectives.named_parameters())
    assert list(params) == ["terms.icl_image.log_scale"]
    objectives(batch)["loss"].backward()
    assert params["terms.icl_image.log_scale"].grad is not None
    state = objectives.state_dict()
    fresh = DistillObjectives(dict(icl_image=ICLImageObjectiveConfig()))
    fresh.load_state_dict(state)
    assert fresh.terms["icl_image"].scale.item() == pytest.approx(10.0, rel=1e-6)


def test_combiner_runs_in_float32_under_autocast(batch):
    half = DistillBatch(
        student=batch.student.bfloat16(),
        teacher=batch.teacher.bfloat16(),
        text=batch.text,
        logit_scale=torch.tensor(LAMBDA),
    )
    objectives = DistillObjectives(dict(kl=KLObjectiveConfig()))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = objectives(half)
    assert out["loss"].dtype == torch.float32


def test_no_objective_is_an_error():
    with pytest.raises(
        KdpromptError,
        match=r"name at least one objective under `objectives:` \(kl, fd, icl_image, crd_image\)",
    ):
        DistillObjectives(dict())
