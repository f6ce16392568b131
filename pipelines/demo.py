"""Helpers of `make demo`: the partition range, a readable terminal, and where to look afterwards.

python -m pipelines.demo partition-range          # "pastel...stripes" from data/teachers.yaml
python -m pipelines.demo run --log FILE -- CMD... # CMD's full output to FILE, a line per stage here
python -m pipelines.demo summary [--since EPOCH] [--log FILE]  # stage times, report, model, UIs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from dmm import layout, names

ROOT = Path(os.environ.get("DMM_REPO_ROOT", Path(__file__).resolve().parents[1]))


def partition_range() -> str:
    from dmm.teachers.manifest import load_manifest

    names = load_manifest(ROOT / layout.MANIFEST, repo_root=ROOT).names
    if not names:
        raise SystemExit(f"error: {layout.MANIFEST} lists no teachers")
    return f"{names[0]}...{names[-1]}"


# A tool's progress line (tqdm's "140/400", "35%"): shown on one self-overwriting
# status line when the terminal is interactive.
PROGRESS = re.compile(r"\d+/\d+|\d+%")
STEP_EVENTS = ("STEP_START", "STEP_SUCCESS", "STEP_FAILURE")
# Metadata shown as a stage's key figures: plain numbers and short texts only.
MAX_FIGURES, MAX_TEXT = 3, 32


def duration_text(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def key_figures(metadata: dict) -> str:
    """ "name value" for the first few numeric or short-text metadata entries."""
    import dagster as dg

    scalar = (dg.IntMetadataValue, dg.FloatMetadataValue, dg.TextMetadataValue)
    out = []
    for name, entry in metadata.items():
        if isinstance(entry, dg.MetadataValue) and not isinstance(entry, scalar):
            continue  # paths, tables, JSON, URLs: the UI shows those
        value = getattr(entry, "value", entry)
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            continue
        if isinstance(value, str) and (len(value) > MAX_TEXT or "/" in value):
            continue
        out.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return ", ".join(out[:MAX_FIGURES])


def _instance():
    import dagster as dg

    return dg.DagsterInstance.get()


def step_figures(instance, run_id: str, step: str) -> str:
    """Key figures of the materializations a step of a run recorded."""
    from dagster import DagsterEventType

    records = instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)
    figures = [
        key_figures(r.dagster_event.event_specific_data.materialization.metadata)
        for r in records
        if r.step_key == step
    ]
    return "; ".join(dict.fromkeys(f for f in figures if f))


class StageConsole:
    """A line per stage start and end and per asset log line (INFO and up); the rest of
    the output (DEBUG events, tool chatter) only feeds a live progress line on a terminal.

    Those lines come from the instance's event log (``StepWatcher``), in the order the
    run wrote them; the console text arrives late and interleaved through log capture.
    """

    def __init__(self, out, figures=step_figures, live: bool | None = None):
        self.out, self.figures, self.started, self.instance = out, figures, {}, None
        self.live = out.isatty() if live is None else live
        self.status = False
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        if self.live and PROGRESS.search(text) and " - dagster - " not in text:
            width = shutil.get_terminal_size().columns - 1
            with self.lock:
                self.out.write("\r\x1b[K" + text.strip()[:width])
                self.out.flush()
                self.status = True

    def record(self, kind: str | None, step: str, timestamp: float, run_id: str, text: str):
        """One event-log record: KIND a step event, or None for an asset's log line."""
        clock = datetime.fromtimestamp(timestamp).strftime("%H:%M:%S")
        if kind is None:
            self._print(f"{clock}  {step:<18} {text[:300]}")
        elif kind == "STEP_START":
            self.started[step] = timestamp
            self._print(f"{clock}  {step:<18} started")
        elif kind == "STEP_SUCCESS":
            took = duration_text(timestamp - self.started.pop(step, timestamp))
            figures = self._figures(run_id, step)
            done = f"{clock}  {step:<18} done in {took}"
            self._print(done + (f"  ({figures})" if figures else ""))
        elif kind == "STEP_FAILURE":
            self._print(f"{clock}  {step:<18} FAILED: {text[:300]}")

    def _figures(self, run_id: str, step: str) -> str:
        try:
            if self.instance is None:
                self.instance = _instance()
            return self.figures(self.instance, run_id, step)
        except Exception as exc:  # noqa: BLE001  (the figures are a courtesy; the run goes on)
            return f"figures unavailable: {type(exc).__name__}"

    def _print(self, text: str) -> None:
        with self.lock:
            if self.status:  # clear the progress line first
                self.out.write("\r\x1b[K")
                self.status = False
            print(text, file=self.out, flush=True)


