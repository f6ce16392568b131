"""MLflow tracking for merges: one run per merge, with its params, losses and evaluation.

Every function takes an explicit ``MlflowClient``; nothing here sets mlflow's
process-global tracking URI or active run, so two pipelines (or a test and the
demo) can talk to two stores from one process.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag

from dmm.atomic import DmmError, write_text_atomic
from dmm.names import FEATURE_EXTRACTOR_TAG, RUN_FILE
from mlflow import MlflowClient

# MLflow rejects batches above 1000 metrics / 100 params per call.
METRIC_BATCH = 1000
PARAM_BATCH = 100
PARAM_VALUE_LIMIT = 6000


def default_tracking_uri(repo_root: Path) -> str:
    return f"sqlite:///{(Path(repo_root) / 'mlflow' / 'mlflow.db').resolve()}"


def default_artifact_root(repo_root: Path) -> str:
    return (Path(repo_root) / "mlflow" / "artifacts").resolve().as_uri()


def resolve_tracking_uri(repo_root: Path, explicit: str | None = None) -> str:
    """An explicit URI, else ``MLFLOW_TRACKING_URI``, else the repository's sqlite store."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(repo_root)


def make_client(tracking_uri: str, registry_uri: str | None = None) -> MlflowClient:
    if tracking_uri.startswith("sqlite:///"):
        # sqlite creates the database file but not its folder.
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


def check_reachable(client: MlflowClient) -> None:
    """Raise a one-line DmmError unless the tracking store answers.

    Called before any work, so an unreachable server fails a run at its start
    and leaves nothing half-logged.
    """
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:  # mlflow raises transport-specific types; all mean "unreachable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DmmError(
            f"MLflow tracking store {client.tracking_uri} is unreachable: {first[:300]}"
        ) from exc


# MLflow 3 opens an experiment in its GenAI view unless it is marked as model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.tags.get("mlflow.experimentKind") is None:
            for k, v in EXPERIMENT_KIND.items():
                client.set_experiment_tag(found.experiment_id, k, v)
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)


def artifact_root_for(client: MlflowClient, repo_root: Path) -> str | None:
    """The repository's artifact folder for its own sqlite store; a server decides its own."""
    if client.tracking_uri.startswith("sqlite:"):
        return default_artifact_root(repo_root)
    return None


def set_running(client: MlflowClient, run_id: str) -> None:
    """Reopen a run that a crashed attempt of the same merge left (FAILED or killed)."""
    client.update_run(run_id, status="RUNNING")


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested config -> ``{"a.b": "value"}`` strings, as MLflow params must be."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return {prefix: text[:PARAM_VALUE_LIMIT]}


def run_exists(client: MlflowClient, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True


def start_merge_run(
    client: MlflowClient,
    experiment_id: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
) -> str:
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    flat = [Param(k, v) for k, v in flatten("", params).items()]
    for i in range(0, len(flat), PARAM_BATCH):
        client.log_batch(run.info.run_id, params=flat[i : i + PARAM_BATCH])
    return run.info.run_id


def read_metrics_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def log_step_metrics(client: MlflowClient, run_id: str, records: list[dict]) -> int:
    """Log every numeric field of ``metrics.jsonl`` records at its ``step``; returns the count."""
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now, int(rec["step"]))
        for rec in records
        for key, value in rec.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
    ]
    for i in range(0, len(metrics), METRIC_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + METRIC_BATCH])
    return len(metrics)


def evaluation_metrics(results: dict) -> dict[str, float]:
    """The scalar results of ``dmm evaluate`` under stable metric names.

    Each figure with an interval also gets ``<name>_lo`` / ``<name>_hi``; the
    per-style diagonal FD, its interval and the style's floor use the gate's
    prefixes, so a later incremental merge can gate against them.
    """
    from dmm.registry.gate import (
        DIAG_HI_METRIC,
        DIAG_LO_METRIC,
        DIAG_METRIC,
        FLOOR_METRIC,
        HI_SUFFIX,
        LO_SUFFIX,
    )  # fmt: skip

    ivs = results.get("intervals") or {}
    out: dict[str, float | None] = {}

    def put(name: str, value, iv=None) -> None:
        out[name] = value
        if iv:
            out[name + LO_SUFFIX], out[name + HI_SUFFIX] = iv

    for key in ("fid_t", "fid_t_ref", "fid_t_ratio", "fid_t_independent_ratio",
                "off_diagonal_mean", "separation"):  # fmt: skip
        if results.get(key) is not None:
            put(f"eval/{key}", results[key], ivs.get(key))
    if "independent_ratio_half_width" in (results.get("uncertainty") or {}):
        out["eval/independent_ratio_half_width"] = results["uncertainty"][
            "independent_ratio_half_width"
        ]
    for i, name in enumerate(results["styles"]):
        out[DIAG_METRIC + name] = results["M"][i][i]
        if ivs.get("M"):
            out[DIAG_LO_METRIC + name], out[DIAG_HI_METRIC + name] = ivs["M"][i][i]
        put(FLOOR_METRIC + name, results["M_ref"][i], (ivs.get("M_ref") or [None] * (i + 1))[i])
        for role in ("style_accuracy", "teacher_accuracy"):
            put(f"eval/{role}/{name}", results[role][name], (ivs.get(role) or {}).get(name))
    for b, v in (results.get("baselines") or {}).items():
        put(
            f"baseline/{b}/fid_t_ratio",
            v["fid_t_ratio"],
            (v.get("interval") or {}).get("fid_t_ratio"),
        )
    return {k: float(v) for k, v in out.items() if v is not None}


def log_evaluation(client: MlflowClient, run_id: str, results: dict, report_dir: Path) -> None:
    """Evaluation metrics plus the HTML report, figures and raw JSON as artifacts."""
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in evaluation_metrics(results).items()]
    for i in range(0, len(metrics), METRIC_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + METRIC_BATCH])
    client.log_batch(
        run_id, tags=[RunTag(FEATURE_EXTRACTOR_TAG, str(results["feature_extractor"]))]
    )
    client.log_artifacts(run_id, str(report_dir), "evaluation")


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def finish_run(client: MlflowClient, run_id: str, ok: bool = True) -> None:
    status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
    client.set_terminated(run_id, status=status)


def run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(ui_url: str, name: str, version: str) -> str:
    return f"{ui_url.rstrip('/')}/#/models/{name}/versions/{version}"


# The run of a merge (RUN_FILE) is remembered next to the student, so that
# training, evaluation and registration (separate processes) log into one run.


def read_run_file(student_root: Path) -> dict | None:
    path = Path(student_root) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def write_run_file(student_root: Path, record: dict) -> None:
    write_text_atomic(Path(student_root) / RUN_FILE, json.dumps(record, indent=2))


def require_run(client: MlflowClient, student_root: Path) -> dict:
    """The merge run recorded for ``student_root`` in this tracking store, or a clear error."""
    record = read_run_file(student_root)
    if (
        record is None
        or record.get("tracking_uri") != client.tracking_uri
        or not run_exists(client, record["run_id"])
    ):
        raise DmmError(
            f"no MLflow run of this merge in {client.tracking_uri}; run the distill stage first"
        )
    return record
