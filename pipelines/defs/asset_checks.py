"""The evaluation gate: a blocking check, so a failing student never reaches the registry."""

import json

import dagster as dg

from dmm import layout
from pipelines.defs.assets.models import EVALUATION_GATE, evaluation
from pipelines.defs.config import GateRunConfig, failure_from
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
    from dmm.plan import read_plan
    from dmm.registry.workflow import close_refused, judge

    results = json.loads(project.path(layout.EVALUATION).joinpath("evaluation.json").read_text())
    try:
        plan, _ = read_plan(project.root)
        gate, thresholds = judge(project.root, plan, results, config.overrides())
    except Exception as exc:  # noqa: BLE001  (a DmmError or an invalid threshold, as one line)
        raise failure_from(exc, "gate") from exc
    if not gate.passed:
        # Nothing follows a refused student: its merge run ends here, verdict attached.
        close_refused(project.root, mlflow.client(), gate.summary())
    table = md_table(
        ["criterion", "value", "interval", "threshold", "passed"],
        [
            (c.name, c.value, _interval(c.interval), c.threshold, "yes" if c.passed else "**no**")
            for c in gate.criteria
        ],
    )
    return dg.AssetCheckResult(
        passed=gate.passed,
        description=gate.summary(),
        metadata={
            "criteria": dg.MetadataValue.md(table),
            "thresholds": dg.MetadataValue.json(thresholds.model_dump()),
            "fid_t_ratio": round(float(results["fid_t_ratio"]), 3),
        },
    )


def _interval(iv) -> str:
    return f"[{iv[0]:.4g}, {iv[1]:.4g}]" if iv else "-"
