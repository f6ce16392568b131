"""A run resumes only from checkpoints of its own config, and keeps its metrics log whole."""

from __future__ import annotations

import json
import logging

import pytest

from dmm.atomic import DmmError
from dmm.distill import checkpoints as ckpt
from dmm.distill.pipes_entry import MetricsTail
from dmm.distill.trainer import MetricsLog, distill
from tests.test_distill import make_cfg, records


def _sealed(root, step, fingerprint):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x" * 10)
    ckpt.seal(d, step, fingerprint)
    return d


def test_fingerprint_ignores_how_a_run_is_driven_but_not_what_it_trains(distill_data, tmp_path):
    cfg = make_cfg(distill_data, tmp_path / "a", ["pastel"])
    same = cfg.model_copy(update={"output_dir": tmp_path / "b", "resume": "auto", "log_every": 7})
    assert same.fingerprint() == cfg.fingerprint()
    assert cfg.model_copy(update={"lr": 1e-4}).fingerprint() != cfg.fingerprint()
    assert cfg.model_copy(update={"steps": 5}).fingerprint() != cfg.fingerprint()


def test_resume_picks_only_checkpoints_of_the_same_config(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    mine = _sealed(root, 2, "A" * 64)
    theirs = _sealed(root, 4, "B" * 64)
    old = _sealed(root, 6, None)  # sealed before checkpoints recorded a fingerprint
    assert ckpt.resolve_resume(root, "latest", "A" * 64) == mine
    assert ckpt.resolve_resume(root, "auto", "A" * 64) == mine
    with pytest.raises(DmmError, match="no checkpoint of this config .*3 of other configs"):
        ckpt.resolve_resume(root, "latest", "C" * 64)
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_resume(root, "auto", "C" * 64) is None
    assert "starting fresh: no checkpoint of this config" in caplog.text
    for foreign in (theirs, old):
        with pytest.raises(DmmError, match="is of another config") as err:
            ckpt.resolve_resume(root, str(foreign), "A" * 64)
        assert "\n" not in str(err.value)
    assert ckpt.resolve_resume(tmp_path / "none", "latest", "A" * 64) is None


def test_auto_starts_fresh_when_no_checkpoint_matches(distill_data, tmp_path, caplog):
    out = tmp_path / "run"
    distill(make_cfg(distill_data, out, ["pastel"], steps=2, checkpoint_every=1))
    first = records(out)
    other = make_cfg(distill_data, out, ["pastel"], steps=2, checkpoint_every=1, lr=1e-4)
    # `latest` refuses, and an explicit checkpoint of the first config too; both
    # fail in set-up and leave the first run's log as it was.
    with pytest.raises(DmmError, match="no checkpoint of this config"):
        distill(other.model_copy(update={"resume": "latest"}))
    explicit = str(out / "checkpoints" / "checkpoint-2")
    with pytest.raises(DmmError, match="checkpoint-2 is of another config"):
        distill(other.model_copy(update={"resume": explicit}))
    assert records(out) == first
    with caplog.at_level(logging.WARNING):
        distill(other.model_copy(update={"resume": "auto"}))
    assert "starting fresh" in caplog.text
    again = records(out)
    assert [r["step"] for r in again] == [1, 2]
    assert again[0]["lr"] != first[0]["lr"]
    # Only the new config's checkpoints are left.
    found = ckpt.list_checkpoints(out / "checkpoints")
    assert [s for s, _ in found] == [1, 2]
    assert {ckpt.fingerprint_of(d) for _, d in found} == {other.fingerprint()}


def test_auto_resumes_its_own_config_without_duplicate_steps(distill_data, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = make_cfg(distill_data, out, ["pastel"], steps=3, checkpoint_every=2)
    distill(cfg)
    # As if killed after step 3 was logged but before its checkpoint was sealed.
    import shutil

    shutil.rmtree(out / "checkpoints" / "checkpoint-3")
    with caplog.at_level(logging.INFO, logger="dmm.distill.trainer"):
        distill(cfg.model_copy(update={"resume": "auto"}))
    assert "resumed from" in caplog.text and "checkpoint-2" in caplog.text
    assert [r["step"] for r in records(out)] == [1, 2, 3]


def test_fresh_log_replaces_the_old_one_only_at_its_first_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    log = MetricsLog(path, step=0)
    assert len(path.read_text().splitlines()) == 3  # set-up alone leaves it
    log.append({"step": 1, "x": 0.5})
    log.append({"step": 2, "x": 0.25})
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"step": 1, "x": 0.5},
        {"step": 2, "x": 0.25},
    ]
    MetricsLog(path, step=1).append({"step": 2, "x": 0.1})  # resumed at 1: step 2 redone
    assert [json.loads(x)["x"] for x in path.read_text().splitlines()] == [0.5, 0.1]


def test_metrics_tail_forwards_only_this_runs_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 9, "old": True}) + "\n")
    seen = []
    tail = MetricsTail(path, seen.append)
    tail.poll()
    assert seen == []
    log = MetricsLog(path, step=0)
    log.append({"step": 1})
    tail.poll()
    log.append({"step": 2})
    tail.poll()
    assert seen == [{"step": 1}, {"step": 2}]
