"""The Dagster code location on a miniature project: the whole graph, DVC, sensor, bad input."""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tests.pipeline_support import (
    ALL_ASSETS,
    LENIENT_GATE,
    MODEL_NAME,
    REPO,
    free_port,
    make_repo,
    materialize_all,
    resources_for,
    run,
    run_config,
)

pytestmark = pytest.mark.timeout(1200)

TEACHERS = ["pastel", "neon", "sepia", "blueprint", "stripes"]


def materializations(result) -> dict[str, list]:
    found: dict[str, list] = {}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        found.setdefault(mat.asset_key.to_user_string(), []).append(mat)
    return found


def champion(tracking_uri: str) -> tuple[str, int]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = str(client.get_model_version_by_alias(MODEL_NAME, "champion").version)
    return version, len(client.search_model_versions(f"name='{MODEL_NAME}'"))


def test_whole_graph_materializes_every_asset_with_its_metadata(built):
    mats = materializations(built.result)
    assert set(mats) == ALL_ASSETS
    # One run covered every teacher partition of both partitioned assets.
    for key in ("teachers", "teacher_samples"):
        assert sorted(m.partition for m in mats[key]) == sorted(TEACHERS)
    checks = built.result.get_asset_check_evaluations()
    assert [c.check_name for c in checks] == ["evaluation_gate"] and checks[0].passed

    student = mats["merged_student"][0].metadata
    assert student["mlflow_run"].value.startswith("http://127.0.0.1:5000/#/experiments/")
    assert "data:image/png;base64," in student["preview"].value
    assert student["steps"].value == 2  # reported by the Pipes child
    assert "loss/score" in student["final_losses"].value
    assert student["merge_kind"].value == "full" and "no champion yet" in student["merge"].value
    # No fact is shown twice (the trainer's own report is filtered to what the plan lacks).
    assert not {"student_path", "styles", "final_loss_total"} & set(student)
    evaluation = mats["evaluation"][0].metadata
    assert (
        "FD_t" in evaluation["fid_t_table"].value and "dare_ties" in evaluation["fid_t_table"].value
    )
    base = mats["base_model"][0].metadata
    lock = yaml.safe_load((built.repo / "dvc.lock").read_text())["stages"]
    assert base["dvc_md5 data/zoo"].value == lock["zoo"]["outs"][0]["md5"]
    registered = mats["registered_model"][0].metadata
    assert registered["alias"].value == "champion"
    assert registered["model"].value == f"models:/{MODEL_NAME}/{registered['version'].value}"


def test_pipes_child_streamed_every_logged_step(built):
    instance = dg.DagsterInstance.from_config(str(built.dagster_home))
    messages = [
        r.user_message
        for r in instance.all_logs(built.result.run_id)
        if r.step_key == "merged_student" and r.user_message
    ]
    assert any(m.startswith("step 1: score") for m in messages)
    assert any(m.startswith("step 2: score") for m in messages)


def test_dvc_status_is_clean_and_the_remote_holds_everything(built):
    status = run(["dvc", "status", "--json"], built.repo)
    assert json.loads(status.stdout) == {}
    cloud = run(["dvc", "status", "--cloud", "--json"], built.repo)
    assert json.loads(cloud.stdout) == {}
    stages = yaml.safe_load((built.repo / "dvc.lock").read_text())["stages"]
    per_teacher = [f"{kind}@{i}" for kind in ("samples", "teachers") for i in range(5)]
    model_layer = {"plan", "distill", "preview", "baselines", "evaluate"}
    assert {"zoo", "prompts", *per_teacher, *model_layer} <= set(stages)


def test_dvc_repro_rebuilds_the_data_layer_without_dagster(built):
    for gone in ("data/prompts", "data/teachers/neon"):
        shutil.rmtree(built.repo / gone)
    run(["dvc", "repro"], built.repo)  # restored from DVC's cache: same versions
    assert json.loads(run(["dvc", "status", "--json"], built.repo).stdout) == {}
    assert (built.repo / "data/teachers/neon/teacher.json").is_file()


