"""The evaluation gate with intervals: stable on re-evaluation, still catches a broken style."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from dmm.evaluation.config import EvaluateConfig
from dmm.evaluation.protocol import assemble
from dmm.evaluation.scores import combine, fd_pairs, score_repeat
from dmm.registry.gate import (
    GateThresholds,
    StyleScore,
    check_gate,
    parent_from_metrics,
    parent_from_results,
)
from dmm.registry.tracking import evaluation_metrics

NAMES = ["pastel", "neon", "sepia"]
D, K = 8, 160


def _centres() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    return {n: 3 * torch.randn(D, generator=g, dtype=torch.float64) for n in NAMES}


def evaluation(seed: int, damaged: str | None = None, how: str = "zero") -> dict:
    """An evaluation.json of a synthetic student under one sample seed.

    Each teacher is a Gaussian around its own centre; the student's style i
    is teacher i's Gaussian slightly off (a decent, imperfect student).
    Damage: ``zero`` moves the style to the origin (its vector forgotten),
    ``swap`` gives it another style's centre (a swapped teacher).
    """
    g = torch.Generator().manual_seed(seed)
    centres = _centres()

    def draw(c):
        return c + torch.randn(K, D, generator=g, dtype=torch.float64)

    feats = {}
    for i, n in enumerate(NAMES):
        feats[f"teacher/{n}"] = draw(centres[n])
        feats[f"reference/{n}"] = draw(centres[n])
        target = centres[n] + 0.15
        if n == damaged:
            target = torch.zeros(D) if how == "zero" else centres[NAMES[(i + 1) % len(NAMES)]]
        feats[f"student/{n}"] = draw(target)
    per_repeat = [score_repeat(feats, fd_pairs(NAMES, []), 200, g)]
    points, reps, spread = combine(per_repeat)
    cfg = EvaluateConfig(teachers=[{"name": n, "path": "x"} for n in NAMES], images_per_style=K)
    correct = {
        "teacher": {n: K - 2 for n in NAMES},
        "student": {n: (8 if n == damaged else K - 4) for n in NAMES},
    }
    extractor = SimpleNamespace(name="synthetic", dim=D)
    return assemble(cfg, extractor, NAMES, [], points, reps, spread, correct)


THRESHOLDS = GateThresholds(max_fid_t_ratio=10, max_independent_ratio=10)


def test_the_same_student_re_evaluated_under_ten_seeds_always_gets_the_same_verdict():
    parent = parent_from_results(evaluation(0))
    verdicts = [check_gate(evaluation(s), THRESHOLDS, parent) for s in range(1, 11)]
    assert all(v.passed for v in verdicts), [v.summary() for v in verdicts if not v.passed]
    # The point estimates do move: a bare 10% rule on them would flip verdicts.
    diag = [evaluation(s)["M"][0][0] for s in range(1, 11)]
    assert max(diag) / min(diag) > 1.1


@pytest.mark.parametrize("how", ["zero", "swap"])
def test_a_damaged_style_is_caught_under_every_seed(how):
    parent = parent_from_results(evaluation(0))
    for s in range(1, 11):
        gate = check_gate(evaluation(s, damaged="neon", how=how), THRESHOLDS, parent)
        failed = {c.name for c in gate.criteria if not c.passed}
        assert "old_style/neon" in failed, gate.summary()
        assert not any(name.endswith(("/pastel", "/sepia")) for name in failed), failed


def test_old_style_regresses_only_beyond_the_floor_tolerance_and_the_noise():
    r = {
        "styles": ["a"], "M": [[1.3]], "M_ref": [1.0], "fid_t_ratio": 1.3,
        "style_accuracy": {"a": None}, "teacher_accuracy": {"a": None},
        "intervals": {"M": [[[1.2, 1.4]]], "fid_t_ratio": [1.2, 1.4]},
    }  # fmt: skip
    tol = GateThresholds(old_style_tolerance=0.5)
    # +0.3 is under 0.5 floors: passes although it is +30%.
    assert check_gate(r, tol, {"a": 1.0}).passed
    # +0.6 beyond 0.5 floors and beyond the noise: fails, and says so with the interval.
    gate = check_gate(r, tol, {"a": 0.7})
    assert not gate.passed and "[1.2, 1.4]" in gate.summary() and "0.5 x floor" in gate.summary()
    # The same excess within a noisy parent's interval passes.
    assert check_gate(r, tol, {"a": StyleScore(0.7, 0.1, 1.4, 1.0)}).passed
    with pytest.raises(ValidationError, match="old_style_tolerance"):
        GateThresholds(old_style_tolerance=-0.1)


def test_ratio_bars_fail_only_when_the_whole_interval_is_above():
    r = {"styles": [], "M": [], "M_ref": [], "fid_t_ratio": 2.2, "fid_t_independent_ratio": 2.4,
         "intervals": {"fid_t_ratio": [1.8, 2.6], "fid_t_independent_ratio": [1.9, 2.9]}}  # fmt: skip
    assert check_gate(r, GateThresholds(max_fid_t_ratio=2.0, max_independent_ratio=2.0)).passed
    gate = check_gate(r, GateThresholds(max_fid_t_ratio=1.5, max_independent_ratio=3))
    assert not gate.passed
    bad = next(c for c in gate.criteria if not c.passed)
    assert bad.name == "fid_t_ratio" and bad.interval == (1.8, 2.6)
    assert "whole interval above" in bad.detail


def test_the_parent_read_back_from_mlflow_metrics_has_the_same_intervals_and_floors():
    r = evaluation(0)
    back = parent_from_metrics(evaluation_metrics(r))
    direct = parent_from_results(r)
    assert set(back) == set(NAMES)
    for n in NAMES:
        assert back[n].fd == pytest.approx(direct[n].fd)
        assert (back[n].lo, back[n].hi) == pytest.approx((direct[n].lo, direct[n].hi))
        assert back[n].floor == pytest.approx(direct[n].floor)
    metrics = evaluation_metrics(r)
    lo, hi = metrics["eval/fid_t_independent_ratio_lo"], metrics["eval/fid_t_independent_ratio_hi"]
    assert lo <= metrics["eval/fid_t_independent_ratio"] <= hi


def test_mixing_path_and_weight_average_are_scored_on_the_mini_zoo(mini_zoo, tmp_path):
    """Both paths get probabilities at every weight; the ends are the sampled endpoints."""
    import json

    from dmm.evaluation.classify import load_classifier
    from dmm.evaluation.features import make_extractor
    from dmm.evaluation.mixing import mixing_study, weight_average
    from dmm.evaluation.sampling import load_pipeline, sample
    from tests.test_evaluation import _student_from_base

    zoo, _ = mini_zoo
    names = ["pastel", "neon"]
    student = load_pipeline(_student_from_base(zoo / "base", names, tmp_path / "s"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a small red circle"}))
    cfg = EvaluateConfig(student=tmp_path / "s", prompts=prompts, classifier=zoo / "classifier",
                         teachers=[{"name": n, "path": zoo / "teachers" / n} for n in names],
                         images_per_style=8, steps=2, batch_size=8, interpolation_points=3)  # fmt: skip
    p, s = ["a small red circle"] * 8, list(range(8))
    kw = dict(steps=2, guidance_scale=3.0, batch=8)
    teachers = {n: sample(load_pipeline(zoo / "teachers" / n), p, s, **kw) for n in names}
    first = {"prompts": p, "seeds": s, "teacher": teachers,
             "student": {n: sample(student, p, s, style=n, **kw) for n in names}}  # fmt: skip
    clf = load_classifier(zoo / "classifier")
    extractor = make_extractor("stylenet", zoo / "classifier")
    study = mixing_study(cfg, student, clf, extractor, first, torch.device("cpu"))
    mix = study["summary"]
    assert mix["weights"] == [0.0, 0.5, 1.0] and mix["from"] == "pastel"
    for method in ("dmm", "weight_average"):
        assert len(mix[method]["p_to"]) == 3 and mix[method]["fd_to"] == [None] * 3  # 8 < 128
        assert mix[method]["max_step"] is not None
    # The weight average at w = 0 is teacher a itself.
    pa, pb = load_pipeline(zoo / "teachers/pastel"), load_pipeline(zoo / "teachers/neon")
    same = weight_average(pa, pb, 0.0).unet.state_dict()
    assert all(torch.equal(v, pa.unet.state_dict()[k]) for k, v in same.items())


def test_dmm_evaluate_leads_with_the_independent_seed_ratio_and_its_interval(capsys):
    from dmm.cli import _print_evaluation

    r = evaluation(1)
    r["gate"] = {"passed": False, "summary": "style neon: accuracy 0.05"}
    _print_evaluation(r)
    lines = capsys.readouterr().out.splitlines()
    lo, hi = r["intervals"]["fid_t_independent_ratio"]
    assert lines[0].startswith("independent-seed ratio") and f"[{lo:.3g}, {hi:.3g}]" in lines[0]
    assert "1.0 = the reference floor, lower is better" in lines[0]
    assert "shared-seed ratio" in lines[1]
    assert lines[-1] == "gate: FAILED (style neon: accuracy 0.05)"
