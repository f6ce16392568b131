"""The model layer: distilled student, static baselines, evaluation, registered model.

Distillation runs as ``accelerate launch -m dmm.distill.pipes_entry`` through
Dagster Pipes: this process never loads a model, and the same command scales to
many GPUs or nodes through the compute resource's Accelerate config.
"""

import json
import os
import tempfile
from pathlib import Path

import dagster as dg
import yaml

from dmm.atomic import DmmError, write_text_atomic
from pipelines import layout
from pipelines.defs import memo
from pipelines.defs.assets.data import (
    base_model,
    prompt_set,
    teacher_records,
    teacher_samples,
    teachers,
)
from pipelines.defs.config import (
    BaselinesRunConfig,
    DistillRunConfig,
    EvaluateRunConfig,
    RegisterRunConfig,
    validated,
)
from pipelines.defs.metadata import (
    dmm_source,
    dvc_metadata,
    fid_table,
    fingerprint,
    md_table,
    png_preview,
    source_hash,
    unet_sha256,
)
from pipelines.defs.partitions import SINGLE_RUN
from pipelines.defs.resources import (
    ComputeResource,
    DvcResource,
    MlflowResource,
    ProjectResource,
    tool_env,
)

GROUP = "models"
EVALUATION_GATE = "evaluation_gate"


def _teacher_names(project: ProjectResource) -> list[str]:
    return [t.name for t in project.manifest().teachers]


def _data_hashes(dvc: DvcResource, names: list[str], project: ProjectResource) -> dict[str, str]:
    """DVC md5 of every data product a student is made from, keyed for MLflow tags."""
    index = {t.name: i for i, t in enumerate(project.manifest().teachers)}
    stages = [
        "zoo",
        "prompts",
        *(layout.sample_stage(index[n]) for n in names),
        *(layout.teacher_stage(index[n]) for n in names),
    ]
    return {f"dvc.{path}": md5 for s in stages for path, md5 in dvc.out_hashes(s).items()}


def _git_commit(root: Path) -> str:
    """The checked-out commit, read from .git without running git ("unknown" outside a clone)."""
    git = root / ".git"
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


def _distill_config(
    project: ProjectResource,
    compute: ComputeResource,
    names: list[str],
    overrides: list[str],
    extra: dict | None = None,
):
    from dmm.distill.config import DistillConfig

    manifest = project.manifest()
    base = {
        **project.section("distill"),
        **(extra or {}),
        "base": project.relative(project.base_dir(manifest)),
        "teachers": [
            {
                "name": n,
                "path": f"{layout.TEACHERS}/{n}",
                "samples": f"{layout.SAMPLES}/{n}",
            }
            for n in names
        ],
        "mixed_precision": compute.mixed_precision,
        # Pipes reports progress to Dagster; a tqdm bar would only clutter the log.
        "progress": False,
    }
    return validated(DistillConfig, base, overrides, "distill")


def _plan_merge(context, config, project, client, registry, names, records):
    """The merge to run (full / incremental / unchanged) and, if incremental, its parent folder."""
    from dmm.distill.trainer import base_fingerprint
    from dmm.registry import lineage

    champion = lineage.read_champion(client, registry.model_name)
    base_sha = base_fingerprint(project.base_dir(project.manifest()))
    mode = "full" if config.full_merge else registry.merge
    plan = lineage.plan_merge(
        champion, names, {n: str(r.get("sha256")) for n, r in records.items()}, base_sha, mode
    )
    context.log.info("merge plan: %s (%s)", plan.kind, plan.reason)
    parent = None
    if plan.kind == "incremental":
        try:
            parent = lineage.fetch_parent_student(
                client, registry.model_name, champion, project.path(layout.PARENTS)
            )
        except DmmError as exc:
            raise dg.Failure(description=str(exc)) from exc
    return plan, champion, parent


