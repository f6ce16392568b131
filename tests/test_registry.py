"""MLflow registration: the pyfunc student, serving it, aliases, idempotency, the gate."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.pipeline_support import MODEL_NAME, free_port, tool_env

pytestmark = pytest.mark.timeout(1200)
STYLES = ["pastel", "neon", "sepia", "blueprint", "stripes"]


@pytest.fixture
def client(built):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=built.tracking_uri, registry_uri=built.tracking_uri)


def decode_png(text: str):
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    assert image.format == "PNG"
    return image


def test_champion_loads_in_a_new_process_and_renders_every_style(built):
    script = f"""
import json, mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model("models:/{MODEL_NAME}@champion")
frame = pd.DataFrame({{"prompt": ["a large red circle in the center"] * {len(STYLES)},
                      "style": {STYLES!r}, "steps": [2] * {len(STYLES)}}})
print(json.dumps(model.predict(frame)["image"].tolist()))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=tool_env(MLFLOW_TRACKING_URI=built.tracking_uri),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=built.repo,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(images) == len(STYLES)
    sizes = {decode_png(img).size for img in images}
    assert len(sizes) == 1 and min(next(iter(sizes))) >= 16


def test_rest_server_answers_an_invocation_with_an_image(built, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"), "models", "serve",
            "-m", f"models:/{MODEL_NAME}@champion", "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(port), "--workers", "1",
        ],
        env=tool_env(MLFLOW_TRACKING_URI=built.tracking_uri),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "model server did not start in 240 s"
                time.sleep(1)
        body = {
            "dataframe_split": {
                "columns": ["prompt", "style", "seed", "steps"],
                "data": [["a small blue square at the top left", "neon", 3, 2]],
            }
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            predictions = json.loads(response.read())["predictions"]
        assert len(predictions) == 1
        decode_png(predictions[0]["image"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_version_records_lineage_and_pinned_requirements(built, client):
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    tags = version.tags
    assert tags["dmm.merge_kind"] == "full" and tags["dmm.parent_version"] == ""
    assert tags["dmm.gate"] == "passed"
    assert len(tags["dmm.student_sha256"]) == 64
    assert "dmm.git_commit" in tags
    assert tags["dvc.data/zoo"].endswith(".dir")
    for style in STYLES:
        assert len(tags[f"dmm.teacher.{style}.sha256"]) == 64
    local = client.download_artifacts(version.run_id, "student_model", str(built.repo / ".tmp-m"))
    try:
        requirements = (Path(local) / "requirements.txt").read_text().split()
        assert any(r.startswith("torch==") for r in requirements)
        assert any(r.startswith("diffusers==") for r in requirements)
        assert not any(r.startswith("torchvision") for r in requirements)
        assert (Path(local) / "artifacts" / "student" / "model_index.json").is_file()
    finally:
        shutil.rmtree(built.repo / ".tmp-m", ignore_errors=True)


def test_merge_run_holds_losses_by_step_evaluation_and_report(built, client):
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss/score")
    assert [m.step for m in history] == [1, 2]
    assert "eval/fid_t_ratio" in run.data.metrics
    assert "eval/style_accuracy/neon" in run.data.metrics
    assert run.data.params["teachers"] == ",".join(STYLES)
    # The run carries the latest verdict of the gate (a test may re-check it with a strict gate).
    assert run.data.tags["dmm.gate"] in ("passed", "failed")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/report.html" in artifacts and "evaluation/M.png" in artifacts


def test_registering_the_same_student_again_reuses_its_version(built, client):
    from dmm.registry.register import register_student

    before = client.get_model_version_by_alias(MODEL_NAME, "champion")
    count = len(client.search_model_versions(f"name='{MODEL_NAME}'"))
    again = register_student(
        client,
        model_name=MODEL_NAME,
        run_id=before.run_id,
        student_dir=built.repo / "data/student/student",
        passed=True,
        tags={},
    )
    assert again.reused and again.version == str(before.version) and again.alias == "champion"
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == count


def test_a_failed_gate_makes_a_challenger_and_never_moves_champion(built, client, tmp_path):
    from dmm.registry.register import register_student

    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    other = tmp_path / "student"
    shutil.copytree(built.repo / "data/student/student", other)
    (other / "NOTES.txt").write_text("a different student folder, hence a new version\n")
    result = register_student(
        client,
        model_name=MODEL_NAME,
        run_id=champion.run_id,
        student_dir=other,
        passed=False,
        tags={"dmm.note": "failed gate"},
    )
    assert not result.reused and result.alias == "challenger"
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == champion.version
    assert (
        str(client.get_model_version_by_alias(MODEL_NAME, "challenger").version) == result.version
    )
    assert client.get_model_version(MODEL_NAME, result.version).tags["dmm.gate"] == "failed"


def test_a_passing_challenger_is_promoted_and_loses_the_challenger_alias(built, client, tmp_path):
    from dmm.registry.register import register_student

    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    other = tmp_path / "student"
    shutil.copytree(built.repo / "data/student/student", other)
    (other / "NOTES.txt").write_text("another student folder\n")
    failed = register_student(
        client, model_name=MODEL_NAME, run_id=champion.run_id, student_dir=other,
        passed=False, tags={},
    )  # fmt: skip
    promoted = register_student(
        client, model_name=MODEL_NAME, run_id=champion.run_id, student_dir=other,
        passed=True, tags={},
    )  # fmt: skip
    assert promoted.version == failed.version and promoted.alias == "champion"
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == failed.version
    aliases = client.get_registered_model(MODEL_NAME).aliases
    assert "challenger" not in aliases


def test_gate_judges_each_criterion():
    from dmm.registry.gate import GateThresholds, check_gate

    results = {
        "fid_t_ratio": 1.5,
        "styles": ["a", "b"],
        "style_accuracy": {"a": 0.9, "b": 0.5},
        "teacher_accuracy": {"a": 1.0, "b": 1.0},
        "baselines": {"ties": {"fid_t_ratio": 3.0}, "weighted": {"fid_t_ratio": 2.0}},
    }
    lenient = GateThresholds(
        max_fid_t_ratio=2.0, min_relative_style_accuracy=0.8, baseline_ratio_factor=1.0
    )
    gate = check_gate(results, lenient)
    assert not gate.passed
    assert [c.name for c in gate.criteria if not c.passed] == ["style_accuracy/b"]
    assert "style b" in gate.summary()
    strict = lenient.model_copy(update={"max_fid_t_ratio": 1.2, "baseline_ratio_factor": 0.5})
    assert {c.name for c in check_gate(results, strict).criteria if not c.passed} == {
        "fid_t_ratio",
        "style_accuracy/b",
        "vs_best_baseline",  # 1.5 > 0.5 x weighted's 2.0
    }
    results["style_accuracy"]["b"] = 0.8
    assert check_gate(results, lenient).passed


def test_pinned_requirements_match_the_installed_versions():
    from importlib import metadata

    from dmm.registry.requirements import pinned_requirements

    pins = dict(r.split("==") for r in pinned_requirements())
    assert "torchvision" not in pins
    assert metadata.version("torch").startswith(pins["torch"])
    assert pins["mlflow"] == metadata.version("mlflow")


def test_unreachable_tracking_server_is_one_clear_line(monkeypatch):
    from dmm.atomic import DmmError
    from dmm.registry.tracking import check_reachable, make_client

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    client = make_client(f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(DmmError, match="unreachable"):
        check_reachable(client)
    assert time.monotonic() - started < 30
