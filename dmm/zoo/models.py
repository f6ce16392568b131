"""Configurations of the zoo's tiny Stable-Diffusion-shaped components."""

from __future__ import annotations

from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from dmm.zoo.autoencoder import PatchAutoencoder

LATENT_CHANNELS = 4
PATCH_SIZE = 2
TEXT_WIDTH = 64
MAX_TOKENS = 16

# SD1.5's noise schedule, so that the zoo and real teachers share the same
# training and sampling code paths.
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
)


def make_unet(sample_size: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def make_text_encoder(vocab_size: int, bos_id: int, eos_id: int) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        projection_dim=TEXT_WIDTH,
    )
    return CLIPTextModel(cfg)


def make_autoencoder() -> PatchAutoencoder:
    return PatchAutoencoder(in_channels=3, latent_channels=LATENT_CHANNELS, patch_size=PATCH_SIZE)


def make_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE, clip_sample=False)


def make_sample_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++")
