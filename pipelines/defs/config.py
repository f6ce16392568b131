"""Run configuration: Dagster ``Config`` classes whose contents dmm's pydantic models validate.

Overrides use the CLI's ``--set key=value`` syntax, so what works on the command
line (``dmm distill --set steps=100``) works in the launchpad
(``overrides: ["steps=100"]``), and one model (DistillConfig, EvaluateConfig,
GateThresholds, RegistryConfig) decides what is valid.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import Field, ValidationError

from dmm.config import deep_merge, parse_overrides
from pipelines import layout


def validated(model: type, base: dict[str, Any], overrides: list[str], what: str):
    """``model(**(base <- overrides))``, or a Failure listing every invalid field."""
    try:
        return model(**deep_merge(base, parse_overrides(overrides)))
    except ValidationError as exc:
        parts = [
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()
        ]
        raise dg.Failure(description=f"invalid {what} config: {'; '.join(parts)}") from exc
    except ValueError as exc:
        raise dg.Failure(description=f"invalid {what} override: {exc}") from exc


class DistillRunConfig(dg.Config):
    overrides: list[str] = Field(
        default_factory=list,
        description='DistillConfig overrides, as `dmm distill --set`: e.g. ["steps=100"]',
    )
    force: bool = Field(False, description="distill even if an identical student exists")
    full_merge: bool = Field(
        False,
        description="merge every teacher from the base, even where an incremental merge "
        "from the champion would do (params.yaml registry.merge sets the default)",
    )
    preview_steps: int = Field(20, ge=1, description="sampler steps of the preview grid")


class BaselinesRunConfig(dg.Config):
    methods: list[str] = Field(default_factory=lambda: list(layout.BASELINE_METHODS))
    force: bool = Field(False, description="merge even if an identical baseline exists")


class EvaluateRunConfig(dg.Config):
    overrides: list[str] = Field(
        default_factory=list,
        description='EvaluateConfig overrides, as `dmm evaluate --set`: e.g. ["images_per_style=256"]',
    )
    force: bool = Field(False, description="evaluate even if this student was evaluated as is")


class GateRunConfig(dg.Config):
    """Thresholds of the evaluation gate; unset fields come from params.yaml ``registry.gate``."""

    max_fid_t_ratio: float | None = None
    min_relative_style_accuracy: float | None = None
    baseline_ratio_factor: float | None = None
    max_independent_ratio: float | None = None
    old_style_tolerance: float | None = None

    def overrides(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class RegisterRunConfig(dg.Config):
    overrides: list[str] = Field(
        default_factory=list,
        description='RegistryConfig overrides: e.g. ["model_name=my-student"]',
    )
