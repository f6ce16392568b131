"""A broken teacher stops `dmm distill` with one line naming it, before any training."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dmm.cli import app
from dmm.distill.teachers import unet_weights_file
from tests.test_distill import make_cfg


def _copy_teacher(distill_data, tmp_path):
    zoo, root, teachers = distill_data
    bad = tmp_path / "pastel"
    shutil.copytree(teachers["pastel"], bad)
    return (zoo, root, {**teachers, "pastel": bad}), unet_weights_file(bad)


def _distill_cli(cfg, tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({"distill": json.loads(cfg.model_dump_json())}))
    return CliRunner().invoke(app, ["distill", "--config", str(cfg_file)])


def _error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    return lines[0]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_teacher_with_non_finite_weights_is_named(distill_data, tmp_path, value):
    data, weights = _copy_teacher(distill_data, tmp_path)
    state = load_file(weights)
    key = "up_blocks.0.resnets.0.conv1.weight"
    state[key] = state[key].clone()
    state[key].view(-1)[3] = value
    save_file(state, weights, metadata={"format": "pt"})
    cfg = make_cfg(data, tmp_path / "run", ["neon", "pastel"], steps=1)
    line = _error_line(_distill_cli(cfg, tmp_path))
    assert "teacher 'pastel' has NaN/inf weights" in line and key in line
    assert not (tmp_path / "run" / "student").exists()


@pytest.mark.parametrize("init", ["base", "teacher_mean"])
def test_truncated_teacher_file_is_named(distill_data, tmp_path, init):
    data, weights = _copy_teacher(distill_data, tmp_path)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cfg = make_cfg(data, tmp_path / "run", ["pastel"], steps=1, init=init)
    line = _error_line(_distill_cli(cfg, tmp_path))
    assert line.startswith("error: ") and str(weights) in line
    assert "SafetensorError" not in line
    assert not (tmp_path / "run" / "student").exists()
