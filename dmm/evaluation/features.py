"""Pluggable feature extractors for Frechet distances.

The default is the project's own feature net (the zoo's style classifier
trunk), reported as ``dmm-stylenet``: its distances are Frechet distances of
their own kind, never "FID". Inception-v3 FID is available through
torchmetrics when the user supplies a local weights file; it needs
torch-fidelity and a torchvision built for the installed torch, which the
project never installs (next to the CPU-only torch, torchvision breaks diffusers).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dmm.atomic import DmmError


class FeatureExtractor:
    name: str
    dim: int

    def __call__(self, images01: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) in [0, 1]
        raise NotImplementedError


class StyleNetFeatures(FeatureExtractor):
    """Penultimate features of the zoo's style classifier."""

    name = "dmm-stylenet"

    def __init__(self, classifier_dir: Path):
        from dmm.evaluation.classify import load_classifier

        self.net = load_classifier(classifier_dir)
        self.dim = int(self.net.config.feature_dim)

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        out = [
            self.net.features(images01[i : i + 512] * 2 - 1) for i in range(0, len(images01), 512)
        ]
        return torch.cat(out).double()


class InceptionFeatures(FeatureExtractor):
    """Inception-v3 pool features (FID) from a local torchmetrics/torch-fidelity weights file."""

    name = "inception-v3-fid"
    dim = 2048

    def __init__(self, weights: Path):
        weights = Path(weights)
        if not weights.is_file():
            raise DmmError(f"Inception weights file not found: {weights} (FID needs a local copy)")
        # torchmetrics imports without torch-fidelity and only fails when the
        # net is built, suggesting an install that would bring a CUDA-linked
        # torchvision; both steps are guarded so the advice is ours.
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=["2048"],
                feature_extractor_weights_path=str(weights),
            )
        except ImportError as exc:  # torch-fidelity / torchvision missing
            raise DmmError(
                "Inception FID needs torch-fidelity and torchvision: install both by hand, "
                "a torchvision built for your torch (GPU installs only; see README)"
            ) from exc
        self.net.eval()

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        imgs = (images01.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.net(imgs).double()


def make_extractor(kind: str, classifier_dir: Path | None = None, weights: Path | None = None):
    if kind == "stylenet":
        if classifier_dir is None:
            raise DmmError("the stylenet feature extractor needs the zoo's classifier folder")
        return StyleNetFeatures(classifier_dir)
    if kind == "inception":
        if weights is None:
            raise DmmError("--inception-weights is required for the inception feature extractor")
        return InceptionFeatures(weights)
    raise DmmError(f"unknown feature extractor {kind!r} (choose stylenet or inception)")
