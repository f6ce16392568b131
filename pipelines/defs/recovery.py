"""Runs whose processes died: mark them failed and free their pool slots.

A run killed hard (``kill -9``, an OOM kill, a lost node) never reports its
end, so Dagster keeps it STARTED and its steps keep their pool slots: with
the pools' limit of one, every later merge would wait forever. Dagster's own
run monitoring only detects dead workers for launchers with health checks,
which the default launcher lacks, and its slot freeing only acts on runs that
have already ended. This module closes the gap for runs on this host: a run
is dead when no process it recorded (the run worker, the multiprocess parent,
each step's subprocess: Dagster logs their pids) is still alive. A pid reused
since by another program does not count: a live process must have started
before the run's last update.

The ``dead_run_sensor`` applies it every 30 seconds where a daemon runs
(``make dev``); ``python -m pipelines.recover`` (``make recover``) applies it
once; the demo applies it before each materialization.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

# Statuses of a run that has not reported its end.
_LIVE = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
HOST_TAG = "dmm/host"  # the host that ran a run: only that host can judge its pids


@dataclass(frozen=True)
class Recovered:
    run_id: str
    pids: tuple[int, ...]
    freed_slots: int

    def describe(self) -> str:
        return (
            f"run {self.run_id}: its processes ({', '.join(map(str, self.pids))}) are gone; "
            f"marked failed, {self.freed_slots} pool slot(s) freed"
        )


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise RuntimeError("/proc/stat has no btime")


def process_started_at(pid: int) -> float | None:
    """When ``pid`` started (epoch seconds), or None if no live (non-zombie) process has it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may hold spaces and parentheses: fields follow the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # a zombie has exited; only its parent has not reaped it
        return None
    return _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def recorded_pids(instance: dg.DagsterInstance, run_id: str) -> list[int]:
    """Every pid Dagster logged for the run (engine events with a ``pid`` entry)."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ENGINE_EVENT, limit=1000
    ).records
    pids = []
    for record in records:
        event = record.event_log_entry.dagster_event
        metadata = getattr(event.event_specific_data, "metadata", None) or {}
        pid = metadata.get("pid")
        value = getattr(pid, "value", pid)
        if value is not None and str(value).isdigit():
            pids.append(int(value))
    return sorted(set(pids))


def tag_host(instance: dg.DagsterInstance | None, run_id: str | None) -> None:
    """Record this host on the run (once): its pids mean something only here."""
    if instance is None or run_id is None:
        return
    run = instance.get_run_by_id(run_id)
    if run is not None and HOST_TAG not in run.tags:
        instance.add_run_tags(run_id, {HOST_TAG: socket.gethostname()})


def _is_dead(instance: dg.DagsterInstance, record: dg.RunRecord) -> tuple[int, ...] | None:
    run = record.dagster_run
    # A run without the tag has not reached its first step (which tags it) and
    # holds no slot yet; a single-host instance (sqlite) may judge it anyway.
    if run.tags.get(HOST_TAG, socket.gethostname()) != socket.gethostname():
        return None  # another host's processes cannot be checked from here
    pids = recorded_pids(instance, run.run_id)
    if not pids:
        return None  # nothing recorded yet: the run may still be starting
    since = record.update_timestamp.timestamp() if record.update_timestamp else None
    for pid in pids:
        started = process_started_at(pid)
        if started is not None and (since is None or started <= since + 1.0):
            return None
    return tuple(pids)


def _slots_held(instance: dg.DagsterInstance, run_id: str) -> int:
    storage = instance.event_log_storage
    return sum(
        1
        for pool in storage.get_concurrency_keys()
        for slot in storage.get_concurrency_info(pool).claimed_slots
        if slot.run_id == run_id
    )


def recover_dead_runs(instance: dg.DagsterInstance) -> list[Recovered]:
    """Mark this host's dead runs failed and free their pool slots; what was done."""
    done = []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=_LIVE)):
        pids = _is_dead(instance, record)
        if pids is None:
            continue
        run = record.dagster_run
        instance.report_run_failed(
            run,
            f"dmm: the run's processes ({', '.join(map(str, pids))}) died without reporting "
            "an end; marked failed so that its pool slots are freed",
        )
        freed = 0
        storage = instance.event_log_storage
        if storage.supports_global_concurrency_limits:
            freed = _slots_held(instance, run.run_id)
            storage.free_concurrency_slots_for_run(run.run_id)
        done.append(Recovered(run.run_id, pids, freed))
    return done


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Marks runs whose processes died (kill -9, OOM, lost node) failed and frees "
    "their pool slots, so that the next merge is not blocked.",
)
def dead_run_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    done = recover_dead_runs(context.instance)
    for item in done:
        context.log.warning(item.describe())
    return dg.SkipReason("; ".join(i.describe() for i in done) or "no dead runs")
