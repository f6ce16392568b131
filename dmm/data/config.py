"""Configuration of the data stages: prompt sets, teacher sampling, image folders."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class PromptsConfig(BaseModel):
    """Where prompts come from and how they are split into train and eval sets."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        "zoo",
        description='"zoo" for the toy zoo\'s caption grammar, else a .txt or .jsonl file',
    )
    n_train: int = Field(512, ge=1)
    n_eval: int = Field(64, ge=0)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of a user file's prompts held out for eval"
    )
    # The zoo's own seed and held-out count decide which compositions training
    # never saw; they must match the zoo's config (checked against its manifest).
    zoo_seed: int = Field(0, ge=0, le=2**31 - 1)
    held_out: int = Field(12, ge=1)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError('source must be "zoo" or a path to a .txt or .jsonl file')
        if v != "zoo" and not v.lower().endswith((".txt", ".jsonl")):
            raise ValueError(f'source must be "zoo" or a .txt/.jsonl file, got {v!r}')
        return v


class SampleConfig(BaseModel):
    """How teachers generate the x0 latents that distillation trains on.

    ``dtype`` is the storage dtype of latents and embeddings in the shards.
    Generation runs in float32, except on CUDA with ``dtype="float16"``, where
    it runs in float16 too (SD-sized UNets are twice as fast there).
    """

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(3.0, ge=0.0)
    samples_per_prompt: int = Field(1, ge=1)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    batch_size: int = Field(128, ge=1)
    shard_size: int = Field(1024, ge=1)
    dtype: Literal["float32", "float16"] = "float32"


class ImageFolderConfig(BaseModel):
    """Encoding a captioned image folder with the base VAE and text encoder."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(64, ge=1)
    shard_size: int = Field(1024, ge=1)
    dtype: Literal["float32", "float16"] = "float32"
