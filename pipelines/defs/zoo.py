"""The toy zoo as an asset: built through DVC so that data versions stay DVC's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import dagster as dg

REPO_ROOT = Path(__file__).resolve().parents[2]


@dg.asset(
    group_name="zoo",
    description="The embedded toy teacher zoo (base, style teachers, style classifier).",
    kinds={"dvc", "diffusers"},
)
def zoo(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    cmd = ["dvc", "repro", "zoo"]
    context.log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise dg.Failure(description=f"dvc repro zoo failed: {proc.stderr.strip()[-2000:]}")
    manifest = json.loads((REPO_ROOT / "data/zoo/zoo.json").read_text())
    metrics = manifest["metrics"]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(REPO_ROOT / "data/zoo")),
            "teachers": dg.MetadataValue.json(list(manifest["teachers"])),
            "classifier_accuracy": float(metrics["classifier_accuracy"]),
            "total_mb": round(manifest["total_bytes"] / 1e6, 1),
            "fingerprint": manifest["fingerprint"],
        }
    )
