"""The three DMM losses: score distillation, feature imitation, multi-class adversarial."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DConditionModel


@contextlib.contextmanager
def block_outputs(unet: UNet2DConditionModel) -> Iterator[list[torch.Tensor]]:
    """Collect the output of every down block, the mid block and every up block."""
    feats: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        feats.append(output[0] if isinstance(output, tuple) else output)

    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    handles = [b.register_forward_hook(hook) for b in blocks if b is not None]
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()


def score_loss(eps_student: torch.Tensor, eps_teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(eps_student.float(), eps_teacher.float())


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    if len(student) != len(teacher):
        raise RuntimeError(f"feature count differs: student {len(student)}, teacher {len(teacher)}")
    terms = [F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher, strict=True)]
    return torch.stack(terms).mean()


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    a = alpha_bar.view(-1, 1, 1, 1)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


class StyleDiscriminator(nn.Module):
    """2N-way head on a frozen UNet's mid-block features of re-noised x0 estimates.

    Classes 0..N-1 are "real" (teacher i), N..2N-1 are "fake" (student as style i).
    """

    def __init__(self, frozen_unet: UNet2DConditionModel, num_styles: int, renoise_t: int = 250):
        super().__init__()
        self.frozen = frozen_unet
        self.frozen.requires_grad_(False)
        self.frozen.eval()
        self.renoise_t = renoise_t
        ch = frozen_unet.config.block_out_channels[-1]
        groups = min(32, ch)
        while ch % groups:
            groups //= 2
        self.head = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1),
            nn.GroupNorm(groups, ch),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(ch, 2 * num_styles),
        )

    def forward(
        self, x0: torch.Tensor, cond: torch.Tensor, alphas: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        t = torch.full((x0.shape[0],), self.renoise_t, device=x0.device, dtype=torch.long)
        a = alphas.to(x0.device)[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        feats: list[torch.Tensor] = []
        handle = self.frozen.mid_block.register_forward_hook(lambda m, i, o: feats.append(o))
        try:
            # Run only as far as needed would need a UNet split; the full pass is
            # cheap next to the student's and keeps the frozen UNet unmodified.
            self.frozen(x_t.to(self.frozen.dtype), t, cond.to(self.frozen.dtype))
        finally:
            handle.remove()
        return self.head(feats[0].float())
