"""A linear patch autoencoder: the zoo's stand-in for the SD VAE.

A tiny AutoencoderKL trained for minutes on 2 cores decodes grey blurs, which
destroys exactly the colour styles the zoo exists to show. A PCA over image
patches fits in seconds, reconstructs flat-colour scenes well, and is exactly
invertible on its span. It is a diffusers ModelMixin, so a pipeline folder that
names ``["dmm", "PatchAutoencoder"]`` loads it through diffusers once ``dmm`` is
imported (or through the folder's own ``dmm_student.py``, see dmm/student/remote.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput


@dataclass
class PatchLatents:
    """Mimics AutoencoderKL's latent distribution: deterministic, so mode == sample."""

    latents: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents

    def mode(self) -> torch.Tensor:
        return self.latents


@dataclass
class PatchEncoderOutput(BaseOutput):
    latent_dist: PatchLatents


@dataclass
class PatchDecoderOutput(BaseOutput):
    sample: torch.Tensor


class PatchAutoencoder(ModelMixin, ConfigMixin):
    """Images in [-1, 1] -> latents (B, latent_channels, H/p, W/p) and back."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 8,
        patch_size: int = 4,
        scaling_factor: float = 1.0,
        block_out_channels: tuple[int, ...] | None = None,
    ):
        super().__init__()
        if patch_size < 1 or patch_size & (patch_size - 1):
            raise ValueError(f"patch_size must be a power of two, got {patch_size}")
        if block_out_channels is None:
            # Diffusers pipelines derive the VAE scale factor as
            # 2 ** (len(block_out_channels) - 1); store a list of that length.
            self.register_to_config(
                block_out_channels=[latent_channels] * (int(math.log2(patch_size)) + 1)
            )
        dim = in_channels * patch_size * patch_size
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("components", torch.eye(latent_channels, dim))

    @property
    def patch_dim(self) -> int:
        return self.config.in_channels * self.config.patch_size**2

    def _to_patches(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of patch size {p}")
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, h // p, w // p, c * p * p)

    def _from_patches(self, z: torch.Tensor) -> torch.Tensor:
        b, hp, wp, _ = z.shape
        p, c = self.config.patch_size, self.config.in_channels
        z = z.reshape(b, hp, wp, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return z.reshape(b, c, hp * p, wp * p)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        patches = self._to_patches(x.to(self.components.dtype))
        z = (patches - self.mean) @ self.components.T
        latents = z.permute(0, 3, 1, 2).contiguous()
        dist = PatchLatents(latents)
        return PatchEncoderOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        z = z.to(self.components.dtype).permute(0, 2, 3, 1)
        x = self._from_patches(z @ self.components + self.mean)
        return PatchDecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).latent_dist.mode()).sample

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> float:
        """Fit the PCA on images in [-1, 1] and return the RMS reconstruction error.

        The component signs are fixed (largest entry positive) so a refit on the
        same data gives the same weights, bit for bit in practice.
        """
        patches = self._to_patches(images.double()).reshape(-1, self.patch_dim)
        mean = patches.mean(0)
        cov = (patches - mean).T @ (patches - mean) / patches.shape[0]
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)[: self.config.latent_channels]
        comps = evecs[:, order].T
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        comps = comps * signs
        self.mean.copy_(mean.float())
        self.components.copy_(comps.float())
        # Scale latents to unit variance, as SD's scaling_factor does for its VAE.
        z = (patches - mean) @ comps.T
        self.register_to_config(scaling_factor=float(1.0 / z.std().item()))
        recon = self.forward(images.float())
        return float((recon - images.float()).pow(2).mean().sqrt())


# Pipeline folders record a component's library as its module. Diffusers only
# resolves libraries already in sys.modules (it never imports what a folder
# names), so we record the top-level package: a plain `import dmm` then makes
# every zoo folder loadable, and dmm resolves the class lazily.
PatchAutoencoder.__module__ = "dmm"
