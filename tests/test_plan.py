"""The merge plan (dmm.plan): a pure decision over the manifest, params and the champion record."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from dmm import layout
from dmm.atomic import DmmError
from dmm.plan import MergeRequest, PlanInputs, check_recipe, decide, read_plan, write_plan
from dmm.registry.lineage import ChampionRecord

REPO = Path(__file__).resolve().parents[1]
SHA = {"pastel": "a", "neon": "b", "sepia": "c"}


def inputs(teachers=("pastel", "neon", "sepia"), sha=None, **request) -> PlanInputs:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return PlanInputs(
        params=params,
        request=MergeRequest(**request),
        teachers=list(teachers),
        teacher_sha256=sha or {n: SHA.get(n, n * 2) for n in teachers},
        base_dir="data/zoo/base",
        base_sha256="base",
    )


def champion_of(plan, **kw) -> ChampionRecord:
    fields = dict(
        version="3",
        run_id="r3",
        styles=plan.styles,
        teacher_sha=plan.teacher_sha256,
        base_sha="base",
        student_sha="s3",
        diag_fd={n: 1.0 for n in plan.styles},
        merge_kind=plan.recipe_kind,
        fingerprint=plan.fingerprint,
    )
    return ChampionRecord(**{**fields, **kw})


def test_no_champion_is_a_full_merge_of_every_teacher_in_manifest_order():
    plan, recipe, evaluate = decide(inputs())
    assert (plan.kind, plan.reason) == ("full", "no champion yet")
    assert plan.styles == plan.trained == ["pastel", "neon", "sepia"]
    config = recipe["config"]
    assert [t["name"] for t in config["teachers"]] == plan.styles
    assert config["teachers"][0]["path"] == f"{layout.TEACHERS}/pastel"
    assert config["steps"] == 400 and "progress" not in config and "resume" not in config
    assert [t["name"] for t in evaluate["teachers"]] == plan.styles
    assert set(evaluate["baselines"]) == {
        "weighted", "task_arithmetic", "ties", "dare_linear", "dare_ties"
    }  # fmt: skip
    assert plan.tags["dmm.merge_kind"] == "full" and plan.tags["dmm.teacher.neon.sha256"] == "b"


def test_the_champions_own_recipe_is_unchanged_and_a_new_config_is_a_full_merge():
    first, _, _ = decide(inputs())
    again, _, _ = decide(inputs(), champion_of(first))
    assert again.kind == "unchanged" and again.fingerprint == first.fingerprint
    changed, recipe, _ = decide(inputs(distill={"lr": 3e-4}), champion_of(first))
    assert changed.kind == "full" and "distill config changed" in changed.reason
    assert recipe["config"]["lr"] == 3e-4 and changed.fingerprint != first.fingerprint


def test_an_added_teacher_is_incremental_with_the_registry_incremental_settings():
    first, _, _ = decide(inputs())
    plan, recipe, evaluate = decide(
        inputs(("pastel", "neon", "sepia", "stripes")),
        champion_of(first),
        parent_dir="data/parents/v3",
    )
    assert plan.kind == "incremental" and plan.trained == ["stripes"]
    assert plan.styles == ["pastel", "neon", "sepia", "stripes"]
    assert (plan.parent_version, plan.parent_sha256) == ("3", "s3")
    config = recipe["config"]
    assert config["init_from"] == "data/parents/v3" and config["steps"] == 600
    assert config["lr"] == 3e-4 and [t["name"] for t in config["teachers"]] == ["stripes"]
    assert [t["name"] for t in evaluate["teachers"]] == plan.styles
    assert plan.tags["dmm.parent_version"] == "3"


def test_a_retirement_alone_trains_nothing():
    first, _, _ = decide(inputs())
    plan, recipe, _ = decide(inputs(("pastel", "sepia")), champion_of(first), parent_dir="p")
    assert plan.kind == "incremental" and plan.trained == [] and plan.retire == ["neon"]
    assert recipe == {"action": "retire", "init_from": "p", "retire": ["neon"]}
    assert plan.styles == ["pastel", "sepia"]


def test_an_incremental_champion_keeps_its_recipe_and_full_merge_overrides_it():
    first, _, _ = decide(inputs())
    inc, inc_recipe, _ = decide(
        inputs(("pastel", "neon", "sepia", "stripes")), champion_of(first), parent_dir="p"
    )
    champion = champion_of(inc)
    known = {"plan": json.loads(inc.to_json()), "recipe": inc_recipe}
    kept, recipe, _ = decide(
        inputs(("pastel", "neon", "sepia", "stripes")), champion, champion_recipe=known
    )
    assert kept.kind == "unchanged" and recipe == inc_recipe and kept.styles == inc.styles
    lost, _, _ = decide(inputs(("pastel", "neon", "sepia", "stripes")), champion)
    assert lost.kind == "full" and "recipe is not on disk" in lost.reason
    full, _, _ = decide(inputs(("pastel", "neon", "sepia", "stripes"), full_merge=True), champion)
    assert full.kind == "full" and full.recipe_kind == "full"


@pytest.mark.bad_input
def test_an_invalid_setting_is_one_line_naming_the_key():
    with pytest.raises(DmmError, match=r"distill\.lr: Input should be greater than 0"):
        decide(inputs(distill={"lr": -1}))
    with pytest.raises(DmmError, match=r"distill\.nonsense: Extra inputs are not permitted"):
        decide(inputs(distill={"nonsense": 1}))


@pytest.mark.bad_input
def test_a_plan_edited_by_hand_is_refused(tmp_path):
    plan, recipe, evaluate = decide(inputs())
    write_plan(tmp_path, plan, recipe, evaluate)
    assert read_plan(tmp_path)[0] == plan
    edited = dict(recipe, config={**recipe["config"], "steps": 5})
    with pytest.raises(DmmError, match="edited by hand"):
        check_recipe(plan, edited, tmp_path)
    with pytest.raises(DmmError, match="edited by hand"):
        check_recipe(replace(plan, styles=["pastel"], trained=["pastel"]), recipe, tmp_path)


def test_planning_leaves_torch_unimported():
    code = (
        "import sys\n"
        "from pipelines.definitions import defs\n"
        "defs.resolve_asset_graph()\n"
        "from tests.test_plan import inputs\n"
        "from dmm.plan import decide\n"
        "decide(inputs())\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


class _Registry:
    """The part of MlflowClient that check_parent reads: versions and their tags."""

    def __init__(self, versions: dict[str, dict[str, str]]):
        self.versions = versions

    def get_model_version(self, name, version):
        from types import SimpleNamespace

        from mlflow.exceptions import MlflowException

        if version not in self.versions:
            raise MlflowException(f"no version {version}")
        return SimpleNamespace(tags=self.versions[version])


@pytest.mark.bad_input
def test_a_plan_that_contradicts_the_registry_is_refused(tmp_path):
    from dmm.plan import check_parent

    first, _, _ = decide(inputs())
    plan, _, _ = decide(
        inputs(("pastel", "neon", "sepia", "stripes")), champion_of(first), parent_dir="p"
    )
    tags = {"dmm.teachers": "pastel,neon,sepia", "dmm.student_sha256": "s3"}
    check_parent(tmp_path, plan, _Registry({"3": tags}), "m")  # as recorded: fine
    with pytest.raises(DmmError, match="not a version of 'm'"):
        check_parent(tmp_path, replace(plan, parent_version="9"), _Registry({"3": tags}), "m")
    other = {**tags, "dmm.teachers": "pastel,neon"}
    with pytest.raises(DmmError, match="contradicts the registry"):
        check_parent(tmp_path, plan, _Registry({"3": other}), "m")


@pytest.mark.bad_input
def test_samples_drawn_with_another_base_are_refused(tmp_path):
    from dmm.hashing import weights_sha256
    from dmm.plan import check_samples

    base = tmp_path / "data/zoo/base/text_encoder"
    base.mkdir(parents=True)
    (base / "model.safetensors").write_bytes(b"the manifest's base")
    samples = tmp_path / "data/samples"
    for name, encoder in (("pastel", weights_sha256(base)), ("neon", "another base")):
        (samples / name).mkdir(parents=True)
        (samples / name / "index.json").write_text(
            json.dumps({"base_text_encoder_sha256": encoder})
        )
    _, recipe, _ = decide(inputs(("pastel", "neon")))
    with pytest.raises(DmmError, match="samples of 'neon' were drawn with another base"):
        check_samples(tmp_path, recipe)
    _, recipe, _ = decide(inputs(("pastel",)))
    check_samples(tmp_path, recipe)