@dg.asset(
    group_name=GROUP,
    deps=[teacher_samples, base_model],
    kinds={"accelerate", "pytorch", "mlflow"},
    pool="distill",
    backfill_policy=SINGLE_RUN,
    description="The DMM student: every teacher distilled into one style-promptable model "
    "(`accelerate launch -m dmm.distill.pipes_entry` through Dagster Pipes).",
)
def merged_student(
    context: dg.AssetExecutionContext,
    config: DistillRunConfig,
    project: ProjectResource,
    compute: ComputeResource,
    mlflow: MlflowResource,
    dvc: DvcResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
):
    from dmm.registry import lineage, tracking
    from dmm.registry.config import RegistryConfig
    from dmm.registry.register import student_sha256
    from dmm.student.edit import retire_styles

    client = mlflow.client()  # an unreachable server fails now, not after training
    registry = validated(RegistryConfig, project.section("registry"), [], "registry")
    names = _teacher_names(project)
    root = project.root
    records = teacher_records(project, names)
    plan, champion, parent = _plan_merge(context, config, project, client, registry, names, records)
    cfg = _distill_config(project, compute, names, config.overrides)
    out_dir = root / cfg.output_dir
    student = out_dir / "student"
    keep = False
    if plan.kind == "unchanged":
        # Same teachers as the champion. A full merge reuses its student through the
        # fingerprint below (a changed config or code merges again); an incremental
        # champion is kept as is, as re-merging it from scratch needs `full_merge`.
        recorded = lineage.read_plan(out_dir)
        keep = (
            not config.force
            and recorded is not None
            and recorded.kind == "incremental"
            and (student / "model_index.json").is_file()
            and student_sha256(student) == champion.student_sha
        )
        plan = recorded if keep else lineage.MergePlan("full", plan.reason)
    trained = plan.new + plan.replace if plan.kind == "incremental" else names
    if keep:
        fp = memo.read_memo(out_dir).get("fingerprint") or student_sha256(student)
    else:
        if plan.kind == "incremental" and trained:
            cfg = _distill_config(
                project,
                compute,
                trained,
                config.overrides,
                extra={
                    **registry.incremental,
                    "init_from": project.relative(parent),
                    "retire": plan.retire,
                    "replace": plan.replace,
                },
            )
        sample_index = {
            n: json.loads((root / layout.SAMPLES / n / "index.json").read_text()) for n in trained
        }
        fp = fingerprint(
            {
                "config": cfg.model_dump(mode="json", exclude={"progress", "log_with", "resume"}),
                "plan": [plan.kind, plan.parent_version, plan.retire],
                "parent": champion.student_sha if plan.kind == "incremental" else None,
                "teachers": {n: records[n].get("sha256") for n in trained},
                "samples": {
                    n: (i["prompts_sha256"], i["teacher_sha256"], i["num_samples"], i["config"])
                    for n, i in sample_index.items()
                },
                "code": source_hash(dmm_source(root, "distill"), dmm_source(root, "student")),
            }
        )
    reused = keep or (
        not config.force and memo.is_current(out_dir, fp, student / "model_index.json")
    )
    metadata: dict = {}
    losses: list[dict] = []
    if reused:
        context.log.info("student at %s is up to date (fingerprint %s)", student, fp[:12])
    elif plan.kind == "incremental" and not trained:
        # Only retirements: drop their style vectors, every other style is bit-identical.
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        retire_styles(parent, plan.retire, student)
        memo.write_memo(out_dir, fp)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            fh.write(cfg.model_dump_json())
        try:
            invocation = pipes_subprocess_client.run(
                context=context,
                command=compute.launch_command("dmm.distill.pipes_entry", ["--config", fh.name]),
                cwd=str(root),
                env=tool_env(),
            )
        finally:
            os.unlink(fh.name)
        metadata.update(invocation.get_materialize_result().metadata)
        losses = [
            m["record"]
            for m in invocation.get_custom_messages()
            if isinstance(m, dict) and m.get("kind") == "metrics"
        ]
        memo.write_memo(out_dir, fp)
    if not keep:
        lineage.write_plan(out_dir, plan)
    if not losses:
        losses = tracking.read_metrics_jsonl(out_dir / "metrics.jsonl")

    preview_dir = root / layout.PREVIEW
    preview_fp = fingerprint({"student": fp, "steps": config.preview_steps})
    if not memo.is_current(preview_dir, preview_fp, preview_dir / "grid.png"):
        project.run(
            context,
            [
                "dmm", "generate", "--student", str(student), "--grid", *layout.PREVIEW_PROMPTS,
                "--out", str(preview_dir), "--steps", str(config.preview_steps),
            ],
            "preview grid (dmm generate --grid)",
        )  # fmt: skip
        memo.write_memo(preview_dir, preview_fp)

    # One MLflow run per merge: a reused student keeps its run when this store has it.
    run = tracking.read_run_file(out_dir)
    if not (
        run
        and run.get("fingerprint") == fp
        and run.get("tracking_uri") == client.tracking_uri
        and tracking.run_exists(client, run["run_id"])
    ):
        experiment_id = mlflow.experiment_id(client, registry.experiment)
        run_id = tracking.start_merge_run(
            client,
            experiment_id,
            run_name=f"merge-{len(names)}-teachers-{fp[:8]}",
            params={
                "distill": cfg.model_dump(mode="json", exclude={"teachers"}),
                "teachers": ",".join(names),
                "compute": compute.model_dump(),
            },
            tags={
                "dmm.fingerprint": fp,
                "dmm.git_commit": _git_commit(root),
                "dmm.merge_kind": plan.merge_kind,
                "dmm.parent_version": plan.parent_version if plan.kind == "incremental" else "",
                "dmm.merge_reason": plan.reason,
                "dagster.run_id": context.run.run_id,
                **{f"dmm.teacher.{n}.sha256": str(r.get("sha256")) for n, r in records.items()},
                **_data_hashes(dvc, names, project),
            },
        )
        tracking.log_step_metrics(client, run_id, losses)
        client.log_artifact(run_id, str(preview_dir / "grid.png"), "preview")
        run = {
            "run_id": run_id,
            "experiment_id": experiment_id,
            "tracking_uri": client.tracking_uri,
            "fingerprint": fp,
        }
        tracking.write_run_file(out_dir, run)

    last = losses[-1] if losses else {}
    loss_rows = [(k, v) for k, v in last.items() if k.startswith(("loss/", "loss_score/"))]
    metadata.update(
        {
            "path": dg.MetadataValue.path(str(student)),
            "reused": reused,
            "fingerprint": fp,
            "styles": dg.MetadataValue.json(names),
            "merge_kind": plan.merge_kind,
            "merge_reason": plan.reason,
            "parent_version": plan.parent_version if plan.kind == "incremental" else "",
            "trained_teachers": dg.MetadataValue.json(trained),
            "final_losses": dg.MetadataValue.md(
                md_table(["loss", f"step {last.get('step', '?')}"], loss_rows)
            ),
            "preview": png_preview(preview_dir / "grid.png", "one row per style"),
            "mlflow_run": dg.MetadataValue.url(
                tracking.run_url(mlflow.ui_url, run["experiment_id"], run["run_id"])
            ),
            "mlflow_run_id": run["run_id"],
        }
    )
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(fp))


