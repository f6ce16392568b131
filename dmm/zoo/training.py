"""Denoising training of the zoo's base and its style fine-tunes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def train_denoiser(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: torch.Tensor,
    token_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    scheduler: DDPMScheduler,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    train_text_encoder: bool,
    text_encoder_lr: float | None = None,
    seed: int,
    caption_dropout: float = 0.1,
    desc: str = "train",
) -> list[float]:
    """Epsilon-prediction training on cached latents; returns the loss per step.

    Captions are dropped to "" with ``caption_dropout`` so that the model
    supports classifier-free guidance, as SD does.
    """
    gen = torch.Generator().manual_seed(seed)
    params = list(unet.parameters())
    groups = [{"params": list(unet.parameters()), "lr": lr}]
    text_encoder.requires_grad_(train_text_encoder)
    if train_text_encoder:
        params += list(text_encoder.parameters())
        groups.append({"params": list(text_encoder.parameters()), "lr": text_encoder_lr or lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-2)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    alphas = scheduler.alphas_cumprod
    unet.train()
    text_encoder.train(train_text_encoder)
    losses = []
    n = latents.shape[0]
    for _ in tqdm(range(steps), desc=desc, leave=False, mininterval=5):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        x0 = latents[idx]
        ids = token_ids[idx].clone()
        drop = torch.rand(batch_size, generator=gen) < caption_dropout
        ids[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.set_grad_enabled(train_text_encoder):
            cond = text_encoder(ids)[0]
        pred = unet(xt, t, cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    unet.eval()
    text_encoder.eval()
    text_encoder.requires_grad_(False)
    return losses
