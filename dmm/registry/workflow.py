"""A merge's life in MLflow, for every front end: its run, its gate, its model version.

- :func:`open_merge_run` creates the merge's run before training (or finds the
  one a crashed attempt of the same plan left), so losses arrive live.
- :func:`register_merge` is ``dmm register``: it checks the plan against the
  registry and the student against its evaluation, logs the evaluation,
  judges the gate, registers the version, sets the alias (``champion`` only
  when the gate passed) and ends the run with the verdict in its tags.

The Dagster assets call these same functions; nothing here imports dagster.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from dmm import layout, names
from dmm.atomic import DmmError, write_text_atomic
from dmm.hashing import folder_sha256
from dmm.registry.register import CHAMPION

log = logging.getLogger(__name__)


def git_commit(root: Path) -> str:
    """The checked-out commit, read from .git without running git ("unknown" outside a clone)."""
    git = Path(root) / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head.removeprefix("ref: ")
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(f" {ref}"):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


def data_hashes(root: Path, styles: list[str]) -> dict[str, str]:
    """DVC md5 of every data product the student is made from (``dvc.<path>`` keys)."""
    path = Path(root) / layout.DVC_LOCK
    if not path.is_file():
        return {}
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    wanted = {layout.ZOO, layout.PROMPTS}
    wanted |= {f"{d}/{n}" for d in (layout.SAMPLES, layout.TEACHERS) for n in styles}
    return {
        f"dvc.{o['path']}": o.get("md5", "")
        for entry in stages.values()
        for o in entry.get("outs", [])
        if o["path"] in wanted
    }


def _run_record(client, root: Path, plan) -> dict | None:
    from dmm.registry import tracking

    run = tracking.read_run_file(Path(root) / layout.STUDENT)
    if (
        run
        and run.get("fingerprint") == plan.fingerprint
        and run.get("tracking_uri") == client.tracking_uri
        and tracking.run_exists(client, run["run_id"])
    ):
        return run
    return None


def open_merge_run(client, root: Path, plan, recipe: dict, extra_tags: dict | None = None) -> dict:
    """The MLflow run of this plan's merge: reused when it exists, else created (RUNNING)."""
    from dmm.plan import read_params, registry_config
    from dmm.registry import tracking

    root = Path(root)
    found = _run_record(client, root, plan)
    if found is not None:
        tracking.set_running(client, found["run_id"])
        return found
    reg = registry_config(read_params(root))
    experiment_id = tracking.ensure_experiment(
        client, reg.experiment, tracking.artifact_root_for(client, root)
    )
    params: dict[str, Any] = {"teachers": ",".join(plan.styles), "trained": ",".join(plan.trained)}
    if recipe.get("action") == "distill":
        params["distill"] = {k: v for k, v in recipe["config"].items() if k != "teachers"}
    tags = {
        **plan.tags,
        names.STYLES_TAG: ",".join(plan.styles),
        names.GIT_COMMIT_TAG: git_commit(root),
        **(extra_tags or {}),
    }
    run_id = tracking.start_merge_run(
        client,
        experiment_id,
        run_name=f"merge-{len(plan.styles)}-styles-{plan.fingerprint[:8]}",
        params=params,
        tags=tags,
    )
    record = {
        "run_id": run_id,
        "experiment_id": experiment_id,
        "tracking_uri": client.tracking_uri,
        "fingerprint": plan.fingerprint,
    }
    tracking.write_run_file(root / layout.STUDENT, record)
    return record


def evaluated_results(root: Path, student_sha: str) -> dict:
    """The evaluation of exactly this student, or a one-line error."""
    root = Path(root)
    subject = root / layout.EVALUATED
    full = root / layout.EVALUATION / "evaluation.json"
    if not subject.is_file() or not full.is_file():
        raise DmmError(
            f"the student has no evaluation ({layout.EVALUATED} is missing): "
            "run `dvc repro evaluate` (or `dmm evaluate --plan`) first"
        )
    if json.loads(subject.read_text()).get("student_sha256") != student_sha:
        raise DmmError(
            f"{layout.EVALUATION} holds the evaluation of another student: "
            "run `dvc repro evaluate` (or `dmm evaluate --plan`) again"
        )
    return json.loads(full.read_text())


def judge(root: Path, plan, results: dict, overrides: dict | None = None):
    """The evaluation gate for this plan's student (thresholds: params.yaml ``registry.gate``)."""
    from dmm.plan import read_params, registry_config
    from dmm.registry.gate import GateThresholds, StyleScore, check_gate

    reg = registry_config(read_params(root))
    thresholds = GateThresholds(**{**reg.gate.model_dump(), **(overrides or {})})
    previous = None
    if plan.recipe_kind == "incremental":
        previous = {n: StyleScore(**d) for n, d in plan.parent_scores.items()} or dict(
            plan.parent_diag_fd
        )
    return check_gate(results, thresholds, previous), thresholds


def _check_student(root: Path, plan) -> tuple[Path, str]:
    from dmm.registry.register import student_styles

    student = Path(root) / layout.STUDENT / "student"
    if not (student / "model_index.json").is_file():
        raise DmmError(f"no student at {student}: run `dvc repro distill` first")
    styles = student_styles(student)
    if styles != plan.styles:
        raise DmmError(
            f"the student's styles {styles} are not the plan's {plan.styles}: "
            "run `dvc repro distill` again"
        )
    return student, folder_sha256(student)


