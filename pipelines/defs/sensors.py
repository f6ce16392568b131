"""The teacher-manifest sensor: new teachers become partitions and trigger one re-merge."""

import hashlib
import json

import dagster as dg

from pipelines.defs.jobs import dmm_job
from pipelines.defs.partitions import TEACHER_PARTITIONS, partition_changes, range_tags
from pipelines.defs.resources import ProjectResource


def _entry_hashes(manifest) -> dict[str, str]:
    return {
        t.name: hashlib.sha256(
            json.dumps(
                {"base": manifest.base, **t.model_dump(mode="json")}, sort_keys=True
            ).encode()
        ).hexdigest()
        for t in manifest.teachers
    }


@dg.sensor(
    job=dmm_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Watches data/teachers.yaml: adds a partition per new teacher, drops removed "
    "ones, and requests one re-merge per manifest version.",
)
def teacher_manifest_sensor(
    context: dg.SensorEvaluationContext, project: ProjectResource
) -> dg.SensorResult | dg.SkipReason:
    sha = project.manifest_sha256()
    previous = json.loads(context.cursor) if context.cursor else {}
    if previous.get("sha") == sha:
        return dg.SkipReason("teacher manifest unchanged")
    # An invalid manifest fails the tick with the validation message and
    # keeps the cursor, so the fix is picked up on the next tick.
    manifest = project.manifest()
    names = [t.name for t in manifest.teachers]
    entries = _entry_hashes(manifest)
    existing = context.instance.get_dynamic_partitions(TEACHER_PARTITIONS.name)
    added, removed = partition_changes(existing, names)
    old_entries = previous.get("entries", {})
    # A first tick (no cursor) trusts partitions that exist; later ticks also
    # re-run teachers whose entry (source, pin) changed.
    changed = [n for n in names if n in old_entries and old_entries[n] != entries[n]]
    cursor = json.dumps({"sha": sha, "entries": entries})
    requests: list = []
    if added:
        requests.append(TEACHER_PARTITIONS.build_add_request(added))
    if removed:
        requests.append(TEACHER_PARTITIONS.build_delete_request(removed))
    stale = [n for n in names if n in added or n in changed]
    if not stale and not removed:
        return dg.SensorResult(cursor=cursor, dynamic_partitions_requests=requests)
    run_key = f"teacher-manifest-{sha[:16]}"
    if stale:
        # Partitions keep manifest order, so the stale ones lie within this range.
        positions = [names.index(n) for n in stale]
        first, last = names[min(positions)], names[max(positions)]
        run = dg.RunRequest(run_key=run_key, tags=range_tags(first, last))
    else:
        run = dg.RunRequest(
            run_key=run_key,
            asset_selection=[
                dg.AssetKey(k)
                for k in (
                    "teacher_manifest",
                    "merged_student",
                    "static_baselines",
                    "evaluation",
                    "registered_model",
                )
            ],
        )
    context.log.info(f"manifest {sha[:12]}: added {added}, removed {removed}, changed {changed}")
    return dg.SensorResult(run_requests=[run], dynamic_partitions_requests=requests, cursor=cursor)
