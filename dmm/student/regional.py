"""Regional multi-style generation: several styles in one image.

In the way of Mixture-of-Diffusers / MultiDiffusion: at every denoising step
the UNet runs once per region, each time on the whole latent under that
region's style, and the noise predictions are blended pixel by pixel with
smooth region weights, eps = sum_r w_r eps_r / sum_r w_r. Blending the noise
prediction is blending the latent update (the samplers here are linear in eps
at a given step), and running each style on the whole latent keeps the
regions' borders coherent. A region is ``(mask_or_box, style)`` or
``(mask_or_box, style, weight)``:

- a box ``(x0, y0, x1, y1)`` in image pixels (end-exclusive), or a mask of the
  image's size (H, W) with values in [0, 1] (tensor, array or PIL image);
- a style as ``style=`` takes it (a name, an index, weights, ``{name: w}``);
- an optional weight (default 1).

The masks are averaged down to the latent grid and feathered with a small box
blur (``feather`` latent pixels each side), so the styles cross-fade instead of
meeting at a seam. Every latent pixel must get a non-zero weight sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dmm.atomic import DmmError

DEFAULT_FEATHER = 1  # latent pixels: one VAE patch of cross-fade each side


def _mask_tensor(mask: Any, index: int) -> torch.Tensor:
    if hasattr(mask, "convert") and hasattr(mask, "size"):  # a PIL image
        import numpy as np

        mask = np.asarray(mask.convert("L"), dtype="float32") / 255.0
    m = torch.as_tensor(mask, dtype=torch.float32)
    if m.dim() == 3 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise DmmError(f"region {index}: a mask must be 2-D (H, W), got shape {tuple(m.shape)}")
    if not bool(torch.isfinite(m).all()) or m.min() < 0 or m.max() > 1:
        raise DmmError(f"region {index}: mask values must be in [0, 1]")
    return m


def region_mask(spec: Any, height: int, width: int, index: int) -> torch.Tensor:
    """A (height, width) mask in [0, 1] from a box or a mask."""
    if (
        isinstance(spec, (tuple, list))
        and len(spec) == 4
        and all(isinstance(v, (int, float)) for v in spec)
    ):
        x0, y0, x1, y1 = (int(round(v)) for v in spec)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise DmmError(
                f"region {index}: box {tuple(spec)} is not inside the {width}x{height} image "
                "(x0, y0, x1, y1 in pixels, x0 < x1, y0 < y1)"
            )
        m = torch.zeros(height, width)
        m[y0:y1, x0:x1] = 1.0
        return m
    m = _mask_tensor(spec, index)
    if tuple(m.shape) != (height, width):
        raise DmmError(
            f"region {index}: mask is {m.shape[1]}x{m.shape[0]} (WxH), "
            f"but the image is {width}x{height}"
        )
    return m


def _feather(w: torch.Tensor, radius: int) -> torch.Tensor:
    """A (R, h, w) stack blurred with a (2r+1)^2 box, edges replicated."""
    if radius <= 0:
        return w
    k = 2 * radius + 1
    padded = F.pad(w[:, None], (radius,) * 4, mode="replicate")
    return F.avg_pool2d(padded, k, stride=1)[:, 0]


def region_weights(
    regions: Sequence[Sequence[Any]],
    height: int,
    width: int,
    scale: int,
    feather: int = DEFAULT_FEATHER,
) -> torch.Tensor:
    """(R, h, w) normalised blending weights on the latent grid (h = height / scale)."""
    if not regions:
        raise DmmError("style_regions is empty: give at least one (mask_or_box, style)")
    if height % scale or width % scale:
        raise DmmError(f"image size {width}x{height} is not a multiple of the VAE factor {scale}")
    masks, gains = [], []
    for i, region in enumerate(regions):
        if not isinstance(region, (tuple, list)) or len(region) not in (2, 3):
            raise DmmError(f"region {i}: expected (mask_or_box, style) or (mask_or_box, style, w)")
        gain = float(region[2]) if len(region) == 3 else 1.0
        if not math.isfinite(gain):
            raise DmmError(f"region {i}: weight must be finite, got {region[2]}")
        masks.append(region_mask(region[0], height, width, i))
        gains.append(gain)
    stack = torch.stack(masks)[:, None]
    latent = F.avg_pool2d(stack, scale)[:, 0] * torch.tensor(gains)[:, None, None]
    latent = _feather(latent, feather)
    total = latent.sum(0)
    # Below this the normalisation would amplify rounding noise into the image.
    zero = total.abs() < 1e-6
    if bool(zero.any()):
        y, x = (int(v) for v in zero.nonzero()[0])
        raise DmmError(
            f"style regions' weights sum to zero at {int(zero.sum())} of {zero.numel()} latent "
            f"pixels (first at latent row {y}, column {x}; image pixel {x * scale},{y * scale}): "
            "cover the whole image, and do not let overlapping weights cancel"
        )
    return latent / total


class _RegionalUNet:
    """Replaces ``unet.forward`` for one call: a pass per region, blended eps."""

    def __init__(self, pipe: Any, labels: list[torch.Tensor], weights: torch.Tensor) -> None:
        self.unet = pipe.unet
        self.forward = pipe.unet.forward
        # Taken now: during the pipeline's call the UNet's style MLP is swapped for
        # an identity (the MLP runs once per call), so each region's label goes
        # through this MLP here, once per batch shape.
        self.mlp = pipe.unet.class_embedding
        self.labels = labels
        self.weights = weights
        self._projected: dict[tuple, list[torch.Tensor]] = {}

    def _styles(self, sample: torch.Tensor) -> list[torch.Tensor]:
        key = (sample.shape[0], sample.device, sample.dtype)
        if key not in self._projected:
            weight = self.mlp.linear_1.weight
            self._projected[key] = [
                self.mlp(label.to(weight.device, weight.dtype).expand(sample.shape[0], -1)).to(
                    sample.device, sample.dtype
                )
                for label in self.labels
            ]
        return self._projected[key]

    def __call__(self, sample: torch.Tensor, *args: Any, **kwargs: Any):
        if tuple(sample.shape[-2:]) != tuple(self.weights.shape[-2:]):
            raise DmmError(
                f"latent {tuple(sample.shape[-2:])} does not match the regions' grid "
                f"{tuple(self.weights.shape[-2:])}"
            )
        kwargs.pop("class_labels", None)
        return_dict = kwargs.pop("return_dict", True)
        w = self.weights.to(sample.device, sample.dtype)
        blended = None
        for r, style in enumerate(self._styles(sample)):
            eps = self.forward(sample, *args, class_labels=style, return_dict=False, **kwargs)[0]
            part = eps * w[r]
            blended = part if blended is None else blended + part
        if not return_dict:
            return (blended,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=blended)


def call_with_regions(
    pipe: Any,
    style_regions: Sequence[Sequence[Any]],
    *args: Any,
    feather: int = DEFAULT_FEATHER,
    **kwargs: Any,
):
    """``pipe(*args, **kwargs)`` with each region denoised under its own style."""
    height = kwargs.get("height") or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = kwargs.get("width") or pipe.unet.config.sample_size * pipe.vae_scale_factor
    kwargs.update(height=height, width=width)
    book = pipe.style_codebook
    labels = []
    for i, region in enumerate(style_regions):
        if not isinstance(region, (tuple, list)) or len(region) < 2:
            raise DmmError(f"region {i}: expected (mask_or_box, style) or (mask_or_box, style, w)")
        try:
            labels.append(book.embed(region[1], 1))
        except (ValueError, KeyError, TypeError) as exc:
            raise DmmError(f"region {i}: {str(exc).splitlines()[0]}") from exc
    weights = region_weights(style_regions, height, width, pipe.vae_scale_factor, feather)
    regional = _RegionalUNet(pipe, labels, weights)
    pipe.unet.forward = regional
    try:
        # Any one region's style: the pipeline's own style hook runs, then is overridden.
        return type(pipe).__call__(pipe, *args, style=style_regions[0][1], **kwargs)
    finally:
        del pipe.unet.forward  # back to the class's forward


def parse_region(text: str) -> tuple[tuple[int, int, int, int], Any]:
    """CLI region text ``X0,Y0,X1,Y1=STYLE`` (a box in pixels and a style) -> a region."""
    from dmm.student.generate import parse_style

    box, sep, style = text.partition("=")
    try:
        coords = tuple(int(v) for v in box.split(","))
    except ValueError:
        coords = ()
    if not sep or len(coords) != 4 or not style.strip():
        raise DmmError(f"--region must look like X0,Y0,X1,Y1=STYLE (pixels), got {text!r}")
    return coords, parse_style(style)  # type: ignore[return-value]


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (width, height)."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
        raise DmmError(f"--size must look like WIDTHxHEIGHT, got {text!r}")
    return int(w), int(h)


def generate_regional(
    student_dir: Any,
    prompts: list[str],
    regions: list[str],
    out_dir: Any,
    *,
    size: str | None = None,
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 3.0,
) -> list[Any]:
    """One PNG per prompt, each region in its own style (``dmm generate --region``)."""
    from pathlib import Path

    from dmm.student.generate import _slug, _to_png, load_student_pipeline

    parsed = [parse_region(r) for r in regions]
    pipe = load_student_pipeline(student_dir)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = parse_size(size) if size else (native, native)
    # Validate every region (size, styles, coverage) before any image is made.
    for i, (_, style) in enumerate(parsed):
        try:
            pipe.style_codebook.resolve(style)
        except (ValueError, KeyError, TypeError) as exc:
            raise DmmError(f"region {i}: {str(exc).splitlines()[0]}") from exc
    region_weights(parsed, height, width, pipe.vae_scale_factor)
    written = []
    for prompt in prompts:
        image = pipe(
            prompt,
            style_regions=parsed,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        ).images[0]
        path = Path(out_dir) / f"regions_{_slug(prompt)}_{seed}.png"
        _to_png(image, path)
        written.append(path)
    return written
