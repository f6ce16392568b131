"""Small CNNs over 32x32 images: the style classifier and the caption probe.

The style classifier is also the project's own feature net for Frechet
distances (``dmm-stylenet``), so its penultimate width is kept small: a
covariance over d features needs well over d images to be stable.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from tqdm.auto import tqdm


def _trunk(width: int, feature_dim: int) -> nn.Sequential:
    def block(cin, cout):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2)
        )

    return nn.Sequential(
        block(3, width),  # 16x16
        block(width, 2 * width),  # 8x8
        block(2 * width, 2 * width),  # 4x4
        nn.Flatten(),
        nn.Linear(2 * width * 16, feature_dim),
        nn.SiLU(),
    )


class ImageHeads(ModelMixin, ConfigMixin):
    """A conv trunk with one linear head per label set.

    ``heads`` maps a head name to its class names, e.g.
    ``{"style": ["pastel", "neon", ...]}``. Inputs are images in [-1, 1].
    """

    @register_to_config
    def __init__(self, heads: dict[str, list[str]], width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.trunk = _trunk(width, feature_dim)
        self.head_layers = nn.ModuleDict(
            {k: nn.Linear(feature_dim, len(v)) for k, v in heads.items()}
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {k: head(f) for k, head in self.head_layers.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, head: str, batch: int = 512) -> torch.Tensor:
        self.eval()
        out = [self(images[i : i + batch])[head].softmax(-1) for i in range(0, len(images), batch)]
        return torch.cat(out)


def train_heads(
    model: ImageHeads,
    images: torch.Tensor,
    labels: dict[str, torch.Tensor],
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    desc: str = "classifier",
) -> None:
    """Cross-entropy on every head, with flips that keep labels valid.

    No geometric augmentation: position is a label for the caption probe.
    Small colour-preserving noise keeps the net from keying on exact pixels.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False, mininterval=5):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x = images[idx] + 0.03 * torch.randn(images[idx].shape, generator=gen)
        out = model(x)
        loss = sum(F.cross_entropy(out[k], labels[k][idx]) for k in out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
