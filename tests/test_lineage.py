"""Merge planning against the champion's registry record, and the incremental registration guard."""

from __future__ import annotations

import pytest

from dmm.registry.gate import GateThresholds, check_gate
from dmm.registry.lineage import ChampionRecord, MergePlan, plan_merge

SHA = {"pastel": "a", "neon": "b", "sepia": "c"}


def champion(**kw) -> ChampionRecord:
    fields = dict(
        version="3",
        run_id="r3",
        styles=["pastel", "neon", "sepia"],
        teacher_sha=dict(SHA),
        base_sha="base",
        student_sha="s3",
        diag_fd={"pastel": 2.0, "neon": 4.0, "sepia": 1.0},
    )
    return ChampionRecord(**{**fields, **kw})


def test_no_champion_or_a_full_request_merges_everything():
    assert plan_merge(None, ["pastel"], SHA, "base").kind == "full"
    plan = plan_merge(champion(), [*SHA, "stripes"], {**SHA, "stripes": "d"}, "base", "full")
    assert plan.kind == "full" and "config" in plan.reason


def test_a_changed_or_unrecorded_base_forces_a_full_merge():
    names = [*SHA, "stripes"]
    sha = {**SHA, "stripes": "d"}
    assert "base model changed" in plan_merge(champion(), names, sha, "other").reason
    assert plan_merge(champion(base_sha=None), names, sha, "base").kind == "full"


def test_an_added_teacher_is_incremental_from_the_champion():
    plan = plan_merge(
        champion(), ["pastel", "neon", "sepia", "stripes"], {**SHA, "stripes": "d"}, "base"
    )
    assert plan.kind == "incremental" and plan.merge_kind == "incremental"
    assert plan.new == ["stripes"] and plan.old == ["pastel", "neon", "sepia"]
    assert plan.replace == [] and plan.retire == []
    assert (plan.parent_version, plan.parent_run_id) == ("3", "r3")
    assert plan.parent_diag_fd == {"pastel": 2.0, "neon": 4.0, "sepia": 1.0}
    assert plan.reason == "add stripes on top of champion v3"


def test_a_changed_teacher_hash_is_a_replacement_and_a_dropped_one_retires():
    plan = plan_merge(champion(), ["pastel", "neon"], {**SHA, "neon": "b2"}, "base")
    assert plan.kind == "incremental"
    assert plan.replace == ["neon"] and plan.retire == ["sepia"] and plan.old == ["pastel"]
    assert plan.parent_diag_fd == {"pastel": 2.0}
    assert plan.reason == "replace neon; retire sepia on top of champion v3"


def test_the_same_teachers_are_unchanged():
    plan = plan_merge(champion(), ["sepia", "pastel", "neon"], SHA, "base")
    assert plan.kind == "unchanged" and plan.merge_kind == "full"


def _results(diag: list[float]) -> dict:
    styles = ["pastel", "neon", "stripes"]
    m = [[diag[i] if i == j else 100.0 for j in range(3)] for i in range(3)]
    return {
        "styles": styles,
        "M": m,
        "M_ref": [1.0, 1.0, 1.0],  # each style's floor: the old-style tolerance's unit
        "fid_t_ratio": 2.0,
        "style_accuracy": dict.fromkeys(styles, 1.0),
        "teacher_accuracy": dict.fromkeys(styles, 1.0),
        "baselines": {},
    }


@pytest.mark.parametrize(
    ("diag", "failing"),
    [
        ([2.4, 4.3, 9.0], []),  # within 0.5 floors (the new style has no previous value)
        ([2.6, 4.0, 9.0], ["pastel"]),  # +0.6 floors
        ([2.0, 4.7, 9.0], ["neon"]),  # +0.7 floors
    ],
)
def test_the_guard_names_each_old_style_that_regressed(diag, failing):
    previous = {"pastel": 2.0, "neon": 4.0, "sepia": 1.0}  # sepia retired: not judged
    gate = check_gate(_results(diag), GateThresholds(), previous)
    assert gate.passed is not failing
    assert [c.name for c in gate.criteria if not c.passed] == [f"old_style/{s}" for s in failing]
    assert {c.name for c in gate.criteria} >= {"old_style/pastel", "old_style/neon"}
    for style in failing:
        assert f"old style {style}" in gate.summary()


def test_the_tolerance_is_configurable():
    previous = {"pastel": 2.0}
    strict = GateThresholds(old_style_tolerance=0.0)
    assert not check_gate(_results([2.01, 1.0, 1.0]), strict, previous).passed
    assert check_gate(_results([2.01, 1.0, 1.0]), GateThresholds(), previous).passed


def test_a_full_merge_has_no_old_style_criteria():
    gate = check_gate(_results([50.0, 50.0, 50.0]), GateThresholds(), None)
    assert not any(c.name.startswith("old_style/") for c in gate.criteria)
    assert MergePlan("full", "x").merge_kind == "full"


@pytest.mark.bad_input
def test_a_parent_whose_styles_differ_from_its_registry_record_is_refused(mini_zoo, tmp_path):
    from diffusers import UNet2DConditionModel

    from dmm.atomic import DmmError
    from dmm.registry.lineage import fetch_parent_student
    from dmm.student.model import StyleStudent

    zoo, _ = mini_zoo
    unet = UNet2DConditionModel.from_pretrained(zoo / "base" / "unet")
    StyleStudent.from_base(unet, ["pastel", "neon"]).save_pipeline(tmp_path / "v3", zoo / "base")
    # Already downloaded: the client is never asked for it.
    ok = fetch_parent_student(None, "m", champion(styles=["pastel", "neon"]), tmp_path)
    assert ok == tmp_path / "v3"
    with pytest.raises(DmmError, match=r"champion v3 of 'm' has styles \['pastel', 'neon'\]"):
        fetch_parent_student(None, "m", champion(), tmp_path)
