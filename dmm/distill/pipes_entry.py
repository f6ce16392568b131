"""Distillation as a Dagster Pipes child process.

    accelerate launch [--num_processes N ...] -m dmm.distill.pipes_entry --config cfg.json

The orchestrator (Dagster) never holds the model: it starts this command, and
rank 0 reports back through ``dagster_pipes`` (a small package without
dagster itself): log lines, the losses of every logged step as they are
written to ``metrics.jsonl``, and the final metadata of the student. Started
outside Dagster, Pipes falls back to a no-op context and this is a plain
distillation run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

from dmm.atomic import DmmError

# How often the tail thread looks for new lines of metrics.jsonl.
POLL_SECONDS = 1.0


def process_rank() -> int:
    """The global rank set by accelerate / torchrun (0 when run as one process)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


class MetricsTail(threading.Thread):
    """Forwards each new record of ``metrics.jsonl`` to a callback, from a background thread."""

    def __init__(self, path: Path, on_record) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.on_record = on_record
        self.stopped = threading.Event()
        self.offset = 0
        self.pending = ""
        self.inode: int | None = None
        # A previous run's log stays until this run's first record replaces it:
        # start past it, so that only this run's records are forwarded.
        if path.is_file():
            st = path.stat()
            self.offset, self.inode = st.st_size, st.st_ino

    def poll(self) -> None:
        try:
            fh = open(self.path)
        except FileNotFoundError:
            return
        with fh:
            st = os.fstat(fh.fileno())
            # The trainer replaces the file (a fresh run's first record, or a
            # resumed run's dropped steps) or appends to it.
            if st.st_ino != self.inode or st.st_size < self.offset:
                self.offset, self.pending, self.inode = 0, "", st.st_ino
            fh.seek(self.offset)
            chunk = fh.read()
            self.offset = fh.tell()
        lines = (self.pending + chunk).split("\n")
        self.pending = lines.pop()  # a line still being written
        for line in lines:
            if line.strip():
                self.on_record(json.loads(line))

    def run(self) -> None:
        while not self.stopped.wait(POLL_SECONDS):
            self.poll()

    def stop(self) -> None:
        self.stopped.set()
        self.join()
        self.poll()


def _describe(record: dict) -> str:
    losses = ", ".join(
        f"{k.removeprefix('loss/')} {v:.4g}" for k, v in record.items() if k.startswith("loss/")
    )
    return f"step {record['step']}: {losses}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="DistillConfig as JSON")
    args = parser.parse_args(argv)

    from dmm.distill.config import DistillConfig

    cfg = DistillConfig.model_validate_json(args.config.read_text())
    from dmm.cli import _quiet_libraries

    _quiet_libraries()
    from dmm.distill.trainer import distill

    if process_rank() != 0:
        # Only rank 0 talks to the orchestrator; the others just train.
        distill(cfg)
        return 0

    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        metrics_file = Path(cfg.output_dir) / "metrics.jsonl"

        def on_record(record: dict) -> None:
            pipes.log.info(_describe(record))
            pipes.report_custom_message({"kind": "metrics", "record": record})

        pipes.log.info(
            f"distilling {len(cfg.teachers)} teachers ({', '.join(cfg.style_names)}) "
            f"for {cfg.steps} steps into {cfg.output_dir}"
        )
        tail = MetricsTail(metrics_file, on_record)
        tail.start()
        try:
            final = distill(cfg)
        except DmmError as exc:
            pipes.log.error(str(exc))
            raise
        finally:
            tail.stop()
        summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
        records = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
        last = records[-1] if records else {}
        pipes.report_asset_materialization(
            metadata={
                "student_path": {"raw_value": str(final), "type": "path"},
                "steps": summary["steps"],
                # -1: trained from step 0 (metadata values cannot be null).
                "resumed_from_step": -1
                if summary.get("resumed_from_step") is None
                else summary["resumed_from_step"],
                "world_size": summary["world_size"],
                "train_seconds": summary["seconds"],
                "teacher_placement": summary["teacher_placement"],
                "styles": {"raw_value": summary["styles"], "type": "json"},
                **{f"final_{k.replace('/', '_')}": float(v) for k, v in last.items() if "/" in k},
            }
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DmmError as exc:  # one line for the log; Pipes already carried the details
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
