"""The evaluation gate: a blocking check, so a failing student never reaches the registry."""

import json

import dagster as dg

from pipelines import layout
from pipelines.defs.assets.models import EVALUATION_GATE, evaluation
from pipelines.defs.config import GateRunConfig, validated
from pipelines.defs.metadata import md_table
from pipelines.defs.resources import MlflowResource, ProjectResource


@dg.asset_check(
    asset=evaluation,
    name=EVALUATION_GATE,
    blocking=True,
    description="FD_t ratio, per-style accuracy relative to each teacher, the margin over "
    "the best static baseline, and (incremental merges) no old style regressed against the "
    "parent champion (thresholds: params.yaml registry.gate, or run config).",
)
def evaluation_gate(
    config: GateRunConfig, project: ProjectResource, mlflow: MlflowResource
) -> dg.AssetCheckResult:
    from dmm.registry import tracking
    from dmm.registry.gate import GateThresholds, check_gate
    from dmm.registry.lineage import read_plan

    defaults = (project.section("registry") or {}).get("gate") or {}
    thresholds = validated(GateThresholds, {**defaults, **config.overrides()}, [], "gate")
    results = json.loads(project.path(layout.EVALUATION).joinpath("evaluation.json").read_text())
    # An incremental merge must also keep every old style as good as its parent had it.
    plan = read_plan(project.path(layout.STUDENT))
    previous = plan.parent_diag_fd if plan is not None and plan.kind == "incremental" else None
    gate = check_gate(results, thresholds, previous)
    # The merge's MLflow run records the verdict too, so a failed student is
    # visible there although it never reaches the registry.
    client = mlflow.client()
    run = tracking.read_run_file(project.path(layout.STUDENT))
    if run and tracking.run_exists(client, run["run_id"]):
        tracking.set_tags(
            client,
            run["run_id"],
            {
                "dmm.gate": "passed" if gate.passed else "failed",
                "dmm.gate_summary": gate.summary()[:4000],
            },
        )
    table = md_table(
        ["criterion", "value", "threshold", "passed"],
        [(c.name, c.value, c.threshold, "yes" if c.passed else "**no**") for c in gate.criteria],
    )
    return dg.AssetCheckResult(
        passed=gate.passed,
        description=gate.summary(),
        metadata={
            "criteria": dg.MetadataValue.md(table),
            "thresholds": dg.MetadataValue.json(thresholds.model_dump()),
            "fid_t_ratio": float(results["fid_t_ratio"]),
        },
    )
