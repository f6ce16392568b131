"""The evaluation stage's configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dmm.device import DEVICE_HELP, DEVICE_PATTERN, resolve_device
from dmm.names import STYLE_NAME_PATTERN


class TeacherRef(BaseModel):
    # Extra keys are ignored so that params.yaml can share one teacher list
    # (a YAML anchor) between distillation, which also reads `samples`, and evaluation.
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=STYLE_NAME_PATTERN)
    path: Path


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    student: Path = Path("data/student/student")
    teachers: list[TeacherRef] = Field(min_length=1)
    baselines: dict[str, Path] = Field(default_factory=dict, description="name -> pipeline folder")
    prompts: Path = Path("data/prompts/eval.jsonl")
    classifier: Path = Path("data/zoo/classifier")
    output_dir: Path = Path("data/evaluation")
    feature_extractor: Literal["stylenet", "inception"] = "stylenet"
    inception_weights: Path | None = None
    images_per_style: int = Field(192, ge=2)
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(3.0, ge=0)
    seed: int = Field(1234, ge=0)
    # The reference floor compares teacher i with itself under other seeds.
    reference_seed_offset: int = Field(1_000_003, ge=1)
    # Uncertainty: a paired bootstrap over the K (prompt, seed) items gives every
    # figure an interval; `repeats` > 1 also re-samples every model under new seeds
    # and averages (each repeat costs a full evaluation's sampling).
    confidence: float = Field(0.9, gt=0, lt=1, description="coverage of every interval")
    bootstrap: int = Field(
        200, ge=1, description="bootstrap replicates (at least 10 / (1 - confidence))"
    )
    repeats: int = Field(1, ge=1, description="evaluations under disjoint sample seeds, averaged")
    interval_target: float | None = Field(
        None,
        gt=0,
        description="fail unless the independent-seed ratio's interval is at most +/- this "
        "(the error names the images per style it needs)",
    )
    # Mixing (paper Table 3): the student's style path between two styles against
    # weight-averaging the two teachers; interior points cost 2 x mixing_images samples each.
    mixing: bool = Field(True, description="compare style mixing with weight averaging")
    interpolate: tuple[str, str] | None = Field(
        None, description="the two styles of the mixing path (default: the first two)"
    )
    interpolation_points: int = Field(5, ge=2, description="points on the path, ends included")
    mixing_images: int = Field(
        128, ge=1, description="images per point (FD to the ends needs 2 x the feature width)"
    )
    batch_size: int = Field(192, ge=1)
    cache_dir: Path | None = Field(
        None,
        description="teacher images kept across evaluations (keyed by weights, prompts, "
        "seeds, sampler); null: sample them every time",
    )
    distill_dir: Path | None = Field(
        None, description="run folder with metrics.jsonl for loss curves"
    )
    convergence: bool = Field(
        False, description="also score every checkpoint of distill_dir: FD_t ratio vs steps"
    )
    base: Path | None = Field(None, description="base pipeline (needed for convergence)")
    # Sampling dominates evaluation time; on a GPU every pipeline is moved there.
    # Seeds stay on CPU generators, so images match across devices up to float error.
    device: str = Field("auto", pattern=DEVICE_PATTERN, description=DEVICE_HELP)

    def torch_device(self):
        return resolve_device(self.device)
