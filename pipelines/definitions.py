"""Entry point of the Dagster code location (`dagster dev` / `make ui` from the repo root)."""

from __future__ import annotations

import dagster as dg

from pipelines.defs.asset_checks import evaluation_gate
from pipelines.defs.assets import ASSETS
from pipelines.defs.jobs import dmm_job
from pipelines.defs.recovery import dead_run_sensor
from pipelines.defs.resources import (
    ComputeResource,
    DvcResource,
    MergeRequestResource,
    MlflowResource,
    ProjectResource,
)
from pipelines.defs.schedules import nightly
from pipelines.defs.sensors import teacher_manifest_sensor


def build_resources(project: ProjectResource | None = None) -> dict:
    project = project or ProjectResource()
    return {
        "project": project,
        "dvc": DvcResource(project=project),
        "mlflow": MlflowResource(project=project),
        # Set per launch (launchpad `resources: compute: config:`), e.g. an Accelerate config.
        "compute": ComputeResource.configure_at_launch(),
        # Per run: settings beyond params.yaml (launchpad `resources: merge_request: config:`).
        "merge_request": MergeRequestResource(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }


defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=[evaluation_gate],
    jobs=[dmm_job],
    sensors=[teacher_manifest_sensor, dead_run_sensor],
    schedules=[nightly],
    resources=build_resources(),
)
