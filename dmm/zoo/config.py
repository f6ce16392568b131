"""The zoo stage's configuration: one pydantic model for CLI, assets and dvc.yaml."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dmm.zoo.scenes import TEACHER_STYLES


class ZooConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, le=2**31 - 1)
    styles: list[str] = Field(default_factory=lambda: list(TEACHER_STYLES))
    # Styles whose teacher also fine-tunes its text encoder, as many community
    # checkpoints do.
    text_encoder_styles: list[str] = Field(default_factory=lambda: ["neon"])
    train_images: int = Field(6000, ge=16)
    held_out_combos: int = Field(12, ge=1)
    base_steps: int = Field(800, ge=1)
    teacher_steps: int = Field(120, ge=1)
    batch_size: int = Field(64, ge=1)
    base_lr: float = Field(1.5e-3, gt=0)
    teacher_lr: float = Field(5e-4, gt=0)
    # Fine-tuning a text encoder at the UNet's rate wrecks the captions' meaning.
    teacher_text_encoder_lr: float = Field(5e-5, gt=0)
    sample_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(3.0, ge=1.0)
    classifier_samples: int = Field(180, ge=4, description="samples per teacher; 1/3 held out")
    classifier_steps: int = Field(300, ge=1)
    probe_images: int = Field(1500, ge=16)
    probe_steps: int = Field(250, ge=1)
    caption_samples: int = Field(100, ge=1, description="base samples per caption split")

    @field_validator("styles")
    @classmethod
    def _known_styles(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in TEACHER_STYLES]
        if unknown:
            raise ValueError(f"unknown styles {unknown}; known: {list(TEACHER_STYLES)}")
        if len(set(v)) != len(v):
            raise ValueError("styles must be unique")
        if len(v) < 2:
            raise ValueError("the zoo needs at least 2 styles")
        return v

    @field_validator("text_encoder_styles")
    @classmethod
    def _te_known(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in TEACHER_STYLES]
        if unknown:
            raise ValueError(f"unknown text_encoder_styles {unknown}")
        return v

    @classmethod
    def miniature(cls, **overrides) -> ZooConfig:
        """A zoo that builds in seconds, for tests: same code paths, few steps."""
        small = dict(
            train_images=256,
            base_steps=8,
            teacher_steps=4,
            batch_size=16,
            sample_steps=4,
            classifier_samples=12,
            classifier_steps=10,
            probe_images=64,
            probe_steps=5,
            caption_samples=8,
        )
        small.update(overrides)
        return cls(**small)