def log_evaluation(root: Path, client, results: dict | None = None) -> dict:
    """Log the plan's student's evaluation into its merge run once; returns the run record.

    Also logs the step losses when the trainer could not log them live, and the
    plan files (the next plan finds an incremental champion's recipe there).
    """
    from dmm.plan import read_plan
    from dmm.registry import tracking

    root = Path(root).resolve()
    plan, recipe = read_plan(root)
    _, sha = _check_student(root, plan)
    results = results if results is not None else evaluated_results(root, sha)
    run = open_merge_run(client, root, plan, recipe)
    data = client.get_run(run["run_id"]).data
    if data.tags.get(names.EVALUATED_TAG) == sha:
        return run
    if not any(k.startswith("loss/") for k in data.metrics):
        metrics = tracking.read_metrics_jsonl(root / layout.STUDENT / "metrics.jsonl")
        tracking.log_step_metrics(client, run["run_id"], metrics)
    tracking.log_evaluation(client, run["run_id"], results, root / layout.EVALUATION)
    client.log_artifacts(run["run_id"], str(root / layout.PLAN_DIR), "plan")
    tracking.set_tags(client, run["run_id"], {names.EVALUATED_TAG: sha})
    return run


def close_refused(root: Path, client, summary: str) -> None:
    """End the merge run of a student the gate refused: FINISHED, with the verdict."""
    from dmm.registry import tracking

    run = tracking.read_run_file(Path(root) / layout.STUDENT)
    if run and tracking.run_exists(client, run["run_id"]):
        tags = {names.GATE_TAG: "failed", names.GATE_SUMMARY_TAG: summary[:4000]}
        tracking.set_tags(client, run["run_id"], tags)
        tracking.finish_run(client, run["run_id"])


def register_merge(
    root: Path,
    client,
    *,
    gate_overrides: dict | None = None,
    verdict: tuple[bool, str] | None = None,
    extra_tags: dict | None = None,
):
    """``dmm register``: returns (the registered version, passed, the gate's summary).

    ``verdict`` lets an orchestrator pass the gate it already judged (Dagster's
    blocking check); by default the gate is judged here, with ``gate_overrides``.
    """
    from dmm.plan import check_parent, read_params, read_plan, registry_config
    from dmm.registry import tracking
    from dmm.registry.register import register_student

    root = Path(root).resolve()
    plan, recipe = read_plan(root)
    reg = registry_config(read_params(root))
    check_parent(root, plan, client, reg.model_name)
    student, sha = _check_student(root, plan)
    results = evaluated_results(root, sha)
    run = open_merge_run(client, root, plan, recipe, extra_tags)
    log_evaluation(root, client, results)
    if verdict is None:
        gate, _ = judge(root, plan, results, gate_overrides)
        verdict = (gate.passed, gate.summary())
    passed, summary = verdict
    tags = {
        **plan.tags,
        names.STYLES_TAG: ",".join(plan.styles),
        names.GIT_COMMIT_TAG: git_commit(root),
        **data_hashes(root, plan.styles),
        **(extra_tags or {}),
    }
    registered = register_student(
        client,
        model_name=reg.model_name,
        run_id=run["run_id"],
        student_dir=student,
        passed=passed,
        tags=tags,
        merge_kind=plan.recipe_kind,
        parent_version=plan.parent_version,
    )
    tracking.set_tags(
        client,
        run["run_id"],
        {names.GATE_TAG: "passed" if passed else "failed", names.GATE_SUMMARY_TAG: summary[:4000]},
    )
    tracking.finish_run(client, run["run_id"])
    card = version_card(root, plan, registered, results, summary)
    client.update_model_version(registered.name, registered.version, description=card)
    record = {"name": registered.name, "version": registered.version, "alias": registered.alias}
    write_text_atomic(root / layout.STUDENT / names.REGISTERED_FILE, json.dumps(record, indent=2))
    if registered.alias == CHAMPION:
        promote(root, student, registered.student_sha256, record)
    return registered, passed, summary


def version_card(root: Path, plan, registered, results: dict, summary: str) -> str:
    """The model card of a registered version (its description in the registry)."""
    from dmm.student.card import model_card
    from dmm.teachers.manifest import load_manifest

    manifest = load_manifest(Path(root) / layout.MANIFEST, repo_root=Path(root))
    entries = {t.name: t for t in manifest.teachers}
    teachers = [
        {
            "name": n,
            "source": entries[n].origin if n in entries else "(retired from the manifest)",
            "sha256": plan.teacher_sha256.get(n, ""),
            "license": getattr(entries.get(n), "license", None),
        }
        for n in plan.styles
    ]
    return model_card(
        plan.styles,
        name=registered.name,
        folder=layout.CHAMPION,
        base=manifest.base,
        teachers=teachers,
        merge_kind=plan.recipe_kind,
        parent_version=plan.parent_version or None,
        evaluation=results,
        gate_verdict=summary,
        sample_grid=f"{layout.PREVIEW}/grid.png",
    )


def promote(root: Path, student: Path, sha: str, record: dict) -> Path:
    """Make ``student`` the champion's working copy (data/champion), atomically."""
    import shutil

    from dmm.atomic import atomic_dir

    target = Path(root) / layout.CHAMPION
    current = target / names.REGISTERED_FILE
    if current.is_file() and json.loads(current.read_text()).get("student_sha256") == sha:
        return target
    with atomic_dir(target) as tmp:
        shutil.copytree(student, tmp, dirs_exist_ok=True)
        (tmp / names.REGISTERED_FILE).write_text(
            json.dumps({**record, "student_sha256": sha}, indent=2)
        )
    log.info("champion v%s is now the working copy at %s", record["version"], target)
    return target
