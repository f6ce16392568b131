"""Style accuracy: how often the zoo's style classifier recognises the style asked for."""

from __future__ import annotations

from pathlib import Path

import torch

from dmm.atomic import DmmError


def load_classifier(path: Path):
    from dmm.zoo.classifier import ImageHeads

    if not (Path(path) / "config.json").is_file():
        raise DmmError(f"style classifier not found: {path}")
    clf = ImageHeads.from_pretrained(path)
    clf.eval()
    return clf


def style_probabilities(clf, images01: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N, S) for images in [0, 1]."""
    return clf.predict(images01 * 2 - 1, "style")


def style_accuracy(clf, images_by_style: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Fraction of each style's images classified as that style.

    Styles the classifier was not trained on (e.g. real teachers scored with the
    zoo's classifier) get None: accuracy is undefined for them, not zero.
    """
    names = list(clf.config.heads["style"])
    acc: dict[str, float | None] = {}
    for style, imgs in images_by_style.items():
        if style not in names:
            acc[style] = None
            continue
        pred = style_probabilities(clf, imgs).argmax(-1)
        acc[style] = float((pred == names.index(style)).float().mean())
    return acc
