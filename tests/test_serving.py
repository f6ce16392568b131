"""Serving the student: request checks, batching, the params schema, and a real
``mlflow models serve`` answering a batched request with params and a bad one.

The student is untrained (zoo-shaped components, perturbed style MLP): these
tests check the serving contract, not image quality.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch

from dmm.atomic import DmmError
from dmm.registry.pyfunc import model_signature, plan_request
from dmm.student.codebook import StyleCodebook
from dmm.student.limits import MAX_IMAGES, MAX_STEPS
from tests.pipeline_support import free_port, tool_env

STYLES = ["pastel", "neon", "sepia"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    from diffusers import UNet2DConditionModel

    from dmm import StyleStudent
    from dmm.zoo.build import make_pipeline, vocabulary
    from dmm.zoo.models import MAX_TOKENS, make_autoencoder, make_text_encoder, make_unet
    from dmm.zoo.tokenizer import BOS, EOS, build_tokenizer

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    tokenizer = build_tokenizer(vocabulary(), root / "_tok", MAX_TOKENS)
    vocab = tokenizer.get_vocab()
    text_encoder = make_text_encoder(len(vocab), vocab[BOS], vocab[EOS])
    make_pipeline(make_unet(16), text_encoder, tokenizer, make_autoencoder()).save_pretrained(
        root / "base"
    )
    base = UNet2DConditionModel.from_pretrained(root / "base", subfolder="unet")
    student = StyleStudent.from_base(base, STYLES, seed=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.unet.class_embedding.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return student.save_pipeline(root / "student", root / "base")


@pytest.fixture(scope="module")
def model_dir(student_dir, tmp_path_factory) -> Path:
    from dmm.registry.register import save_student_model

    dest = tmp_path_factory.mktemp("model") / "student_model"
    return save_student_model(student_dir, dest, STYLES, "0" * 64)


@pytest.fixture(scope="module")
def model(model_dir):
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(model_dir))


def _resolve():
    return StyleCodebook(STYLES, 8).resolve


# --- request planning (no model) ---------------------------------------------------------


def test_partial_seed_and_steps_columns_take_the_params():
    frame = pd.DataFrame(
        {
            "prompt": ["a", "b", "c"],
            "style": ["neon", "1", '{"pastel": 1, "sepia": 3}'],
            "seed": [7, None, 9],
            "steps": [None, 5, None],
        }
    )
    groups = plan_request(frame, {"steps": 3, "seed": 100, "guidance_scale": 2.0}, _resolve())
    by_key = {key: (rows, seeds) for key, rows, _, _, seeds in groups}
    assert by_key == {(3, 2.0): ([0, 2], [7, 9]), (5, 2.0): ([1], [100])}
    weights = {r: w for _, rows, _, ws, _ in groups for r, w in zip(rows, ws, strict=True)}
    assert torch.equal(weights[2], torch.tensor([0.25, 0.0, 0.75]))


@pytest.mark.parametrize(
    ("frame", "params", "message"),
    [
        ({"prompt": ["a"], "style": ["neon"]}, {"steps": 0}, f"steps must be in 1..{MAX_STEPS}"),
        ({"prompt": ["a"], "style": ["neon"], "steps": [100000.0]}, None, "got 100000"),
        ({"prompt": ["a"], "style": ["neon"]}, {"guidance_scale": -1.0}, "guidance_scale"),
        ({"prompt": ["a"], "style": ["nope"]}, None, "unknown style 'nope'"),
        ({"prompt": ["a"], "style": ["neon"], "seed": [1.5]}, None, "whole number"),
        ({"prompt": ["a"], "style": ["neon"], "steps": ["many"]}, None, "steps must be a number"),
        ({"prompt": ["a"]}, None, "missing column"),
        ({"prompt": ["a"] * (MAX_IMAGES + 1), "style": ["neon"] * (MAX_IMAGES + 1)}, None,
         f"rows per request must be in 1..{MAX_IMAGES}, got {MAX_IMAGES + 1}"),
    ],
)  # fmt: skip
def test_bad_requests_name_the_problem(frame, params, message):
    with pytest.raises((ValueError, DmmError), match=message):
        plan_request(pd.DataFrame(frame), params, _resolve())


def test_input_example_is_a_valid_request():
    from dmm.registry.pyfunc import input_example

    frame, params = input_example(STYLES)
    groups = plan_request(frame, params, _resolve())
    assert [rows for _, rows, _, _, _ in groups] == [[0, 1]]
    assert set(params) == {p.name for p in model_signature().params.params}


def test_signature_has_a_params_schema():
    sig = model_signature()
    assert {p.name: p.default for p in sig.params.params} == {
        "steps": 20,
        "seed": 0,
        "guidance_scale": 3.0,
    }
    assert not any(c.required for c in sig.inputs.inputs if c.name in ("seed", "steps"))
    assert sig.params.params[0].dtype.name == "long"


# --- the logged pyfunc model -------------------------------------------------------------


def test_batched_request_equals_one_row_at_a_time(model):
    frame = pd.DataFrame(
        {"prompt": ["a red circle", "a blue square", "a red circle"], "style": ["neon", "0", "2"]}
    )
    params = {"steps": 2, "seed": 5}
    batched = model.predict(frame, params=params)["image"].tolist()
    single = [model.predict(frame.iloc[[i]], params=params)["image"][0] for i in range(3)]
    from PIL import Image

    def pixels(text):
        return torch.tensor(list(Image.open(io.BytesIO(base64.b64decode(text))).getdata()))

    for b, s in zip(batched, single, strict=True):
        assert int((pixels(b) - pixels(s)).abs().max()) <= 1  # one 8-bit level at most
    assert batched[0] != batched[1]


def test_whole_int_columns_still_pass_the_schema(model):
    # Clients that send every row's seed and steps as JSON integers (int64 columns).
    frame = pd.DataFrame({"prompt": ["a"], "style": ["neon"], "seed": [3], "steps": [2]})
    assert len(model.predict(frame)["image"][0]) > 100


def test_a_bad_request_is_an_invalid_parameter_error(model):
    from mlflow.exceptions import MlflowException

    frame = pd.DataFrame({"prompt": ["a"], "style": ["neon"]})
    with pytest.raises(MlflowException, match=r"steps must be in 1\.\.200, got 500") as err:
        model.predict(frame, params={"steps": 500})
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"


# --- a real model server -----------------------------------------------------------------


def _post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.timeout(300)
def test_mlflow_models_serve_answers_a_batched_request_with_params(model_dir, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    # The venv's bin on PATH: the scoring server execs uvicorn by name.
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"), "models", "serve",
            "-m", str(model_dir), "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(port), "--workers", "1",
        ],
        env=tool_env(),
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "model server did not start in 180 s"
                time.sleep(1)
        rows = [
            ["a red circle", "neon", 3],
            ["a blue square", '{"pastel": 0.5, "sepia": 0.5}', None],
        ]
        body = {
            "dataframe_split": {"columns": ["prompt", "style", "seed"], "data": rows},
            "params": {"steps": 2, "guidance_scale": 2.0},
        }
        status, answer = _post(port, body)
        assert status == 200, answer
        assert len(answer["predictions"]) == 2
        for row in answer["predictions"]:
            assert base64.b64decode(row["image"]).startswith(b"\x89PNG")

        status, answer = _post(port, {**body, "params": {"steps": 100000}})
        assert status == 400
        assert "steps must be in 1..200, got 100000" in answer["message"]
        text = json.dumps(answer)
        assert "Traceback" not in text and str(model_dir.parent) not in text
        assert "site-packages" not in text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


# --- dmm generate: the same bounds ------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], f"steps must be in 1..{MAX_STEPS}, got 0"),
        (["--steps", "100000"], f"steps must be in 1..{MAX_STEPS}, got 100000"),
        (["--num-images", "0"], f"--num-images must be in 1..{MAX_IMAGES}, got 0"),
        (["--guidance-scale", "-1"], "guidance_scale must be a finite number >= 0"),
    ],
)
def test_generate_refuses_out_of_bounds_settings(student_dir, tmp_path, args, message):
    from typer.testing import CliRunner

    from dmm.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["generate", "a red circle", "--student", str(student_dir), "--style", "neon",
              "--out", str(out), *args],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and message in res.output
    assert res.output.count("\n") == 1
    assert not out.exists()
