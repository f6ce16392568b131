"""The registration stage's configuration (the ``registry:`` section of params.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dmm.registry.gate import GateThresholds


class RegistryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str = Field("dmm-student", min_length=1, max_length=256)
    experiment: str = Field("dmm", min_length=1)
    gate: GateThresholds = Field(default_factory=GateThresholds)
    # "auto": a manifest that only gained, lost or replaced teachers since the
    # champion is merged incrementally from it; "full" always merges from the base.
    merge: Literal["auto", "full"] = "auto"
    # Distillation settings of incremental merges, on top of params.yaml `distill`.
    incremental: dict = Field(default_factory=lambda: {"steps": 600, "old_style_ratio": "auto"})
