"""The nightly schedule: re-check the whole graph; unchanged steps cost next to nothing."""

import dagster as dg

from pipelines.defs.jobs import dmm_job
from pipelines.defs.partitions import TEACHER_PARTITIONS, range_tags


@dg.schedule(
    job=dmm_job,
    cron_schedule="0 3 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="03:00 UTC: DVC skips every unchanged stage (the student and its evaluation too), "
    "so a night without changes only re-verifies.",
)
def nightly(context: dg.ScheduleEvaluationContext):
    keys = context.instance.get_dynamic_partitions(TEACHER_PARTITIONS.name)
    if not keys:
        return dg.SkipReason("no teacher partitions yet: materialize teacher_manifest first")
    date = context.scheduled_execution_time.strftime("%Y-%m-%d")
    return dg.RunRequest(run_key=f"nightly-{date}", tags=range_tags(keys[0], keys[-1]))
