"""A miniature SDXL-shaped zoo: the family's structure at toy sizes, built in seconds.

What makes a pipeline SDXL is kept: two CLIP text encoders whose hidden states
are concatenated for cross-attention (the second with a projection, whose
pooled output conditions the UNet), and the UNet's ``text_time`` added
embedding of that pooled vector and six size/crop time ids. Weights are
random (seeded), and the teachers are the base with seeded weight offsets:
this zoo exercises SDXL code paths and checks, it does not draw styles.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dmm.atomic import atomic_dir
from dmm.zoo.build import vocabulary
from dmm.zoo.models import LATENT_CHANNELS, MAX_TOKENS, SCHEDULE
from dmm.zoo.tokenizer import BOS, EOS, build_tokenizer

TEXT_WIDTHS = (32, 32)  # text_encoder (CLIP-L's role), text_encoder_2 (OpenCLIP bigG's)
POOLED_WIDTH = 32  # text_encoder_2's projection, the pooled embedding
TIME_ID_WIDTH = 8  # each of the six time ids (original size, crop, target size)
TEACHERS = ("xl_pastel", "xl_neon")


def make_text_encoders(vocab_size: int, bos: int, eos: int):
    def cfg(width: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, projection_dim=POOLED_WIDTH,
        )  # fmt: skip

    return CLIPTextModel(cfg(TEXT_WIDTHS[0])), CLIPTextModelWithProjection(cfg(TEXT_WIDTHS[1]))


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        use_linear_projection=True,
        cross_attention_dim=sum(TEXT_WIDTHS),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_ID_WIDTH,
        projection_class_embeddings_input_dim=6 * TIME_ID_WIDTH + POOLED_WIDTH,
    )


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=16,
    )  # fmt: skip


def _offset(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def build_sdxl_miniature(out_dir: Path, seed: int = 0) -> dict:
    """Write ``out_dir/base`` and ``out_dir/teachers/<name>`` (SDXL pipeline folders)
    and ``zoo.json``, atomically; returns the manifest."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    with atomic_dir(out_dir) as tmp:
        tokenizer = build_tokenizer(vocabulary(), tmp / ".tokenizer", MAX_TOKENS)
        vocab = tokenizer.get_vocab()
        te1, te2 = make_text_encoders(len(vocab), vocab[BOS], vocab[EOS])
        unet, vae = make_unet(), make_vae()
        scheduler = EulerDiscreteScheduler(**SCHEDULE)

        def save(u: UNet2DConditionModel, where: Path) -> None:
            StableDiffusionXLPipeline(
                vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                tokenizer_2=tokenizer, unet=u, scheduler=scheduler,
            ).save_pretrained(where)  # fmt: skip

        save(unet, tmp / "base")
        teachers = {}
        for i, name in enumerate(TEACHERS, start=1):
            t_unet = copy.deepcopy(unet)
            _offset(t_unet, seed * 1000 + i)
            save(t_unet, tmp / "teachers" / name)
            teachers[name] = {"path": f"teachers/{name}", "trained_text_encoder": False}
        shutil.rmtree(tmp / ".tokenizer")
        manifest = {
            "family": "sdxl",
            "miniature": True,
            "seed": seed,
            "teachers": teachers,
            "build_seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
