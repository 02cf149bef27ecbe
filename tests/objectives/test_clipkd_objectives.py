"""CLIP-KD's caption-mode objectives against the formulas of the paper and of winycg/CLIP-KD's
``KDClipLoss`` (``src/open_clip/loss.py``), written out here element by element in float64."""

from __future__ import annotations

import math

import pytest
import torch

from kdprompt.objectives import CLIPKD_OBJECTIVES, CaptionBatch, ClipKDObjectives
from kdprompt.objectives.base import ObjectiveConfig
from kdprompt.objectives.clipkd import CRDConfig, FDConfig, ICLConfig
from kdprompt.objectives.clipkd_combined import clipkd_defaults, validate_clipkd_objectives

N, DS, DT = 5, 6, 8
TOL = 1e-9  # the objectives run in float64 here; the brief asks for <= 1e-6


# -------------------------------------------------------------------- reference formulas, by hand


def unit(rows: list[list[float]]) -> list[list[float]]:
    return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in rows]


def matmul_t(a: list[list[float]], b: list[list[float]], scale: float) -> list[list[float]]:
    """scale · a bᵀ."""
    return [[scale * sum(x * y for x, y in zip(ra, rb, strict=True)) for rb in b] for ra in a]


def transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*m, strict=True)]


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def ce_diagonal(logits: list[list[float]]) -> float:
    """Mean over rows i of -log softmax(row i)[i]."""
    return sum(-math.log(softmax(row)[i]) for i, row in enumerate(logits)) / len(logits)


def kl_rows(teacher: list[list[float]], student: list[list[float]]) -> float:
    """Σ_i Σ_j p_T log(p_T / p_S) / N (batchmean), T = 1."""
    total = 0.0
    for zt, zs in zip(teacher, student, strict=True):
        pt, ps = softmax(zt), softmax(zs)
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))
    return total / len(teacher)