def test_rerun_reuses_the_student_and_its_model_version(built):
    version_before = champion(built.tracking_uri)
    instance = dg.DagsterInstance.ephemeral()
    from tests.pipeline_support import materialize_all

    lock = (built.repo / "dvc.lock").read_text()
    result = materialize_all(built.repo, instance, resources_for(built.repo, built.tracking_uri))
    assert result.success
    mats = materializations(result)
    # DVC ran no stage again: no Pipes session reported training, nothing was rewritten.
    assert "steps" not in mats["merged_student"][0].metadata
    assert mats["merged_student"][0].metadata["merge_kind"].value == "full"
    assert (
        "champion v1 was merged from this recipe"
        in mats["merged_student"][0].metadata["merge"].value
    )
    assert (built.repo / "dvc.lock").read_text() == lock
    assert mats["registered_model"][0].metadata["reused_version"].value is True
    assert champion(built.tracking_uri) == version_before


# --- sensor and schedule -------------------------------------------------------------------


def _manifest_repo(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    shutil.copy(REPO / "data" / "teachers.yaml", tmp_path / "data" / "teachers.yaml")
    return tmp_path


def _tick(instance, repo: Path, cursor: str | None):
    from pipelines.defs.resources import ProjectResource
    from pipelines.defs.sensors import teacher_manifest_sensor

    context = dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"project": ProjectResource(repo_root=str(repo))},
    )
    result = teacher_manifest_sensor(context)
    for request in getattr(result, "dynamic_partitions_requests", None) or []:
        # What the daemon does with the sensor's partition requests.
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    return result


def test_sensor_adds_a_new_teacher_and_requests_exactly_one_remerge(tmp_path):
    repo = _manifest_repo(tmp_path)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("teachers", TEACHERS)
    first = _tick(instance, repo, None)
    assert not first.run_requests  # partitions already match: nothing to do
    manifest = repo / "data" / "teachers.yaml"
    manifest.write_text(manifest.read_text() + '  - {name: pastel2, source: "zoo:pastel"}\n')

    second = _tick(instance, repo, first.cursor)
    assert len(second.run_requests) == 1
    adds = [r for r in second.dynamic_partitions_requests]
    assert [(type(r), list(r.partition_keys)) for r in adds] == [
        (dg.AddDynamicPartitionsRequest, ["pastel2"])
    ]
    request = second.run_requests[0]
    assert request.tags["dagster/asset_partition_range_start"] == "pastel2"
    assert request.tags["dagster/asset_partition_range_end"] == "pastel2"
    assert instance.get_dynamic_partitions("teachers") == [*TEACHERS, "pastel2"]

    third = _tick(instance, repo, second.cursor)
    assert isinstance(third, dg.SkipReason) or not third.run_requests
    # Re-evaluating the same change from the old cursor names the same run: never two runs.
    again = _tick(instance, repo, first.cursor)
    assert [r.run_key for r in again.run_requests] in ([], [request.run_key])


def test_sensor_fails_a_tick_on_an_invalid_manifest_and_keeps_partitions(tmp_path):
    repo = _manifest_repo(tmp_path)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("teachers", TEACHERS)
    (repo / "data" / "teachers.yaml").write_text("teachers: [oops\n")
    with pytest.raises(dg.Failure, match="invalid YAML"):
        _tick(instance, repo, None)
    assert instance.get_dynamic_partitions("teachers") == TEACHERS


def test_nightly_schedule_covers_every_teacher_partition(tmp_path):
    from pipelines.defs.schedules import nightly

    tick = datetime.datetime(2026, 1, 2, 3, tzinfo=datetime.timezone.utc)
    # Schedule contexts re-open a persistent instance by reference; entering them
    # as context managers closes that instance again (it is process-global state).
    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=tick) as ctx:
            assert isinstance(nightly(ctx), dg.SkipReason)
        instance.add_dynamic_partitions("teachers", TEACHERS)
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=tick) as ctx:
            request = nightly(ctx)
    assert request.run_key == "nightly-2026-01-02"
    assert request.tags["dagster/asset_partition_range_start"] == "pastel"
    assert request.tags["dagster/asset_partition_range_end"] == "stripes"


