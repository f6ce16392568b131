"""`make demo`'s terminal: a line per stage, the full output in a log, stage times in the summary."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

from pipelines import demo

DAGSTER = str(Path(sys.executable).parent / "dagster")
RUN_ID = "42ee9d8a-b233-40f4-8d22-4dad3b8bfef4"
# Two assets that talk on stdout, and one that fails; in-process, so the run takes seconds.
DEFS = """
import dagster as dg

@dg.asset
def first(context) -> dg.MaterializeResult:
    print("chatter from first")
    context.log.info("counting")
    return dg.MaterializeResult(metadata={"count": 3, "ratio": 1.23456, "path": "/x/y"})

@dg.asset(deps=[first])
def second() -> None:
    print("chatter from second\\r50%\\r100%")

@dg.asset
def broken() -> None:
    raise RuntimeError("teacher folder missing")

defs = dg.Definitions(assets=[first, second, broken], executor=dg.in_process_executor)
"""


def _event(step: str | None, event: str, level: str = "DEBUG", message: str = "m") -> str:
    where = f"{step} - " if step else ""
    return (
        f"2026-12-01 23:16:23 +0000 - dagster - {level} - __ASSET_JOB - {RUN_ID} - 25928 - "
        f"{where}{event} - {message}"
    )


def test_stage_console_prints_stage_records_and_asset_lines_only():
    out = io.StringIO()
    seen = []
    console = demo.StageConsole(out, figures=lambda inst, run, step: seen.append(run) or "fd 2")
    console.instance = object()  # the figures stub needs no Dagster instance
    console.line(_event("zoo", "STEP_START"))  # console text: ignored (not a terminal)
    console.line("zoo:  40%|####      | 4/10 [00:02<00:03]")
    console.record("STEP_START", "zoo", 1000.0, RUN_ID, "")
    console.record(None, "zoo", 1001.0, RUN_ID, "$ dvc repro zoo")
    console.record("STEP_SUCCESS", "zoo", 1061.4, RUN_ID, "")
    console.record("STEP_FAILURE", "distill", 1100.0, RUN_ID, "RuntimeError: out of memory")
    lines = out.getvalue().splitlines()
    assert [line.split()[1:3] for line in lines] == [
        ["zoo", "started"],
        ["zoo", "$"],
        ["zoo", "done"],
        ["distill", "FAILED:"],
    ]
    assert lines[1].endswith("zoo                $ dvc repro zoo")
    assert "done in 1m 01s  (fd 2)" in lines[2]
    assert lines[3].endswith("RuntimeError: out of memory")
    assert seen == [RUN_ID]


def test_stage_console_shows_progress_on_one_line_of_a_terminal():
    out = io.StringIO()
    console = demo.StageConsole(out, figures=lambda *a: "", live=True)
    console.instance = object()
    console.line("a warning nobody needs")
    console.line("distill:  40%|####      | 160/400 [01:00<01:30]")
    console.line("distill:  41%|####      | 164/400 [01:01<01:29]")
    console.line(_event("distill", "STEP_START"))  # Dagster's own lines are not progress
    console.record("STEP_START", "distill", 1000.0, RUN_ID, "")
    text = out.getvalue()
    assert "warning" not in text
    assert text.count("\r\x1b[K") == 3  # two redraws, then cleared for the stage line
    assert text.split("\r\x1b[K")[2].startswith("distill:  41%")
    assert text.endswith("started\n")


def test_key_figures_keep_numbers_and_short_texts():
    import dagster as dg

    metadata = {
        "path": dg.MetadataValue.path("/a/b"),
        "ratio": dg.MetadataValue.float(2.049987),
        "passed": dg.MetadataValue.bool(True),
        "n": dg.MetadataValue.int(5),
        "table": dg.MetadataValue.md("| a |"),
        "fingerprint": "f" * 64,
    }
    assert demo.key_figures(metadata) == "ratio 2.05, n 5"
    assert demo.duration_text(61.4) == "1m 01s"


def test_run_logged_and_stage_times_on_a_real_dagster_run(tmp_path, monkeypatch):
    import dagster as dg

    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    defs = tmp_path / "defs.py"
    defs.write_text(DEFS)
    log = tmp_path / "demo.log"
    since = time.time() - 1
    out = io.StringIO()
    cmd = [DAGSTER, "asset", "materialize", "-f", str(defs), "--select", "first,second"]
    assert demo.run_logged(cmd, log, verbose=False, out=out) == 0, log.read_text()[-3000:]
    shown = out.getvalue()
    assert [line.split()[1:3] for line in shown.splitlines()] == [
        ["first", "started"],
        ["first", "counting"],  # an asset's own line, after its step's start
        ["first", "done"],
        ["second", "started"],
        ["second", "done"],
    ], shown + log.read_text()
    assert "(count 3, ratio 1.235)" in shown
    assert "DEBUG" not in shown and "chatter" not in shown and "100%" not in shown
    full = log.read_text()
    assert "STEP_START" in full and "chatter from first" in full and "100%" in full

    bad = io.StringIO()
    cmd = [DAGSTER, "asset", "materialize", "-f", str(defs), "--select", "broken"]
    assert demo.run_logged(cmd, log, verbose=False, out=bad) != 0
    assert "broken             FAILED: RuntimeError: teacher folder missing" in bad.getvalue()
    assert f"full log: {log}" in bad.getvalue()
    assert "teacher folder missing" in log.read_text()  # appended, not overwritten
    assert "chatter from first" in log.read_text()

    rows = demo.stage_times(dg.DagsterInstance.get(), since)
    assert [(step, status) for step, _, status, _ in rows] == [
        ("first", "ok"),
        ("second", "ok"),
        ("broken", "FAILED"),
    ]
    assert all(secs >= 0 for _, secs, _, _ in rows)
    assert rows[0][3] == "count 3, ratio 1.235"
    assert [r[0] for r in demo.stage_times(dg.DagsterInstance.get())] == ["broken"]
    text = demo.summary(since, log)
    assert "Stage times" in text and "first" in text and "Full log" in text and str(log) in text


def test_run_logged_names_a_missing_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    out = io.StringIO()
    assert demo.run_logged(["no-such-tool-dmm"], tmp_path / "log", verbose=False, out=out) == 127
    assert out.getvalue() == "error: no-such-tool-dmm: command not found\n"
    monkeypatch.delenv("DAGSTER_HOME")
    out = io.StringIO()
    assert demo.run_logged([sys.executable, "-c", "print('hi')"], tmp_path / "log", False, out) == 0
    assert out.getvalue().startswith("(no stage lines: DagsterHomeNotSetError: ")
    assert (tmp_path / "log").read_text().endswith("hi\n")
