"""The model layer: the merged student, the static baselines, the evaluation, the registered model.

Every decision is dmm's (``dmm.plan``, ``dmm.registry.workflow``); these assets
say when it runs and what the UI shows. Distillation runs as the DVC stage
``distill`` through Dagster Pipes, so ``dvc repro`` alone trains the same student.
"""

import json

import dagster as dg

from dmm import layout, names
from pipelines.defs.assets.data import (
    CODE_VERSION,
    base_model,
    prompt_set,
    teacher_samples,
    teachers,
)
from pipelines.defs.config import (
    BaselinesRunConfig,
    DistillRunConfig,
    EvaluateRunConfig,
    failure_from,
)
from pipelines.defs.metadata import fid_table, md_table, png_preview, student_metadata
from pipelines.defs.partitions import SINGLE_RUN
from pipelines.defs.resources import (
    ComputeResource,
    DvcResource,
    MergeRequestResource,
    MlflowResource,
    ProjectResource,
)

GROUP = "models"
EVALUATION_GATE = "evaluation_gate"
# What the trainer reports through Pipes that the plan does not already say.
PIPES_METADATA = ("steps", "resumed_from_step", "world_size", "train_seconds", "teacher_placement")


@dg.asset(
    group_name=GROUP,
    deps=[teacher_samples, base_model],
    kinds={"accelerate", "pytorch", "mlflow"},
    pool="distill",
    backfill_policy=SINGLE_RUN,
    code_version=CODE_VERSION,
    description="The DMM student: the merge `dmm plan` decides (full, incremental from the "
    "champion, or unchanged), trained by the DVC stage `distill` through Dagster Pipes.",
)
def merged_student(
    context: dg.AssetExecutionContext,
    config: DistillRunConfig,
    project: ProjectResource,
    compute: ComputeResource,
    mlflow: MlflowResource,
    dvc: DvcResource,
    merge_request: MergeRequestResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
):
    client = mlflow.client()  # an unreachable server fails now, not after training
    project.write_request(merge_request.request(compute))
    plan, _, _ = project.plan(client)
    context.log.info("merge plan: %s (%s)", plan.kind, plan.reason)
    invocation = dvc.repro_with_pipes(
        context,
        ["plan", "distill", "preview"],
        pipes_subprocess_client,
        env={**compute.env(), **mlflow.env()},
        force=["distill"] if config.force else (),
    )
    losses = [
        m["record"]
        for m in invocation.get_custom_messages()
        if isinstance(m, dict) and m.get("kind") == "metrics"
    ]
    reported = invocation.get_materialize_result().metadata
    metadata = {
        **{k: v for k, v in reported.items() if k in PIPES_METADATA},
        **student_metadata(project.root, plan, losses, mlflow.ui_url),
    }
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(plan.fingerprint))


@dg.asset(
    group_name=GROUP,
    deps=[teachers, base_model],
    kinds={"safetensors"},
    backfill_policy=SINGLE_RUN,
    code_version=CODE_VERSION,
    description="Static merges of the same teachers (weighted, task arithmetic, TIES, DARE): "
    "what the student must beat (the DVC stage `baselines`, `dmm baselines`).",
)
def static_baselines(
    context: dg.AssetExecutionContext,
    config: BaselinesRunConfig,
    project: ProjectResource,
    dvc: DvcResource,
):
    dvc.repro(context, ["baselines"], force=config.force)
    rows = []
    for record in sorted(project.path(layout.BASELINES).glob("*/merge.json")):
        merge = json.loads(record.read_text())
        rows.append((record.parent.name, json.dumps(merge.get("params", {}), sort_keys=True)))
    table = md_table(["method", "settings"], rows)
    return dg.MaterializeResult(metadata={"baselines": dg.MetadataValue.md(table)})


@dg.asset(
    group_name=GROUP,
    deps=[merged_student, static_baselines, prompt_set],
    kinds={"mlflow"},
    backfill_policy=SINGLE_RUN,
    code_version=CODE_VERSION,
    description="The FID_t protocol: student vs teachers vs static baselines (the DVC stage "
    "`evaluate`); the report and metrics go to the merge's MLflow run.",
)
def evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluateRunConfig,
    project: ProjectResource,
    compute: ComputeResource,
    mlflow: MlflowResource,
    dvc: DvcResource,
    merge_request: MergeRequestResource,
):
    from dmm.registry.workflow import log_evaluation

    client = mlflow.client()
    project.write_request(merge_request.request(compute))
    dvc.repro(context, ["plan", "evaluate"], force=config.force)
    results = json.loads(project.path(layout.EVALUATION).joinpath("evaluation.json").read_text())
    try:
        run = log_evaluation(project.root, client, results)
    except Exception as exc:  # noqa: BLE001
        raise failure_from(exc, "evaluation") from exc
    out = project.path(layout.EVALUATION)
    return dg.MaterializeResult(
        metadata={
            "report": dg.MetadataValue.path(str(out / "report.html")),
            "fid_t_independent_ratio": round(float(results["fid_t_independent_ratio"]), 3),
            "fid_t_independent_ratio_interval": _interval(results, "fid_t_independent_ratio"),
            "fid_t_ratio": round(float(results["fid_t_ratio"]), 3),
            "fid_t_ratio_interval": _interval(results, "fid_t_ratio"),
            "feature_extractor": results["feature_extractor"],
            "fid_t_table": dg.MetadataValue.md(fid_table(results)),
            "M": png_preview(out / "M.png", "M(i, j): FD(student as style i, teacher j)"),
            "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run)),
        },
    )


def _interval(results: dict, key: str) -> str:
    iv = (results.get("intervals") or {}).get(key)
    return f"[{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "-"


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
    return True, record.evaluation.description or "the evaluation gate passed"


@dg.asset(
    group_name=GROUP,
    deps=[evaluation],
    kinds={"mlflow"},
    backfill_policy=SINGLE_RUN,
    code_version=CODE_VERSION,
    description="The student as a version of the MLflow registered model (pyfunc), "
    "`champion` once the evaluation gate passed (`dmm register`).",
)
def registered_model(
    context: dg.AssetExecutionContext, project: ProjectResource, mlflow: MlflowResource
):
    from dmm.registry.workflow import register_merge

    passed, why = gate_passed(context.instance)
    context.log.info(why)
    try:
        reg, passed, summary = register_merge(
            project.root,
            mlflow.client(),
            verdict=(passed, why),
            extra_tags={names.ORCHESTRATOR_RUN_TAG: context.run.run_id},
        )
    except Exception as exc:  # noqa: BLE001  (a DmmError or MLflow's, as one line)
        raise failure_from(exc, "registration") from exc
    return dg.MaterializeResult(
        metadata={
            "model": f"models:/{reg.name}/{reg.version}",
            "version": reg.version,
            "alias": reg.alias,
            "reused_version": reg.reused,
            "gate": summary,
            "mlflow_model": dg.MetadataValue.url(mlflow.model_version_url(reg.name, reg.version)),
        },
        data_version=dg.DataVersion(reg.student_sha256),
    )
