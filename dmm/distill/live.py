"""Live training metrics in the orchestrator's MLflow run.

When the environment names a run, through MLflow's own variables
``MLFLOW_RUN_ID`` and ``MLFLOW_TRACKING_URI`` (the orchestrator creates the
run before it launches training), the main process logs each metrics record,
the same records as metrics.jsonl, into that run as training goes. Records
are batched and sent every ``FLUSH_SECONDS`` and at the end, through an
explicit ``MlflowClient``: mlflow's global active-run state is never touched,
and the run is never ended here (whoever created it ends it). MLflow being
unreachable is a warning, never a crash: metrics.jsonl still has every record.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

FLUSH_SECONDS = 5.0
MAX_PER_CALL = 1000  # MLflow's cap on the metrics of one log_batch


class LiveMetrics:
    """Buffers metrics records and logs them into one MLflow run."""

    def __init__(self, client: Any, run_id: str, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.client = client
        self.run_id = run_id
        self.flush_seconds = flush_seconds
        self.pending: list = []
        self.last_flush = time.monotonic()
        self.broken = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> LiveMetrics | None:
        """The run the environment names, or None (no run named, or no MLflow client)."""
        run_id, uri = environ.get("MLFLOW_RUN_ID"), environ.get("MLFLOW_TRACKING_URI")
        if not (run_id and uri):
            return None
        try:
            from mlflow.tracking import MlflowClient

            return cls(MlflowClient(tracking_uri=uri), run_id)
        except Exception as exc:  # noqa: BLE001  (any failure here must not stop training)
            log.warning("live metrics off: no MLflow client for %s (%s)", uri, exc)
            return None

    def add(self, record: Mapping[str, Any]) -> None:
        """Queue one record (its ``step`` is the metrics' step); send the queue when due."""
        from mlflow.entities import Metric

        stamp, step = int(time.time() * 1000), int(record["step"])
        self.pending += [
            Metric(key, float(value), stamp, step)
            for key, value in record.items()
            if key != "step" and isinstance(value, int | float)
        ]
        if time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Send what is queued. After one failure it stops trying: a down server would
        otherwise stall every flush in the client's retries."""
        batch, self.pending = self.pending, []
        self.last_flush = time.monotonic()
        if self.broken or not batch:
            return
        try:
            for i in range(0, len(batch), MAX_PER_CALL):
                self.client.log_batch(self.run_id, metrics=batch[i : i + MAX_PER_CALL])
        except Exception as exc:  # noqa: BLE001  (MLflow's errors vary by store and transport)
            self.broken = True
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning(
                "live metrics stopped: cannot log to MLflow run %s (%s); "
                "metrics.jsonl keeps every record",
                self.run_id,
                first,
            )