@dg.asset(
    group_name=GROUP,
    deps=[teachers, base_model],
    kinds={"safetensors"},
    backfill_policy=SINGLE_RUN,
    description="Static merges of the same teachers (weighted, task arithmetic, TIES, DARE): "
    "what the student must beat (`dmm merge`).",
)
def static_baselines(
    context: dg.AssetExecutionContext,
    config: BaselinesRunConfig,
    project: ProjectResource,
):
    from dmm.merge.config import METHOD_PARAMS

    unknown = sorted(set(config.methods) - set(METHOD_PARAMS))
    if unknown:
        raise dg.Failure(
            description=f"unknown merge methods {unknown}; known: {sorted(METHOD_PARAMS)}"
        )
    names = _teacher_names(project)
    records = teacher_records(project, names)
    base = project.relative(project.base_dir(project.manifest()))
    rows = []
    for method in config.methods:
        out = project.path(layout.BASELINES) / method
        fp = fingerprint(
            {
                "method": method,
                "teachers": [(n, records[n].get("sha256")) for n in names],
                "base": unet_sha256(project.path(base)),
                "code": source_hash(dmm_source(project.root, "merge")),
            }
        )
        reused = not config.force and memo.is_current(out, fp, out / "model_index.json")
        if not reused:
            teacher_args = [a for n in names for a in ("--teacher", f"{layout.TEACHERS}/{n}")]
            project.run(
                context,
                ["dmm", "merge", "--method", method, "--base", base,
                 *teacher_args, "--out", str(out.relative_to(project.root))],
                f"dmm merge --method {method}",
            )  # fmt: skip
            memo.write_memo(out, fp)
        rows.append((method, "reused" if reused else "merged", str(out.relative_to(project.root))))
    return dg.MaterializeResult(
        metadata={
            "baselines": dg.MetadataValue.md(md_table(["method", "status", "path"], rows)),
            "teachers": dg.MetadataValue.json(names),
        }
    )


