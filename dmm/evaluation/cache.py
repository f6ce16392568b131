"""Teacher images on disk, keyed by everything they depend on.

A teacher's images depend only on its weights, the prompts, the seeds and the
sampler, so every later evaluation (a re-merge, an incremental merge, the
nightly run, an ablation) samples only the student and the baselines. Images
are kept as 8-bit, what an image file holds; the protocol quantises every
model's images the same way, so cached and fresh teacher images score alike.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from dmm.atomic import DmmError

CACHE_VERSION = 1
_DIGESTS: dict[tuple, str] = {}


def to_8bit(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] rounded to what an 8-bit image file holds (still float)."""
    return (images.clamp(0, 1) * 255).round() / 255


def model_digest(path: Path) -> str:
    """sha256 over a pipeline folder's configs and weights (memoised by size and mtime)."""
    path = Path(path)
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and p.suffix in {".safetensors", ".json", ".txt", ".bin"}
    )
    if not files:
        raise DmmError(f"no model files under {path}")
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stamp not in _DIGESTS:
        h = hashlib.sha256()
        for p in files:
            h.update(str(p.relative_to(path)).encode() + b"\0")
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        _DIGESTS[stamp] = h.hexdigest()
    return _DIGESTS[stamp]


class ImageCache:
    """``get(model, prompts, seeds, sampler, make)``: the cached images, or ``make()`` stored."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    def key(self, model: Path, prompts: list[str], seeds: list[int], sampler: dict) -> str:
        spec = {
            "version": CACHE_VERSION,
            "model": model_digest(model),
            "prompts": prompts,
            "seeds": seeds,
            "sampler": sampler,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def get(
        self,
        model: Path,
        prompts: list[str],
        seeds: list[int],
        sampler: dict,
        make: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        from safetensors.torch import load_file, save_file

        if self.root is None:
            return to_8bit(make())
        file = self.root / f"{self.key(model, prompts, seeds, sampler)}.safetensors"
        if file.is_file():
            try:
                images = load_file(file)["images"]
                self.hits += 1
                return images.float() / 255
            except Exception:  # a torn or foreign file: sample again and overwrite it
                file.unlink(missing_ok=True)
        self.misses += 1
        images = to_8bit(make())
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        save_file({"images": (images * 255).round().to(torch.uint8).contiguous()}, str(tmp))
        os.replace(tmp, file)
        return images