def test_definitions_load_with_pools_and_a_blocking_check():
    from pipelines.definitions import defs

    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey("merged_student")).pools == {"distill"}
    assert [c.name for c in graph.asset_check_keys] == ["evaluation_gate"]
    instance_yaml = yaml.safe_load((REPO / "pipelines" / "dagster.yaml").read_text())
    assert instance_yaml["telemetry"]["enabled"] is False
    assert instance_yaml["run_coordinator"]["class"] == "DefaultRunCoordinator"
    assert instance_yaml["concurrency"]["pools"]["default_limit"] == 1


# --- bad input: clear failures, nothing committed, registry untouched ------------------------

BAD_MANIFESTS = {
    "bad YAML": ("teachers:\n  - {name: pastel, source: 'zoo:pastel'\n", "invalid YAML"),
    "duplicate names": (
        "teachers:\n  - {name: pastel, source: 'zoo:pastel'}\n"
        "  - {name: pastel, source: 'zoo:neon'}\n",
        "duplicate teacher names",
    ),
    "unknown source kind": (
        "teachers:\n  - {name: pastel, source: 'ftp://example.org/x'}\n",
        "unknown source kind",
    ),
    "path outside the repo": (
        "teachers:\n  - {name: pastel, source: '../../elsewhere/model'}\n",
        "outside the project",
    ),
}


def _state(built) -> tuple:
    return ((built.repo / "dvc.lock").read_text(), champion(built.tracking_uri))


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_malformed_manifest_fails_first_and_changes_nothing(built, case):
    text, message = BAD_MANIFESTS[case]
    manifest = built.repo / "data" / "teachers.yaml"
    good = manifest.read_text()
    before = _state(built)
    instance = dg.DagsterInstance.ephemeral()
    from pipelines.defs.asset_checks import evaluation_gate
    from pipelines.defs.assets import ASSETS

    manifest.write_text(text)
    try:
        result = dg.materialize(
            [*ASSETS, evaluation_gate],
            selection=["teacher_manifest", "base_model", "prompt_set"],
            resources=resources_for(built.repo, built.tracking_uri),
            instance=instance,
            raise_on_error=False,
        )
    finally:
        manifest.write_text(good)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "teacher_manifest"
    assert message in failure.event_specific_data.error.message
    assert not result.get_asset_materialization_events()
    assert _state(built) == before


@pytest.mark.bad_input
def test_unreachable_mlflow_fails_before_training(built, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    before = _state(built)
    student = (built.repo / "data/student/student/unet/config.json").read_text()
    resources = resources_for(built.repo, f"http://127.0.0.1:{free_port()}")
    from pipelines.defs.asset_checks import evaluation_gate
    from pipelines.defs.assets import ASSETS

    result = dg.materialize(
        [*ASSETS, evaluation_gate],
        selection=["merged_student", "evaluation", "registered_model"],
        resources=resources,
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"merged_student": {"config": {"force": True}}}},
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "merged_student"
    assert "unreachable" in failure.event_specific_data.error.message
    assert (built.repo / "data/student/student/unet/config.json").read_text() == student
    assert _state(built) == before


@pytest.mark.bad_input
@pytest.mark.parametrize("remote", ["none", "unreachable"])
def test_missing_dvc_remote_fails_before_dvc_runs(built, remote):
    config = built.repo / ".dvc" / "config"
    good = config.read_text()
    before = _state(built)
    if remote == "none":
        run(["dvc", "remote", "remove", "local"], built.repo)
        message = "no default remote"
    else:
        run(["dvc", "remote", "modify", "local", "url", "/nonexistent/dir/remote"], built.repo)
        message = "unreachable"
    from pipelines.defs.assets.data import base_model, prompt_set, teacher_manifest

    try:
        result = dg.materialize(
            [teacher_manifest, base_model, prompt_set],
            selection=["base_model", "prompt_set"],
            resources=resources_for(built.repo, built.tracking_uri),
            instance=dg.DagsterInstance.ephemeral(),
            raise_on_error=False,
        )
    finally:
        config.write_text(good)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "base_model"
    assert message in failure.event_specific_data.error.message
    assert _state(built) == before


