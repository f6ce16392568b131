"""How the CLI presents itself: help on every option, --version, order, `dmm config show`."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from dmm import __version__
from dmm.cli import COMMAND_ORDER, app
from dmm.config_cli import STAGE_MODELS, config_rows, stage_model

runner = CliRunner()


def _walk(command, path):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _walk(sub, [*path, name])


def test_every_option_and_argument_of_every_command_has_help():
    missing = [
        f"{' '.join(path)} {param.opts[0]}"
        for path, command in _walk(typer.main.get_command(app), ["dmm"])
        for param in command.params
        if not (getattr(param, "help", None) or "").strip()
    ]
    assert not missing, f"no help text: {missing}"


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"dmm {__version__}"


def test_help_lists_commands_in_pipeline_order():
    group = typer.main.get_command(app)
    registered = set(group.commands)
    assert registered == set(COMMAND_ORDER), "every command needs a place in COMMAND_PANELS"
    out = runner.invoke(app, ["--help"], env={"COLUMNS": "120"}).output
    # A command's row starts with its name, after the panel's border.
    listed = [w[0] for w in (line.strip("│ ").split() for line in out.splitlines()) if w]
    listed = [name for name in listed if name in registered]
    assert listed == COMMAND_ORDER
    assert COMMAND_ORDER[:4] == ["zoo", "teachers", "prompts", "sample"]


def test_distill_and_evaluate_help_point_to_config_show():
    for stage in ("distill", "evaluate"):
        out = runner.invoke(app, [stage, "--help"], env={"COLUMNS": "200"}).output
        assert f"dmm config show {stage}" in out
        assert "Without" in out and "--config" in out
        assert "data/student/student" in out if stage == "distill" else "data/evaluation" in out


def test_config_show_distill_lists_lr_default_and_description():
    result = runner.invoke(app, ["config", "show", "distill"])
    assert result.exit_code == 0, result.output
    lr = next(line for line in result.output.splitlines() if line.split()[:1] == ["lr"])
    assert lr.split()[1:3] == ["float", "0.0003"]
    assert "paper (SD1.5): 1e-5" in lr and "> 0" in lr
    feature = next(ln for ln in result.output.splitlines() if ln.startswith("losses.feature "))
    assert "0.001" in feature
    assert any(ln.startswith("base ") and "(required)" in ln for ln in result.output.splitlines())


def test_config_show_every_stage_lists_every_field():
    for stage in STAGE_MODELS:
        model = stage_model(stage)
        keys = {row[0] for row in config_rows(model)}
        assert set(model.model_fields) <= keys
        result = runner.invoke(app, ["config", "show", stage])
        assert result.exit_code == 0, (stage, result.output)
    keys = {row[0] for row in config_rows(stage_model("registry"))}
    assert "gate.max_fid_t_ratio" in keys


def test_config_show_unknown_stage_is_a_one_line_error():
    result = runner.invoke(app, ["config", "show", "nope"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: unknown stage 'nope'; known: ")
    assert all(stage in lines[0] for stage in STAGE_MODELS)
