"""Entry point of the Dagster code location (`dagster dev` from the repo root)."""

import dagster as dg

from pipelines.defs import zoo

defs = dg.Definitions(assets=dg.load_assets_from_modules([zoo]))
