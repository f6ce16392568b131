"""Helpers of `make demo`: the teacher partition range, and where to look afterwards.

python -m pipelines.demo partition-range   # "pastel...stripes" from data/teachers.yaml
python -m pipelines.demo summary           # report, model version, UI commands
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dmm import layout, names

ROOT = Path(os.environ.get("DMM_REPO_ROOT", Path(__file__).resolve().parents[1]))


def partition_range() -> str:
    from dmm.teachers.manifest import load_manifest

    names = load_manifest(ROOT / layout.MANIFEST, repo_root=ROOT).names
    if not names:
        raise SystemExit(f"error: {layout.MANIFEST} lists no teachers")
    return f"{names[0]}...{names[-1]}"


def summary() -> str:
    from dmm.registry.tracking import default_artifact_root, default_tracking_uri

    registered = ROOT / layout.STUDENT / names.REGISTERED_FILE
    model = json.loads(registered.read_text()) if registered.is_file() else None
    evaluation = ROOT / layout.EVALUATION / "evaluation.json"
    ratio = json.loads(evaluation.read_text())["fid_t_ratio"] if evaluation.is_file() else None
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(ROOT)
    lines = [
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["partition-range", "summary"])
    args = parser.parse_args(argv)
    print(partition_range() if args.command == "partition-range" else summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