@pytest.mark.bad_input
def test_failing_gate_blocks_registration_and_keeps_champion(built):
    before = _state(built)
    from pipelines.defs.asset_checks import evaluation_gate
    from pipelines.defs.assets import ASSETS

    result = dg.materialize(
        [*ASSETS, evaluation_gate],
        selection=["evaluation", "registered_model"],
        resources=resources_for(built.repo, built.tracking_uri),
        instance=dg.DagsterInstance.ephemeral(),
        run_config=run_config(gate={"max_fid_t_ratio": 1e-9}),
        raise_on_error=False,
    )
    assert not result.success
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 1 and not checks[0].passed
    assert "FD_t ratio" in checks[0].description
    assert "registered_model" not in materializations(result)
    assert _state(built) == before


def test_a_fresh_repo_copy_has_the_project_stages(tmp_path):
    repo = make_repo(tmp_path / "repo")
    stages = run(["dvc", "stage", "list", "--name-only"], repo).stdout.split()
    per_teacher = [f"{kind}@{i}" for kind in ("teachers", "samples") for i in range(5)]
    model_layer = ["plan", "distill", "preview", "baselines", "evaluate"]
    assert stages == ["zoo", "prompts", *per_teacher, *model_layer]


# --- incremental re-merge from the champion ---------------------------------------------


def _copy_project(built, dest: Path) -> tuple[Path, str]:
    """An independent copy of the built project (checkout, DVC remote, MLflow store)."""
    repo = dest / "repo"
    shutil.copytree(built.repo, repo, symlinks=True)
    shutil.copytree(built.repo.parent / "remote", dest / "remote")
    shutil.copy(built.repo.parent / "mlflow.db", dest / "mlflow.db")
    run(["dvc", "remote", "modify", "local", "url", str(dest / "remote")], repo)
    return repo, f"sqlite:///{dest / 'mlflow.db'}"


def test_an_added_teacher_is_merged_incrementally_and_the_guard_judges_old_styles(built, tmp_path):
    from mlflow import MlflowClient

    repo, uri = _copy_project(built, tmp_path)
    parent_version, _ = champion(uri)
    manifest = repo / "data" / "teachers.yaml"
    manifest.write_text(manifest.read_text() + '  - {name: pastel2, source: "zoo:pastel"}\n')
    resources = resources_for(repo, uri)
    gate = {**LENIENT_GATE, "old_style_tolerance": 1e9}
    result = materialize_all(repo, dg.DagsterInstance.ephemeral(), resources, gate=gate)
    assert result.success
    student = materializations(result)["merged_student"][0].metadata
    assert student["merge_kind"].value == "incremental"
    plan = json.loads((repo / "data/plan/merge_plan.json").read_text())
    assert plan["parent_version"] == parent_version
    assert plan["trained"] == ["pastel2"]  # no old teacher was trained
    lineage = json.loads((repo / "data/student/student/dmm_lineage.json").read_text())
    assert lineage["old_styles"] == TEACHERS and lineage["new_styles"] == ["pastel2"]

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    new = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(new.version) != parent_version
    assert new.tags["dmm.merge_kind"] == "incremental"
    assert new.tags["dmm.parent_version"] == parent_version
    assert new.tags["dmm.teachers"] == ",".join([*TEACHERS, "pastel2"])
    assert client.get_run(new.run_id).data.tags["dmm.merge_kind"] == "incremental"

    # The guard: old styles far worse than the parent had them would fail the gate.
    from dataclasses import replace

    from dmm.plan import read_plan
    from dmm.registry.workflow import judge

    merge_plan, _ = read_plan(repo)
    results = json.loads((repo / "data/evaluation/evaluation.json").read_text())
    assert sorted(merge_plan.parent_scores) == sorted(TEACHERS)  # with intervals and floors
    tiny = {s: 1e-6 for s in merge_plan.parent_diag_fd}
    strict = replace(merge_plan, parent_diag_fd=tiny, parent_scores={})
    gate, _ = judge(repo, strict, results, {**LENIENT_GATE, "old_style_tolerance": 0.0})
    assert not gate.passed
    for style in TEACHERS:
        assert f"old style {style}: FD" in gate.summary()
    assert "pastel2" not in gate.summary()
