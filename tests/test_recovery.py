"""A run killed hard frees its pool slot without manual steps, and the merge resumes.

``kill -9`` of a materialization leaves its Dagster run STARTED and its pool
slot claimed; the dead-run sensor (pipelines/defs/recovery.py) must mark it
failed and free the slot, and never touch a live run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg

from pipelines.defs.recovery import dead_run_sensor, process_started_at, recover_dead_runs
from tests.pipeline_support import REPO, tool_env

POOLED_JOB = textwrap.dedent(
    """
    import sys, time
    import dagster as dg

    @dg.asset(pool="distill")
    def slow() -> None:
        print("claimed", flush=True)
        time.sleep(600)

    instance = dg.DagsterInstance.from_config(sys.argv[1])
    dg.materialize([slow], instance=instance)
    """
)


def _instance(home: Path) -> dg.DagsterInstance:
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text((REPO / "pipelines" / "dagster.yaml").read_text())
    return dg.DagsterInstance.from_config(str(home))


def _claimed(instance: dg.DagsterInstance, pool: str = "distill") -> int:
    return len(instance.event_log_storage.get_concurrency_info(pool).claimed_slots)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _start(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        env=tool_env(PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def _kill(proc: subprocess.Popen) -> float:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return time.monotonic()


def test_live_runs_are_kept_and_a_killed_run_frees_its_slot(tmp_path):
    instance = _instance(tmp_path / "home")
    proc = _start(["-c", POOLED_JOB, str(tmp_path / "home")])
    try:
        _wait(lambda: _claimed(instance) == 1, 120, "the pooled step to claim its slot")
        (run,) = instance.get_runs()
        assert recover_dead_runs(instance) == []  # alive: untouched
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
    finally:
        killed_at = _kill(proc)
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
    assert _claimed(instance) == 1  # what Dagster alone leaves behind

    tick = dead_run_sensor(dg.build_sensor_context(instance=instance))
    freed_after = time.monotonic() - killed_at
    assert "marked failed, 1 pool slot(s) freed" in tick.skip_message
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    assert _claimed(instance) == 0
    print(f"\nslot freed {freed_after:.2f} s after the kill (one sensor tick)")
    assert recover_dead_runs(instance) == []  # idempotent


def test_process_start_times_tell_a_reused_pid_from_the_original():
    me = process_started_at(os.getpid())
    assert me is not None and me <= time.time()
    child = subprocess.Popen(["sleep", "0"])
    child.wait()
    assert process_started_at(child.pid) is None


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import dagster as dg
    from tests.test_recovery import materialize_student

    repo, uri, home = sys.argv[1:4]
    materialize_student(Path(repo), uri, dg.DagsterInstance.from_config(home))
    """
)
STEPS, EVERY = 40, 4


def materialize_student(repo: Path, uri: str, instance: dg.DagsterInstance):
    """merged_student alone, with enough steps to be killed mid-distillation."""
    from pipelines.defs.assets import ASSETS
    from pipelines.defs.config import DistillSettings, EvaluateSettings
    from pipelines.defs.resources import MergeRequestResource
    from tests.pipeline_support import DISTILL_SETTINGS, EVALUATE_SETTINGS, resources_for

    resources = resources_for(repo, uri)
    settings = {**DISTILL_SETTINGS, "steps": STEPS, "checkpoint_every": EVERY}
    resources["merge_request"] = MergeRequestResource(
        distill=DistillSettings(**settings), evaluate=EvaluateSettings(**EVALUATE_SETTINGS)
    )
    return dg.materialize(ASSETS, selection=["merged_student"], resources=resources,
                          instance=instance)  # fmt: skip


def _sealed_steps(repo: Path) -> list[int]:
    from dmm.distill.checkpoints import list_checkpoints

    return [step for step, _ in list_checkpoints(repo / "data" / "student" / "checkpoints")]


def test_kill_9_mid_distillation_then_the_next_merge_resumes(built, tmp_path):
    from tests.test_pipeline import _copy_project, materializations

    repo, uri = _copy_project(built, tmp_path)
    home = tmp_path / "home"
    instance = _instance(home)
    proc = _start(["-c", CHILD, str(repo), uri, str(home)], cwd=REPO)
    try:
        _wait(lambda: any(s >= 2 * EVERY for s in _sealed_steps(repo)), 600, "two checkpoints")
    except AssertionError:
        _kill(proc)
        raise AssertionError(proc.stdout.read()[-3000:]) from None
    killed_at = _kill(proc)
    sealed = max(_sealed_steps(repo))
    assert 0 < sealed < STEPS
    (run,) = instance.get_runs()
    assert _claimed(instance) == 1

    tick = dead_run_sensor(dg.build_sensor_context(instance=instance))
    freed_after = time.monotonic() - killed_at
    assert run.run_id in tick.skip_message and _claimed(instance) == 0

    result = materialize_student(repo, uri, instance)
    assert result.success
    meta = materializations(result)["merged_student"][0].metadata
    assert meta["resumed_from_step"].value == sealed
    assert meta["steps"].value == STEPS
    assert not (repo / "data" / "student" / ".lock").exists()
    records = [
        json.loads(x) for x in (repo / "data/student/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # one record per step
    print(f"\nslot freed {freed_after:.2f} s after the kill; resumed at step {sealed} of {STEPS}")


def test_a_killed_runs_leftovers_are_cleaned_and_other_hosts_files_kept(tmp_path):
    import socket

    from dmm.atomic import exclusive_lock
    from dmm.workflow_cli import RUN_CONFIG_PREFIX, _remove_stale_run_configs

    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()
    host = socket.gethostname()
    files = {
        "dead": tmp_path / f"{RUN_CONFIG_PREFIX}{host}-{dead.pid}-x1.json",
        "live": tmp_path / f"{RUN_CONFIG_PREFIX}{host}-{os.getpid()}-x2.json",
        "other host": tmp_path / f"{RUN_CONFIG_PREFIX}elsewhere-{dead.pid}-x3.json",
    }
    for path in files.values():
        path.write_text("{}")
    _remove_stale_run_configs(tmp_path)
    assert {k for k, p in files.items() if p.exists()} == {"live", "other host"}

    (tmp_path / ".lock").write_text("")  # left by a killed holder: nobody holds it
    with exclusive_lock(tmp_path, "distillation"):
        pass
    assert not (tmp_path / ".lock").exists()
