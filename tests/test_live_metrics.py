"""Live training metrics in an MLflow run that the orchestrator created and still owns."""

from __future__ import annotations

import logging

import pytest

import mlflow
from dmm.distill.live import LiveMetrics
from dmm.distill.trainer import distill
from tests.test_distill import make_cfg, records


@pytest.fixture
def tracking(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("merge"))
    return uri, client, run.info.run_id


def test_step_metrics_reach_the_run_while_it_is_still_running(
    distill_data, tmp_path, tracking, monkeypatch
):
    uri, client, run_id = tracking
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    out = tmp_path / "run"
    distill(make_cfg(distill_data, out, ["pastel", "neon"], steps=3))
    history = client.get_metric_history(run_id, "loss/total")
    logged = {r["step"]: r["loss/total"] for r in records(out)}
    assert (
        {m.step: m.value for m in history} == logged == {1: logged[1], 2: logged[2], 3: logged[3]}
    )
    assert [m.step for m in client.get_metric_history(run_id, "loss_score/neon")] == [1, 2, 3]
    assert client.get_run(run_id).info.status == "RUNNING"  # the orchestrator ends it
    assert mlflow.active_run() is None  # no global MLflow state was set


def test_records_are_batched_until_due(tracking):
    _, client, run_id = tracking
    calls = []

    class Counting:
        def log_batch(self, run_id, metrics):
            calls.append(len(metrics))
            client.log_batch(run_id, metrics=metrics)

    live = LiveMetrics(Counting(), run_id, flush_seconds=3600)
    for step in (1, 2, 3):
        live.add({"loss/total": 0.5 / step, "lr": 1e-3, "step": step})
    assert calls == []
    live.flush()
    assert calls == [6]
    assert [m.step for m in client.get_metric_history(run_id, "lr")] == [1, 2, 3]


def test_unreachable_mlflow_is_a_warning_not_a_crash(tracking, caplog):
    uri, _, _ = tracking
    live = LiveMetrics.from_env({"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": "no-such-run"})
    live.flush_seconds = 0
    with caplog.at_level(logging.WARNING, logger="dmm.distill.live"):
        live.add({"loss/total": 1.0, "step": 1})
        live.add({"loss/total": 0.9, "step": 2})
    warnings = [r for r in caplog.records if "live metrics stopped" in r.getMessage()]
    assert len(warnings) == 1  # it stops trying after the first failure


def test_no_run_in_the_environment_means_no_live_logging():
    assert LiveMetrics.from_env({}) is None
    assert LiveMetrics.from_env({"MLFLOW_TRACKING_URI": "sqlite:///x.db"}) is None
