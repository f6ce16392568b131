"""The distillation stage's configuration (YAML file + ``--set key=value`` overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dmm.hashing import fingerprint
from dmm.names import STYLE_NAME_PATTERN

# Fields that say how a run is driven or where it writes, never what it trains:
# the fingerprint leaves them out, so e.g. a resume or a new output folder keeps it.
RUN_ONLY_FIELDS = frozenset(
    {"output_dir", "resume", "progress", "log_with", "log_every", "checkpoint_every",
     "checkpoints_total_limit"}
)  # fmt: skip


class LossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    score: bool = True
    # Paper weights: feature imitation 0.001, multi-class adversarial 0.01.
    feature: float = Field(0.001, ge=0)
    adversarial: float = Field(0.0, ge=0, description="0 disables; the paper uses 0.01")
    discriminator_lr: float = Field(1e-5, gt=0)


class TeacherSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=STYLE_NAME_PATTERN)
    path: Path  # a diffusers pipeline folder
    samples: Path  # the teacher's sample cache (dmm sample)


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: Path
    teachers: list[TeacherSpec] = Field(min_length=1)
    output_dir: Path = Path("data/student")

    steps: int = Field(400, ge=1, description="optimizer steps; each sees every teacher")
    batch_size: int = Field(32, ge=1, description="samples per teacher per step, per process")
    lr: float = Field(3e-4, gt=0, description="paper (SD1.5): 1e-5")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-2, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    warmup_steps: int = Field(20, ge=0)
    # "wsd" (warmup-stable-decay) holds the rate, then decays it linearly to zero
    # over the last `decay_fraction` of the steps, so the final weights are not a
    # noisy mid-stride iterate (the zoo's schedule study: benchmarks/RESULTS.md).
    lr_schedule: Literal["constant", "cosine", "wsd"] = "wsd"
    decay_fraction: float = Field(0.4, gt=0, le=1, description="share of steps in wsd's decay")
    # The style MLP and codebook start from nothing (zero last layer) while the
    # UNet starts from the base, so they may learn faster.
    style_lr_scale: float = Field(1.0, gt=0, description="lr multiplier of style MLP + codebook")
    style_warmup_steps: int = Field(
        0, ge=0, description="first steps in which only the style MLP + codebook train"
    )
    # "base": the student starts as the base UNet. "teacher_mean": as the plain
    # average of the teachers' UNets (the weighted-sum merge), which is already
    # nearer every teacher; the zero-initialised style MLP then learns only
    # what separates them. Full merges only: an incremental one starts from
    # its previous student.
    init: Literal["base", "teacher_mean"] = "base"
    caption_dropout: float = Field(0.1, ge=0, le=1)
    losses: LossConfig = Field(default_factory=LossConfig)

    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = Field(0.999, gt=0, lt=1)
    # "device" keeps every teacher on the accelerator; "offload" keeps them in
    # host RAM and copies one in per micro-batch (flat device memory in N);
    # "auto" offloads when they would not fit.
    teacher_placement: Literal["auto", "device", "offload"] = "auto"

    # Incremental merging: start from a previous student; its styles that are
    # neither retired nor replaced are taught by the frozen previous student.
    init_from: Path | None = Field(None, description="previous student pipeline folder")
    retire: list[str] = Field(default_factory=list, description="old styles to drop")
    replace: list[str] = Field(
        default_factory=list, description="old styles retrained from a new teacher of that name"
    )
    # "auto": the old styles' share of all styles trained, so every style, old
    # or new, gets the share it would get in a full merge.
    old_style_ratio: float | Literal["auto"] = Field(
        "auto",
        description="share of each step's loss spent on old styles (0: no regularization)",
    )

    # Where old styles' x0 come from. "new_teachers": the new teachers' samples.
    # "previous_student": the previous student samples each old style on the new
    # teachers' prompts before training, so old styles are held on their own
    # images (held them best from a long parent; benchmarks/RESULTS.md). The CLI
    # default stays the cheaper one; params.yaml's incremental merges use it.
    old_style_x0: Literal["previous_student", "new_teachers"] = "new_teachers"
    # "per_style": one micro-batch per old style, so every old style sees as
    # many samples per step as in a full merge, with the previous student
    # standing in for its teacher; a step costs what a full merge's does. "shared":
    # one micro-batch for all old styles, each sample asking for a random one
    # (cheaper steps, noisier old-style gradients; on the zoo it let old styles
    # drift: benchmarks/RESULTS.md, incremental merging).
    old_style_batches: Literal["shared", "per_style"] = "per_style"
    old_style_sample_steps: int = Field(10, ge=1, description="DPM-Solver++ steps of that replay")
    old_style_guidance: float = Field(3.0, ge=0, description="its classifier-free guidance")
    old_style_samples: int = Field(
        256, ge=1, description="replayed x0 per old style (capped at the prompts available)"
    )

    checkpoint_every: int = Field(100, ge=1)
    checkpoints_total_limit: int | None = Field(3, ge=1)
    resume: str | None = Field(
        None,
        description='"latest" (newest checkpoint of this config; an error if only other '
        'configs\' exist), "auto" (the same, else start fresh) or a checkpoint directory',
    )
    seed: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    log_with: list[str] = Field(default_factory=list, description="accelerate trackers")
    progress: bool = True

    @model_validator(mode="after")
    def _unique_names(self) -> DistillConfig:
        names = [t.name for t in self.teachers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate teacher names: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _incremental_fields(self) -> DistillConfig:
        if self.init_from is None and (self.retire or self.replace):
            raise ValueError("retire/replace need init_from (a previous student)")
        names = {t.name for t in self.teachers}
        missing = sorted(set(self.replace) - names)
        if missing:
            raise ValueError(f"replace lists styles with no new teacher: {', '.join(missing)}")
        both = sorted(set(self.replace) & set(self.retire))
        if both:
            raise ValueError(f"styles both retired and replaced: {', '.join(both)}")
        return self

    @model_validator(mode="after")
    def _ratio_range(self) -> DistillConfig:
        r = self.old_style_ratio
        if r != "auto" and not 0 <= r <= 1:
            raise ValueError(f"old_style_ratio must be 'auto' or in [0, 1], got {r}")
        return self

    def old_share(self, n_old: int) -> float:
        """The share of each step's loss that the ``n_old`` old styles get."""
        if n_old == 0:
            return 0.0
        if self.old_style_ratio == "auto":
            return n_old / (n_old + len(self.teachers))
        return float(self.old_style_ratio)

    @property
    def style_names(self) -> list[str]:
        return [t.name for t in self.teachers]

    def fingerprint(self) -> str:
        """sha256 of everything that decides the trained student (all but RUN_ONLY_FIELDS)."""
        return fingerprint(self.model_dump(mode="json", exclude=set(RUN_ONLY_FIELDS)))
