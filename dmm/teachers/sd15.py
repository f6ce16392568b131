"""Stable Diffusion 1.5's component configurations, written out (no download).

Used to build SD1.5-sized models with random weights (tests, memory plans) and
as the reference a real SD1.5 teacher is compared with. The values are those of
the public SD1.5 release's diffusers configs; the parameter counts are what
these configs instantiate to.
"""

from __future__ import annotations

from typing import Any

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

SD15_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD15_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}

# What the configs above instantiate to (checked in tests/test_sd15.py).
SD15_UNET_PARAMS = 859_520_964
SD15_TEXT_ENCODER_PARAMS = 123_060_480
SD15_VAE_PARAMS = 83_653_863


def style_params(num_styles: int, time_embed_dim: int = 1280) -> int:
    """What DMM adds to the base UNet: the style MLP (two DxD Linear layers) and N vectors."""
    return 2 * (time_embed_dim * time_embed_dim + time_embed_dim) + num_styles * time_embed_dim


def sd15_unet(meta: bool = False) -> Any:
    """An SD1.5 UNet with random weights (on the meta device: shapes only, no memory)."""
    import contextlib

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights() if meta else contextlib.nullcontext():
        return UNet2DConditionModel(**SD15_UNET)


def sd15_text_encoder(meta: bool = False) -> Any:
    import contextlib

    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights() if meta else contextlib.nullcontext():
        return CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER))


def sd15_vae(meta: bool = False) -> Any:
    import contextlib

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights() if meta else contextlib.nullcontext():
        return AutoencoderKL(**SD15_VAE)
