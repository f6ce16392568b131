"""Generation from a student folder: PNG files, or a preview grid with a row per style."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dmm.atomic import DmmError, atomic_file
from dmm.student.limits import DEFAULTS, check_count, check_guidance, check_steps


def parse_style(text: str):
    """CLI style text -> a name, an index, or a weight dict / vector."""
    text = text.strip()
    if text.startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise DmmError(f"style {text!r} is not valid JSON: {exc.msg}") from exc
    if re.fullmatch(r"\d+", text):
        return int(text)
    return text


def style_label(style) -> str:
    if isinstance(style, dict):
        return "+".join(f"{k}{v:g}" for k, v in style.items())
    if isinstance(style, list):
        return "mix-" + "-".join(f"{v:g}" for v in style)
    return str(style)


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit] or "prompt"


def load_student_pipeline(student_dir: Path):
    from dmm.student.pipeline import DMMStudentPipeline

    student_dir = Path(student_dir)
    if not (student_dir / "model_index.json").is_file():
        raise DmmError(f"not a student pipeline folder (no model_index.json): {student_dir}")
    pipe = DMMStudentPipeline.from_pretrained(student_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def render(pipe, prompts: list[str], style, seeds: list[int], steps: int, guidance_scale: float):
    """Images (N, 3, H, W) in [0, 1], one per (prompt, seed) pair."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        prompts,
        style=style,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=gens,
        output_type="pt",
    ).images


def _to_png(img: torch.Tensor, path: Path, scale: int = 1) -> None:
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    with atomic_file(path, "wb") as fh:
        pil.save(fh, format="PNG")


def generate_images(
    student_dir: Path,
    prompts: list[str],
    styles: list | None,
    out_dir: Path,
    seed: int = 0,
    num_images: int = 1,
    steps: int = DEFAULTS["steps"],
    guidance_scale: float = DEFAULTS["guidance_scale"],
    grid: bool = False,
    grid_scale: int = 3,
) -> list[Path]:
    """Write PNGs (or one grid); the served model's bounds apply, checked before loading."""
    check_steps(steps)
    check_guidance(guidance_scale)
    check_count(num_images, "--num-images")
    if not prompts:
        raise DmmError("give at least one prompt")
    pipe = load_student_pipeline(student_dir)
    if not styles:
        if not grid:
            raise DmmError(f"give --style (known styles: {', '.join(pipe.style_names)})")
        styles = list(pipe.style_names)
    for s in styles:  # fail before any image is written
        pipe.style_codebook.resolve(s)
    out_dir = Path(out_dir)
    cells = [(p, seed + k) for p in prompts for k in range(num_images)]
    rows = []
    written: list[Path] = []
    for style in styles:
        imgs = render(
            pipe, [p for p, _ in cells], style, [s for _, s in cells], steps, guidance_scale
        )
        rows.append(imgs)
        if not grid:
            for (p, s), img in zip(cells, imgs, strict=True):
                path = out_dir / f"{_slug(style_label(style))}_{_slug(p)}_{s}.png"
                _to_png(img, path)
                written.append(path)
    if grid:
        n, c, h, w = rows[0].shape
        sheet = torch.cat(rows).reshape(len(rows), n, c, h, w).permute(2, 0, 3, 1, 4)
        path = out_dir / "grid.png"
        _to_png(sheet.reshape(c, len(rows) * h, n * w), path, grid_scale)
        (out_dir / "grid.json").write_text(
            json.dumps({"rows": [style_label(s) for s in styles], "columns": cells}, indent=1)
        )
        written.append(path)
    return written