def mse(a: list[list[float]], b: list[list[float]]) -> float:
    diffs = [(x - y) ** 2 for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(diffs) / len(diffs)


def linear(rows: list[list[float]], w: list[list[float]], bias: list[float]) -> list[list[float]]:
    return [
        [sum(x * wij for x, wij in zip(row, wi, strict=True)) + bi for wi, bi in zip(w, bias, strict=True)]
        for row in rows
    ]


def reference(raw_img, raw_txt, t_img, t_txt, scale_s, scale_t, c, proj_i, proj_t) -> dict[str, float]:
    """KDClipLoss: task, fd, icl and ckd (crd) from raw student and normalised teacher features."""
    s_img, s_txt = unit(raw_img), unit(raw_txt)
    p_img, p_txt = unit(linear(raw_img, *proj_i)), unit(linear(raw_txt, *proj_t))
    z_s = matmul_t(s_img, s_txt, scale_s)
    z_t = matmul_t(t_img, t_txt, scale_t)
    return {
        "task": (ce_diagonal(z_s) + ce_diagonal(transpose(z_s))) / 2,
        "fd": mse(p_img, t_img) + mse(p_txt, t_txt),
        "icl": (ce_diagonal(matmul_t(p_img, t_txt, c)) + ce_diagonal(matmul_t(p_txt, t_img, c))) / 2,
        "crd": (kl_rows(z_t, z_s) + kl_rows(transpose(z_t), transpose(z_s))) / 2,
    }


# --------------------------------------------------------------------------------------- fixtures


def features(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    raw_img = torch.randn(N, DS, generator=g, dtype=torch.float64) * 3
    raw_txt = torch.randn(N, DS, generator=g, dtype=torch.float64) * 3
    t_img = torch.nn.functional.normalize(torch.randn(N, DT, generator=g, dtype=torch.float64), dim=-1)
    t_txt = torch.nn.functional.normalize(torch.randn(N, DT, generator=g, dtype=torch.float64), dim=-1)
    return {"raw_img": raw_img, "raw_txt": raw_txt, "t_img": t_img, "t_txt": t_txt}


def rows(t: torch.Tensor) -> list[list[float]]:
    return t.detach().tolist()


def combined(cfg: dict | None = None) -> ClipKDObjectives:
    torch.manual_seed(0)
    return ClipKDObjectives(validate_clipkd_objectives(cfg) if cfg else clipkd_defaults(), DS, DT).double()


def run(objectives: ClipKDObjectives, f: dict, scale_s: float = 14.0, scale_t: float = 100.0) -> dict:
    return objectives(
        f["raw_img"], f["raw_txt"], torch.tensor(scale_s, dtype=torch.float64), f["t_img"], f["t_txt"],
        torch.tensor(scale_t, dtype=torch.float64),
    )  # fmt: skip


def ref_for(objectives: ClipKDObjectives, f: dict, scale_s: float = 14.0, scale_t: float = 100.0) -> dict:
    pi, pt = objectives.proj_image, objectives.proj_text
    c = objectives.terms["icl"].scale.item() if "icl" in objectives.terms else 0.0
    return reference(
        rows(f["raw_img"]), rows(f["raw_txt"]), rows(f["t_img"]), rows(f["t_txt"]), scale_s, scale_t, c,
        (rows(pi.weight), pi.bias.tolist()), (rows(pt.weight), pt.bias.tolist()),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------- tests


def test_each_objective_equals_the_reference_formula():
    objectives = combined()
    f = features()
    got = run(objectives, f)
    ref = ref_for(objectives, f)
    weights = {"task": 1.0, "fd": 2000.0, "icl": 1.0, "crd": 1.0}
    for name, w in weights.items():
        assert got[name].item() == pytest.approx(w * ref[name], abs=TOL * max(1.0, w)), name
    assert got["loss"].item() == pytest.approx(sum(w * ref[n] for n, w in weights.items()), abs=1e-6)


def test_clipkd_default_weights_and_icl_scale_are_the_references():
    cfg = clipkd_defaults()
    assert list(cfg) == ["task", "fd", "icl", "crd"]
    assert {n: c.weight for n, c in cfg.items()} == {"task": 1.0, "fd": 2000.0, "icl": 1.0, "crd": 1.0}
    icl = CLIPKD_OBJECTIVES.get("icl")(ICLConfig())
    # cross_logit_scale = ln(1/0.07), used as is: the logits are multiplied by ≈ 2.66, not by 1/0.07.
    assert icl.cross_logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-6)
    assert icl.scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-6)
    assert CRDConfig().temperature == 1.0


def test_icl_scale_mode_exp_is_the_papers_temperature_reading():
    f = features(1)
    linear_objs = combined({"icl": {}})
    exp_objs = combined({"icl": {"scale_mode": "exp"}})
    assert exp_objs.terms["icl"].scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    got = run(exp_objs, f)["icl"].item()
    ref = ref_for(exp_objs, f)["icl"]  # ref_for reads the effective multiplier, here exp(ln(1/0.07))
    assert got == pytest.approx(ref, abs=TOL)
    assert got != pytest.approx(run(linear_objs, f)["icl"].item(), abs=1e-3)
    capped = combined({"icl": {"scale_mode": "exp", "init_scale": 10.0, "max_scale": 50.0}})
    assert capped.terms["icl"].scale.item() == pytest.approx(50.0)


def test_icl_scale_and_projectors_learn_and_teacher_gets_no_gradient():
    objectives = combined()
    f = features(2)
    t_img = f["t_img"].clone().requires_grad_(True)
    raw_img = f["raw_img"].clone().requires_grad_(True)
    out = objectives(
        raw_img, f["raw_txt"], torch.tensor(14.0, dtype=torch.float64), t_img, f["t_txt"], torch.tensor(100.0)
    )
    out["loss"].backward()
    assert objectives.terms["icl"].cross_logit_scale.grad.abs().item() > 0
    assert objectives.proj_image.weight.grad.abs().sum().item() > 0
    assert objectives.proj_text.weight.grad.abs().sum().item() > 0
    assert raw_img.grad.abs().sum().item() > 0
    assert t_img.grad is None  # detached: the teacher never trains


def test_projectors_only_when_widths_differ_and_an_objective_needs_them():
    assert isinstance(ClipKDObjectives(clipkd_defaults(), DT, DT).proj_image, torch.nn.Identity)
    no_proj = ClipKDObjectives(validate_clipkd_objectives({"task": {}, "crd": {}}), DS, DT)
    assert not hasattr(no_proj, "proj_image") and list(no_proj.parameters()) == []
    f = features(3)
    # Equal widths: FD is on the normalised raw features (no projection), as CLIP-KD.
    same = ClipKDObjectives(validate_clipkd_objectives({"fd": {"weight": 1}}), DT, DT).double()
    raw_img = torch.randn(N, DT, dtype=torch.float64)
    raw_txt = torch.randn(N, DT, dtype=torch.float64)
    got = same(raw_img, raw_txt, torch.tensor(1.0), f["t_img"], f["t_txt"], torch.tensor(1.0))["fd"].item()
    expected = mse(unit(rows(raw_img)), rows(f["t_img"])) + mse(unit(rows(raw_txt)), rows(f["t_txt"]))
    assert got == pytest.approx(expected, abs=TOL)


def test_crd_is_zero_when_student_logits_equal_the_teachers_and_includes_the_diagonal():
    f = features(4)
    img, txt = f["t_img"], f["t_txt"]
    batch = CaptionBatch(img, txt, None, None, img, txt, torch.tensor(30.0), torch.tensor(30.0))
    crd = CLIPKD_OBJECTIVES.get("crd")(CRDConfig())
    assert crd(batch).item() == pytest.approx(0.0, abs=1e-12)
    # Changing only the diagonal similarities changes CRD (the diagonal is part of the distributions).
    other = CaptionBatch(img, txt, None, None, img, txt, torch.tensor(30.0), torch.tensor(60.0))
    assert crd(other).item() > 1e-3


def test_fd_alone_matches_its_formula_in_float64():
    f = features(5)
    g = torch.Generator().manual_seed(9)
    p_img = torch.nn.functional.normalize(torch.randn(N, DT, generator=g, dtype=torch.float64), dim=-1)
    p_txt = torch.nn.functional.normalize(torch.randn(N, DT, generator=g, dtype=torch.float64), dim=-1)
    batch = CaptionBatch(
        p_img, p_txt, p_img, p_txt, f["t_img"], f["t_txt"], torch.tensor(1.0), torch.tensor(1.0)
    )
    got = CLIPKD_OBJECTIVES.get("fd")(FDConfig())(batch).item()
    assert got == pytest.approx(
        mse(rows(p_img), rows(f["t_img"])) + mse(rows(p_txt), rows(f["t_txt"])), abs=TOL
    )


def test_float32_inputs_match_the_reference_within_1e_6_relative():
    objectives = ClipKDObjectives(clipkd_defaults(), DS, DT)
    f = {k: v.float() for k, v in features(6).items()}
    got = objectives(
        f["raw_img"], f["raw_txt"], torch.tensor(14.0), f["t_img"], f["t_txt"], torch.tensor(100.0)
    )
    ref = ref_for(objectives, f)
    for name in ("task", "icl", "crd"):
        assert got[name].item() == pytest.approx(ref[name], rel=1e-5, abs=1e-6), name
    assert got["fd"].item() / 2000 == pytest.approx(ref["fd"], rel=1e-5, abs=1e-6)


def test_unknown_and_empty_objectives_are_clear_errors():
    from pydantic import ValidationError

    from kdprompt.errors import KdpromptError

    with pytest.raises(ValidationError, match="allowed: crd, fd, icl, task"):
        validate_clipkd_objectives({"kl": {}})
    with pytest.raises(KdpromptError, match="name at least one objective"):
        ClipKDObjectives({}, DS, DT)
    with pytest.raises(KdpromptError, match=r"objectives\.fd: expected FDConfig"):
        ClipKDObjectives({"fd": ObjectiveConfig()}, DS, DT)
