"""The one job: the whole graph, for a range of teacher partitions per run."""

from __future__ import annotations

import dagster as dg

# Unpartitioned assets run once per run; partitioned ones for the run's range.
dmm_job = dg.define_asset_job(
    "dmm_job",
    selection=dg.AssetSelection.all(),
    description="Teachers -> samples -> distillation -> baselines -> evaluation -> registry.",
)