@dg.asset(
    group_name=GROUP,
    deps=[merged_student, static_baselines, prompt_set],
    kinds={"mlflow"},
    backfill_policy=SINGLE_RUN,
    description="The FID_t protocol: student vs teachers vs static baselines (`dmm evaluate`); "
    "the report and metrics go to the merge's MLflow run.",
)
def evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluateRunConfig,
    project: ProjectResource,
    mlflow: MlflowResource,
):
    from dmm.evaluation.config import EvaluateConfig
    from dmm.registry import tracking
    from dmm.registry.register import student_sha256

    client = mlflow.client()
    root = project.root
    run = _merge_run(client, root / layout.STUDENT)
    names = _teacher_names(project)
    baselines = {
        m: f"{layout.BASELINES}/{m}"
        for m in layout.BASELINE_METHODS
        if (root / layout.BASELINES / m / "model_index.json").is_file()
    }
    base = {
        **project.section("evaluate"),
        "student": f"{layout.STUDENT}/student",
        "teachers": [{"name": n, "path": f"{layout.TEACHERS}/{n}"} for n in names],
        "baselines": baselines,
        "output_dir": layout.EVALUATION,
        "distill_dir": layout.STUDENT,
    }
    cfg = validated(EvaluateConfig, base, config.overrides, "evaluate")
    out = root / cfg.output_dir
    fp = fingerprint(
        {
            "config": cfg.model_dump(mode="json"),
            "student": student_sha256(root / cfg.student),
            "baselines": {
                m: memo.read_memo(root / p).get("fingerprint") for m, p in baselines.items()
            },
            "teachers": {n: r.get("sha256") for n, r in teacher_records(project, names).items()},
            "prompts": (root / cfg.prompts).read_text(),
            "code": source_hash(dmm_source(root, "evaluation")),
        }
    )
    reused = not config.force and memo.is_current(out, fp, out / "evaluation.json")
    if not reused:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
            yaml.safe_dump({"evaluate": cfg.model_dump(mode="json")}, fh)
        try:
            project.run(context, ["dmm", "evaluate", "--config", fh.name], "dmm evaluate")
        finally:
            os.unlink(fh.name)
    results = json.loads((out / "evaluation.json").read_text())
    # A reused evaluation is logged again only into a run that lacks it.
    if not reused or memo.read_memo(out).get("logged_run_id") != run["run_id"]:
        tracking.log_evaluation(client, run["run_id"], results, out)
    memo.write_memo(out, fp, logged_run_id=run["run_id"])
    style = names[0]
    return dg.MaterializeResult(
        metadata={
            "report": dg.MetadataValue.path(str(out / "report.html")),
            "fid_t": float(results["fid_t"]),
            "fid_t_ref": float(results["fid_t_ref"]),
            "fid_t_ratio": float(results["fid_t_ratio"]),
            "feature_extractor": results["feature_extractor"],
            "fid_t_table": dg.MetadataValue.md(fid_table(results)),
            "grid_preview": png_preview(
                out / f"grid_{style}.png", f"style {style}: teacher, student, baselines"
            ),
            "reused": reused,
            "mlflow_run": dg.MetadataValue.url(
                tracking.run_url(mlflow.ui_url, run["experiment_id"], run["run_id"])
            ),
        },
        data_version=dg.DataVersion(fp),
    )


