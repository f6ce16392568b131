"""A user's captioned image folder as a second data source, in the samples format.

Captions come from ``<stem>.txt`` next to each image or from a ``captions.jsonl``
at the folder's root (``{"file": "a/b.png", "caption": "..."}``; it wins where
both exist). Images are resized and centre-cropped to the base's resolution and
encoded once with the base VAE, so the trainer reads them exactly like teacher
samples. Their "teacher_embeds" are the base encoder's: there is no teacher
here, and the trainer re-encodes ``index.json["prompts"]`` with each teacher's
own encoder when it needs to.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dmm.atomic import DmmError, atomic_dir
from dmm.data.config import ImageFolderConfig
from dmm.data.prompts import normalise, sha256_file, sha256_prompts
from dmm.data.samples import (
    FORMAT_VERSION,
    INDEX,
    STORE_DTYPES,
    ShardWriter,
    encode_text,
    import_dmm_components,
    is_reusable,
    load_component,
    weights_sha256,
    write_uncond,
)

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTIONS_FILE = "captions.jsonl"


def _read_captions_jsonl(folder: Path) -> dict[str, str]:
    path = folder / CAPTIONS_FILE
    if not path.is_file():
        return {}
    out: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DmmError(f"cannot read {path}: {exc}") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DmmError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("file"), str):
            raise DmmError(f'{where}: needs a "file" string')
        caption = obj.get("caption", obj.get("prompt"))
        if not isinstance(caption, str):
            raise DmmError(f'{where}: needs a "caption" string')
        rel = Path(obj["file"]).as_posix()
        if not (folder / rel).is_file():
            raise DmmError(f"{where}: image {rel} not found")
        out[rel] = caption
    return out


def collect_images(folder: Path | str) -> list[tuple[str, str]]:
    """(relative path, caption) for every image under ``folder``, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DmmError(f"image folder not found: {folder}")
    images = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not images:
        raise DmmError(f"no images ({', '.join(IMAGE_EXTS)}) in {folder}")
    from_jsonl = _read_captions_jsonl(folder)
    out = []
    for rel in images:
        if rel in from_jsonl:
            caption = from_jsonl[rel]
        else:
            txt = (folder / rel).with_suffix(".txt")
            if not txt.is_file():
                raise DmmError(
                    f"image {rel} in {folder} has no caption (no {txt.name} and not in "
                    f"{CAPTIONS_FILE})"
                )
            try:
                caption = txt.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise DmmError(f"cannot read caption {txt}: {exc}") from None
        caption = normalise(caption)
        if not caption:
            raise DmmError(f"image {rel} in {folder} has an empty caption")
        out.append((rel, caption))
    return out


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """One image as 3 x res x res in [-1, 1]: shorter side resized, then centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DmmError(f"cannot read image {path}: {exc}") from None
    w, h = img.size
    scale = resolution / min(w, h)
    # Round up so the crop never exceeds the resized image.
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def base_resolution(base_dir: Path, vae) -> int:
    """Pixel size the base generates: unet sample_size times the VAE's downscale."""
    try:
        unet_cfg = json.loads((base_dir / "unet" / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise DmmError(f"cannot read {base_dir}/unet/config.json: {exc}") from None
    sample_size = unet_cfg["sample_size"]
    if not isinstance(sample_size, int):
        raise DmmError(f"{base_dir}: non-square unet sample_size {sample_size} is not supported")
    return sample_size * 2 ** (len(vae.config.block_out_channels) - 1)


def _images_sha256(folder: Path, items: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for rel, caption in items:
        h.update(json.dumps([rel, sha256_file(folder / rel), caption]).encode() + b"\n")
    return h.hexdigest()


@torch.no_grad()
def encode_image_folder(
    folder: Path | str,
    base_dir: Path | str,
    out_dir: Path | str,
    cfg: ImageFolderConfig | None = None,
    *,
    name: str = "imagefolder",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Encode a captioned image folder into ``out_dir`` in the teacher-samples format.

    One sample per image; ``prompt_ids`` index ``index.json["prompts"]`` (one
    caption per image, in ``index.json["files"]`` order). Reuses ``out_dir``
    when images, captions, base weights and config are unchanged.
    """
    cfg = cfg or ImageFolderConfig()
    folder, base_dir, out_dir = Path(folder), Path(base_dir), Path(out_dir)
    items = collect_images(folder)
    captions = [c for _, c in items]
    import_dmm_components(base_dir)
    te_sha = weights_sha256(base_dir / "text_encoder")
    expect = {
        "teacher": name,
        "images_sha256": _images_sha256(folder, items),
        "prompts_sha256": sha256_prompts(captions),
        "vae_sha256": weights_sha256(base_dir / "vae"),
        "base_text_encoder_sha256": te_sha,
        "config": cfg.model_dump(),
    }
    if (index := is_reusable(out_dir, expect)) is not None:
        log.info("encoded image folder at %s is up to date", out_dir)
        return index

    device = torch.device(device)
    vae = load_component(base_dir, "vae").to(device).eval()
    tokenizer = load_component(base_dir, "tokenizer")
    text_encoder = load_component(base_dir, "text_encoder").to(device).eval()
    resolution = base_resolution(base_dir, vae)
    scaling = float(vae.config.scaling_factor)
    store = STORE_DTYPES[cfg.dtype]
    with atomic_dir(out_dir) as tmp:
        uncond = encode_text(tokenizer, text_encoder, [""], device)
        write_uncond(tmp, uncond, uncond, store)
        writer = ShardWriter(tmp, cfg.shard_size, store, name)
        bar = tqdm(total=len(items), desc=f"encode {folder.name}", unit="img", disable=not progress)
        for start in range(0, len(items), cfg.batch_size):
            chunk = items[start : start + cfg.batch_size]
            pixels = torch.stack([load_image(folder / rel, resolution) for rel, _ in chunk])
            latents = vae.encode(pixels.to(device)).latent_dist.mode() * scaling
            embeds = encode_text(tokenizer, text_encoder, [c for _, c in chunk], device)
            ids = torch.arange(start, start + len(chunk), dtype=torch.int64)
            writer.add(latents, ids, embeds, embeds)
            bar.update(len(chunk))
        bar.close()
        shards, sizes = writer.finish()
        index = {
            "format_version": FORMAT_VERSION,
            "source": "imagefolder",
            **expect,
            # No teacher made these latents; the fields keep the samples schema.
            "teacher_sha256": None,
            "text_encoder_sha256": te_sha,
            "embeds_from": "base",
            "num_samples": len(items),
            "num_prompts": len(items),
            "samples_per_prompt": 1,
            "shards": shards,
            "shard_sizes": sizes,
            "latent_shape": list(latents.shape[1:]),
            "embed_shape": list(embeds.shape[1:]),
            "base_embed_shape": list(embeds.shape[1:]),
            "dtype": cfg.dtype,
            "scaling_factor": scaling,
            "resolution": resolution,
            "folder": str(folder),
            "base_dir": str(base_dir),
            "files": [rel for rel, _ in items],
            "prompts": captions,
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=2, ensure_ascii=False))
    log.info("encoded %d images from %s -> %s", len(items), folder, out_dir)
    return index
