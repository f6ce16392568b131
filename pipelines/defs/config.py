"""Run configuration: typed Dagster ``Config`` fields generated from dmm's stage configs.

The launchpad shows one optional field per scalar setting of ``DistillConfig``
and ``EvaluateConfig`` (with their descriptions); a field left unset keeps
params.yaml's value. What is set becomes the merge request
(``data/plan/request.json``) that the plan and the DVC stages read, so a
Dagster run and ``dvc repro`` train exactly the same thing.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import dagster as dg
from pydantic import BaseModel, Field, ValidationError, create_model

from dmm.distill.config import DistillConfig
from dmm.evaluation.config import EvaluateConfig

_SCALARS = (int, float, bool, str)
# Set by the plan from the manifest and the project layout, never by a run.
_PLANNED = {
    "base", "teachers", "output_dir", "init_from", "retire", "replace", "resume", "progress",
    "log_with", "student", "baselines", "prompts", "classifier", "cache_dir", "distill_dir",
    "inception_weights",
}  # fmt: skip


def _launchpad_type(annotation: Any) -> type | None:
    """The launchpad type of a config field: its scalar type, or None when it has none."""
    if annotation in _SCALARS:
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        values = typing.get_args(annotation)
        kinds = {type(v) for v in values}
        return kinds.pop() if len(kinds) == 1 and kinds <= set(_SCALARS) else None
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _launchpad_type(inner[0]) if len(inner) == 1 else None
    return None


def settings_config(model: type[BaseModel], name: str) -> type[dg.Config]:
    """A Dagster Config with one optional field per scalar field of ``model``."""
    fields: dict[str, Any] = {}
    for key, info in model.model_fields.items():
        kind = _launchpad_type(info.annotation)
        if key in _PLANNED or kind is None:
            continue
        default = info.default if not callable(info.default_factory) else None
        hint = f" (params.yaml, else {default!r})" if default is not None else ""
        fields[key] = (kind | None, Field(None, description=(info.description or key) + hint))
    return create_model(name, __base__=dg.Config, **fields)


DistillSettings = settings_config(DistillConfig, "DistillSettings")
EvaluateSettings = settings_config(EvaluateConfig, "EvaluateSettings")


def set_fields(settings: dg.Config) -> dict[str, Any]:
    return {k: v for k, v in settings.model_dump().items() if v is not None}


class DistillRunConfig(dg.Config):
    force: bool = Field(False, description="distill even if DVC holds this exact student")


class EvaluateRunConfig(dg.Config):
    force: bool = Field(False, description="evaluate even if DVC holds this exact evaluation")


class BaselinesRunConfig(dg.Config):
    force: bool = Field(False, description="merge even if DVC holds these exact baselines")


class GateRunConfig(dg.Config):
    """Thresholds of the evaluation gate; unset fields come from params.yaml ``registry.gate``."""

    max_fid_t_ratio: float | None = None
    min_relative_style_accuracy: float | None = None
    baseline_ratio_factor: float | None = None
    max_independent_ratio: float | None = None
    old_style_tolerance: float | None = None

    def overrides(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


def failure_from(exc: Exception, what: str) -> dg.Failure:
    """A one-line Failure for a dmm error or an invalid config."""
    if isinstance(exc, ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return dg.Failure(description=f"invalid {what} config: {'; '.join(parts)}")
    return dg.Failure(description=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
