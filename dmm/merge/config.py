"""The static-merge stage's configuration: one pydantic model for CLI and API."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Kept equal to dmm.merge.methods.DEFAULT_*; a test checks it. The numbers are
# repeated here so that importing the config (the CLI does) does not import torch.
MethodName = Literal["weighted", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
METHOD_NAMES: tuple[str, ...] = ("weighted", "task_arithmetic", "ties", "dare_linear", "dare_ties")

# Which parameters each method reads (mirrors methods.METHODS[...].params).
METHOD_PARAMS: dict[str, tuple[str, ...]] = {
    "weighted": ("weights",),
    "task_arithmetic": ("weights", "lam"),
    "ties": ("weights", "lam", "k"),
    "dare_linear": ("weights", "lam", "p", "seed"),
    "dare_ties": ("weights", "lam", "p", "k", "seed"),
}


class MergeConfig(BaseModel):
    """A static merge: the method and every parameter, with validated ranges.

    Parameters a method does not read are accepted (a shared params.yaml may set
    them all) but left out of :meth:`params`, and so out of the output metadata.
    """

    model_config = ConfigDict(extra="forbid")

    method: MethodName
    weights: list[float] | None = Field(
        None, description="relative teacher weights, normalised to sum 1; None = uniform"
    )
    lam: float = Field(1.0, description="scale of the merged task vector")
    k: float = Field(0.2, gt=0.0, le=1.0, description="TIES: fraction of entries kept")
    p: float = Field(0.9, ge=0.0, lt=1.0, description="DARE: drop probability")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="DARE: RNG seed")
    block_weights: list[float] | None = Field(
        None,
        description="per-block merge strength (MBW), IN00..M00..OUT.., optionally BASE first; "
        "read by every method (dmm/merge/blocks.py); None = 1 everywhere",
    )

    @field_validator("weights")
    @classmethod
    def _weights_ok(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("weights must not be empty (omit them for uniform weights)")
        if any(not math.isfinite(x) or x < 0 for x in v):
            raise ValueError("weights must be finite and non-negative")
        if sum(v) <= 0:
            raise ValueError("weights must not all be zero")
        return v

    @field_validator("block_weights")
    @classmethod
    def _block_weights_finite(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(not math.isfinite(x) for x in v)):
            raise ValueError("block weights must be a non-empty list of finite numbers")
        return v

    @field_validator("lam")
    @classmethod
    def _lam_finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("lam must be finite")
        return v

    @property
    def random(self) -> bool:
        return "seed" in METHOD_PARAMS[self.method]

    def normalized_weights(self, n_teachers: int) -> list[float]:
        if self.weights is None:
            return [1.0 / n_teachers] * n_teachers
        if len(self.weights) != n_teachers:
            raise ValueError(f"got {len(self.weights)} weights for {n_teachers} teachers")
        total = sum(self.weights)
        return [w / total for w in self.weights]

    def params(self, n_teachers: int) -> dict[str, Any]:
        """The parameters the method reads, defaults included, weights normalised."""
        out: dict[str, Any] = {}
        for name in METHOD_PARAMS[self.method]:
            out[name] = (
                self.normalized_weights(n_teachers) if name == "weights" else getattr(self, name)
            )
        return out
