"""Definitions by concern: assets, asset checks, resources, jobs, sensors, schedules."""

import warnings

import dagster as dg

# Single-run backfills are what make a teacher range one run; the beta notice
# would otherwise repeat in every step's log.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)
