"""One dynamic partition per teacher of data/teachers.yaml."""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

TEACHER_PARTITIONS = dg.DynamicPartitionsDefinition(name="teachers")
# A single run covers any range of teacher partitions: DVC reproduces them in
# one call, and a sensor-triggered re-merge is one run, not one per teacher.
SINGLE_RUN = dg.BackfillPolicy.single_run()


def partition_changes(
    existing: Sequence[str], manifest_names: Sequence[str]
) -> tuple[list[str], list[str]]:
    """(names to add, names to delete) so that the partitions equal the manifest."""
    added = [n for n in manifest_names if n not in existing]
    removed = [n for n in existing if n not in manifest_names]
    return added, removed


def sync_partitions(instance: dg.DagsterInstance, manifest_names: Sequence[str]):
    existing = instance.get_dynamic_partitions(TEACHER_PARTITIONS.name)
    added, removed = partition_changes(existing, manifest_names)
    if added:
        instance.add_dynamic_partitions(TEACHER_PARTITIONS.name, added)
    for name in removed:
        instance.delete_dynamic_partition(TEACHER_PARTITIONS.name, name)
    return added, removed


def range_tags(first: str, last: str) -> dict[str, str]:
    """Run tags that make one run cover the partitions first..last (single-run backfill)."""
    return {
        "dagster/asset_partition_range_start": first,
        "dagster/asset_partition_range_end": last,
    }
