"""Free the pipeline after a crash: mark this host's dead runs failed, free their pool slots.

    python -m pipelines.recover        (make recover)

The daemon's ``dead_run_sensor`` does the same every 30 seconds under
``make dev``; this is for headless use (``dagster asset materialize``), and
``make demo`` runs it first. Safe at any time: a live run is never touched.
"""

from __future__ import annotations

import sys


def main() -> int:
    import dagster as dg

    from pipelines.defs.recovery import recover_dead_runs

    with dg.DagsterInstance.get() as instance:
        done = recover_dead_runs(instance)
    for item in done:
        print(f"recovered {item.describe()}")
    if not done:
        print("recover: no dead runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