class StepWatcher(threading.Thread):
    """Polls the instance's event log of the runs created since SINCE into the console."""

    def __init__(self, console: StageConsole, instance, since: float, interval: float = 1.0):
        super().__init__(daemon=True)
        self.console, self.instance, self.since, self.interval = console, instance, since, interval
        self.cursors: dict[str, str | None] = {}
        self.done = threading.Event()

    def run(self) -> None:
        try:
            while not self.done.wait(self.interval):
                self.poll(self.instance)
            self.poll(self.instance)  # the records written just before the command ended
        except Exception as exc:  # noqa: BLE001  (the run goes on; the log has everything)
            self.console._print(f"(stage lines unavailable: {type(exc).__name__}: {exc})")

    def poll(self, instance) -> None:
        from dagster import RunsFilter

        after = datetime.fromtimestamp(self.since, timezone.utc)
        for run in reversed(instance.get_runs(filters=RunsFilter(created_after=after))):
            conn = instance.get_records_for_run(run.run_id, cursor=self.cursors.get(run.run_id))
            for record in conn.records:
                entry = record.event_log_entry
                event = entry.dagster_event
                if event is None and entry.level >= logging.INFO:
                    text = entry.user_message
                elif event is not None and event.event_type_value in STEP_EVENTS:
                    text = _error_text(entry)
                else:
                    continue
                kind = event.event_type_value if event is not None else None
                self.console.record(
                    kind, entry.step_key or "run", entry.timestamp, run.run_id, text
                )
            self.cursors[run.run_id] = conn.cursor


def _error_text(entry) -> str:
    """The root cause's first line, "RuntimeError: ..." (Dagster wraps what a step raised)."""
    error = getattr(entry.dagster_event.event_specific_data, "error", None)
    while error is not None and error.cause is not None:
        error = error.cause
    text = (error.message if error is not None else entry.dagster_event.message) or ""
    first = text.strip().splitlines()[0] if text.strip() else "see the log"
    return re.sub(r"^[\w.]+\.(\w+: )", r"\1", first)  # "dagster._core...Failure: " -> "Failure: "


def run_logged(cmd: list[str], log: Path, verbose: bool, out=sys.stdout) -> int:
    """Run CMD with its output appended to LOG; the terminal gets all of it only if VERBOSE."""
    console = StageConsole(out)
    log.parent.mkdir(parents=True, exist_ok=True)
    watcher = None
    if not verbose:
        try:
            # Opened (its storage created) before CMD starts, so the two never race to create it.
            console.instance = _instance()
            console.instance.get_runs(limit=1)
            watcher = StepWatcher(console, console.instance, time.time() - 1)
        except Exception as exc:  # noqa: BLE001  (no stage lines, but the run and its log go on)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(f"(no stage lines: {type(exc).__name__}: {first})", file=out)
    with log.open("ab") as sink:
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except FileNotFoundError:
            print(f"error: {cmd[0]}: command not found", file=out)
            return 127
        if watcher is not None:
            watcher.start()
        pending = b""
        while chunk := proc.stdout.read1(65536):
            sink.write(chunk)
            sink.flush()
            if verbose:
                out.write(chunk.decode(errors="replace"))
                out.flush()
                continue
            # Progress bars redraw with \r: each redraw is a line to the log, not to the terminal.
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            for raw in lines:
                console.line(raw.decode(errors="replace"))
        console.line(pending.decode(errors="replace"))
    rc = proc.wait()
    if watcher is not None:
        watcher.done.set()
        watcher.join()
    if rc != 0:
        print(f"error: `{' '.join(cmd[:3])} ...` exited {rc}; full log: {log}", file=out)
    return rc


