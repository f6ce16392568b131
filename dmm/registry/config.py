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
    # Incremental merging (a later issue) records its parent version here.
    merge_kind: Literal["full", "incremental"] = "full"
    parent_version: str = ""