def _merge_run(client, student_root: Path) -> dict:
    from dmm.registry.tracking import require_run

    try:
        return require_run(client, student_root)
    except DmmError as exc:
        raise dg.Failure(description=str(exc)) from exc


def gate_passed(instance: dg.DagsterInstance) -> tuple[bool, str]:
    """Did the latest evaluation gate pass, for the latest evaluation materialization?"""
    check_key = dg.AssetCheckKey(dg.AssetKey("evaluation"), EVALUATION_GATE)
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([check_key]).get(
        check_key
    )
    evaluation_event = instance.fetch_materializations(dg.AssetKey("evaluation"), limit=1)
    if record is None or record.evaluation is None or not evaluation_event.records:
        return False, "the evaluation gate has not run"
    target = record.evaluation.target_materialization_data
    if target is None or target.storage_id != evaluation_event.records[0].storage_id:
        return False, "the evaluation gate ran on an older evaluation"
    if not record.evaluation.passed:
        return False, record.evaluation.description or "the evaluation gate failed"
    return True, "the evaluation gate passed"


@dg.asset(
    group_name=GROUP,
    deps=[evaluation],
    kinds={"mlflow"},
    backfill_policy=SINGLE_RUN,
    description="The student as a version of the MLflow registered model (pyfunc). "
    "Alias `champion` when the evaluation gate passed, else `challenger`.",
)
def registered_model(
    context: dg.AssetExecutionContext,
    config: RegisterRunConfig,
    project: ProjectResource,
    mlflow: MlflowResource,
    dvc: DvcResource,
):
    from dmm.registry import lineage, tracking
    from dmm.registry.config import RegistryConfig
    from dmm.registry.register import register_student, student_styles

    client = mlflow.client()
    root = project.root
    registry = validated(RegistryConfig, project.section("registry"), config.overrides, "registry")
    run = _merge_run(client, root / layout.STUDENT)
    passed, why = gate_passed(context.instance)
    context.log.info(why)
    names = _teacher_names(project)
    student = root / layout.STUDENT / "student"
    plan = lineage.read_plan(root / layout.STUDENT)
    kind = plan.merge_kind if plan else "full"
    student_lineage = json.loads((student / "dmm_lineage.json").read_text())
    tags = {
        "dmm.git_commit": _git_commit(root),
        # What the next merge plans against: the student's own style order and base.
        lineage.STYLES_TAG: ",".join(student_styles(student)),
        lineage.BASE_TAG: student_lineage.get("base_sha256", ""),
        "dagster.run_id": context.run.run_id,
        **{
            f"dmm.teacher.{n}.sha256": str(r.get("sha256"))
            for n, r in teacher_records(project, names).items()
        },
        **_data_hashes(dvc, names, project),
    }
    try:
        reg = register_student(
            client,
            model_name=registry.model_name,
            run_id=run["run_id"],
            student_dir=student,
            passed=passed,
            tags=tags,
            merge_kind=kind,
            parent_version=plan.parent_version if kind == "incremental" else "",
        )
    except DmmError as exc:
        raise dg.Failure(description=str(exc)) from exc
    tracking.finish_run(client, run["run_id"])
    write_text_atomic(
        root / layout.STUDENT / "registered.json",
        json.dumps({"name": reg.name, "version": reg.version, "alias": reg.alias}, indent=2),
    )
    return dg.MaterializeResult(
        metadata={
            "model": f"models:/{reg.name}@{reg.alias}",
            "version": reg.version,
            "alias": reg.alias,
            "reused_version": reg.reused,
            "merge_kind": kind,
            "gate": why,
            "student_sha256": reg.student_sha256,
            "mlflow_model": dg.MetadataValue.url(
                tracking.model_version_url(mlflow.ui_url, reg.name, reg.version)
            ),
            "mlflow_run": dg.MetadataValue.url(
                tracking.run_url(mlflow.ui_url, run["experiment_id"], run["run_id"])
            ),
            **dvc_metadata(
                {k.removeprefix("dvc."): v for k, v in _data_hashes(dvc, names, project).items()}
            ),
        },
        data_version=dg.DataVersion(reg.student_sha256),
    )
