"""Sampling every model under comparison on the same prompts, seeds and sampler."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from dmm.atomic import DmmError


def load_pipeline(path: Path, device: str | torch.device = "cpu"):
    """A teacher/baseline (StableDiffusionPipeline) or a student (DMMStudentPipeline) folder."""
    import json

    from diffusers import StableDiffusionPipeline

    import dmm  # noqa: F401  (registers dmm components for diffusers)
    from dmm.student.pipeline import DMMStudentPipeline

    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        raise DmmError(f"not a pipeline folder (no model_index.json): {path}")
    index = json.loads(index_file.read_text())
    cls = DMMStudentPipeline if "style_codebook" in index else StableDiffusionPipeline
    pipe = cls.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def sample(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    style=None,
    steps: int = 20,
    guidance_scale: float = 3.0,
    batch: int = 128,
    desc: str | None = None,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1], one per (prompt, seed)."""
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    out = []
    extra = {} if style is None else {"style": style}
    for i in tqdm(range(0, len(prompts), batch), desc=desc, disable=desc is None, leave=False):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        out.append(
            pipe(
                prompts[i : i + batch],
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=gens,
                output_type="pt",
                **extra,
            ).images
        )
    return torch.cat(out).clamp(0, 1).cpu()