def stage_times(instance, since: float | None = None) -> list[tuple[str, float, str, str]]:
    """(step, seconds, status, key figures) per step of the runs created since SINCE (epoch s).

    Without SINCE: the latest run. Read from the instance's event log, so they hold for
    runs launched from the UI too.
    """
    from dagster import DagsterEventType, RunsFilter

    created_after = datetime.fromtimestamp(since, timezone.utc) if since is not None else None
    runs = instance.get_runs(
        filters=RunsFilter(created_after=created_after), limit=None if since else 1
    )
    kinds = {getattr(DagsterEventType, e) for e in STEP_EVENTS}
    rows = []
    for run in reversed(runs):  # oldest first
        started: dict[str, float] = {}
        for record in instance.all_logs(run.run_id, of_type=kinds):
            kind = record.dagster_event.event_type_value
            if kind == "STEP_START":
                started[record.step_key] = record.timestamp
                continue
            seconds = record.timestamp - started.get(record.step_key, record.timestamp)
            status = "ok" if kind == "STEP_SUCCESS" else "FAILED"
            figures = step_figures(instance, run.run_id, record.step_key)
            rows.append((record.step_key, seconds, status, figures))
    return rows


def stage_table(rows: list[tuple[str, float, str, str]]) -> list[str]:
    total_label = "(sum of steps)"
    width = max([len(total_label), *(len(r[0]) for r in rows)])
    lines = [
        f"  {step:<{width}}  {duration_text(secs):>8}  {status:<6} {figures}".rstrip()
        for step, secs, status, figures in rows
    ]
    total = sum(r[1] for r in rows)
    return [*lines, f"  {total_label:<{width}}  {duration_text(total):>8}"]


def summary(since: float | None = None, log: Path | None = None) -> str:
    from dmm.registry.tracking import default_artifact_root, default_tracking_uri

    registered = ROOT / layout.STUDENT / names.REGISTERED_FILE
    model = json.loads(registered.read_text()) if registered.is_file() else None
    evaluation = ROOT / layout.EVALUATION / "evaluation.json"
    ratio = json.loads(evaluation.read_text())["fid_t_ratio"] if evaluation.is_file() else None
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(ROOT)
    rows = stage_times(_instance(), since) if os.environ.get("DAGSTER_HOME") else []
    lines = ["", "Stage times (Dagster steps; the run's own start-up comes on top):"]
    lines += stage_table(rows) if rows else ["  (no Dagster run found under DAGSTER_HOME)"]
    lines += [
        "",
        f"Teachers:  {layout.TEACHERS}/<name> (manifest {layout.MANIFEST})",
        f"Student:   {layout.CHAMPION} (the champion; this merge's candidate: "
        f"{layout.STUDENT}/student)",
        f"Preview:   {layout.PREVIEW}/grid.png (one row per style)",
        f"Report:    {layout.EVALUATION}/report.html"
        + (f" (FD_t ratio {ratio:.3f})" if ratio is not None else ""),
    ]
    if model:
        lines.append(
            f"Model:     models:/{model['name']}@{model['alias']} (version {model['version']})"
        )
    lines += [
        "",
        "Dagster UI (runs, asset graph, metadata):  make ui   -> http://127.0.0.1:3000",
        "  with the sensor and schedule daemon:     make dev",
        "MLflow UI (runs, registered models):       make mlflow-ui -> http://127.0.0.1:5000",
        f"  i.e. mlflow ui --backend-store-uri {tracking} "
        f"--default-artifact-root {default_artifact_root(ROOT)} --host 127.0.0.1 --port 5000",
    ]
    if log is not None:
        lines += ["", f"Full log (Dagster DEBUG events, every tool's output): {log}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("partition-range", help="the teachers' partition range")
    run = sub.add_parser("run", help="run a command, its output to --log, a line per stage here")
    run.add_argument("--log", type=Path, required=True, help="file the full output is appended to")
    run.add_argument("--verbose", action="store_true", help="also show the full output here")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    summ = sub.add_parser("summary", help="stage times, outputs, UI commands")
    summ.add_argument("--since", type=float, help="epoch seconds: time the runs created since")
    summ.add_argument("--log", type=Path, help="the full log's path, to name it")
    args = parser.parse_args(argv)
    if args.command == "run":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("run needs a command after --")
        return run_logged(cmd, args.log, args.verbose)
    print(partition_range() if args.command == "partition-range" else summary(args.since, args.log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
