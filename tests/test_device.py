"""Device "auto": CUDA when there is one, else the CPU, for sampling as for evaluation."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from dmm.atomic import DmmError
from dmm.device import resolve_device


def test_auto_is_cuda_when_available_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_unknown_device_is_a_one_line_error():
    with pytest.raises(DmmError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_evaluation_and_sampling_share_the_resolution(monkeypatch, tmp_path):
    from dmm.data import samples
    from dmm.data.config import SampleConfig
    from dmm.evaluation.config import EvaluateConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fields = EvaluateConfig.model_fields
    assert fields["device"].default == "auto"
    seen = []
    monkeypatch.setattr(samples, "sample_teacher", lambda *a, device, **k: seen.append(device))
    prompts = tmp_path / "train.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n')
    samples.sample_all({"t": tmp_path}, tmp_path, prompts, tmp_path / "out", SampleConfig(),
                       summary=False)  # fmt: skip
    assert seen == [torch.device("cuda")]


def test_sample_cli_defaults_to_auto_and_refuses_a_bad_device(tmp_path):
    from dmm.cli import app

    runner = CliRunner()
    assert "auto" in runner.invoke(app, ["sample", "--help"]).output
    args = ["sample", "--teacher", f"t={tmp_path}", "--base", str(tmp_path)]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "o"), "--device", "tpu"])
    assert res.exit_code == 2
    assert "unknown device 'tpu'" in res.output
    assert not (tmp_path / "o").exists()
