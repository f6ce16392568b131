"""Per-style export: a student with one style (or one mix) folded into a plain SD UNet.

In a UNet with a projection class embedding, ``class_embedding(e)`` is added
straight onto the timestep embedding, whose last layer is
``time_embedding.linear_2``. For a fixed style vector ``e`` that sum is a
constant, so adding it to ``time_embedding.linear_2.bias`` and dropping the
class embedding gives a plain UNet that computes the same function (up to the
order of one float addition). The result loads anywhere an SD checkpoint does:
diffusers, and, as a single file with LDM keys only, the A1111 / Forge /
ComfyUI family, which drop the student's ``label_emb`` keys.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from dmm.atomic import DmmError, atomic_dir
from dmm.student.export import _DTYPE_NAMES, _check_sd_unet_config, export_single_file

FORMATS = ("diffusers", "single-file")
# Config entries that only the student's style MLP needs.
_STYLE_CONFIG = ("class_embed_type", "projection_class_embeddings_input_dim")


def _check_foldable(unet: Any) -> None:
    cfg = unet.config
    if cfg.get("class_embed_type") != "projection" or cfg.get("class_embeddings_concat"):
        raise DmmError(
            "only a student whose style is added to the time embedding can be folded "
            f"(class_embed_type={cfg.get('class_embed_type')!r}, "
            f"class_embeddings_concat={cfg.get('class_embeddings_concat')!r})"
        )
    if unet.time_embedding.post_act is not None or unet.time_embedding.cond_proj is not None:
        raise DmmError("the UNet's time embedding has a post-activation or condition: cannot fold")


def check_sd15_layout(config: Any, vae_class: str) -> None:
    """DmmError unless a plain UNet/VAE can be written with original SD1.x LDM keys only."""
    extra = [
        f"{k}={config.get(k)!r}"
        for k in ("addition_embed_type", "encoder_hid_dim_type", "class_embed_type")
        if config.get(k) is not None
    ]
    depth = config.get("transformer_layers_per_block", 1)
    if depth not in (1, None) and not (isinstance(depth, list) and set(depth) == {1}):
        extra.append(f"transformer_layers_per_block={depth!r}")
    if extra:
        raise DmmError(
            f"--format single-file needs an SD1.5-shaped UNet; this one has {', '.join(extra)} "
            "(use --format diffusers)"
        )
    try:
        _check_sd_unet_config(config)
    except DmmError as exc:
        raise DmmError(f"--format single-file needs an SD1.5-shaped UNet: {exc}") from None
    if vae_class != "AutoencoderKL":
        raise DmmError(
            f"--format single-file needs an AutoencoderKL VAE (SD1.5's); this student's is "
            f"{vae_class} (use --format diffusers)"
        )


def fold_style(unet: Any, codebook: Any, style: Any) -> Any:
    """A plain ``UNet2DConditionModel`` (fp32, no class embedding) that equals ``unet``
    called with the style (or mix) ``style`` of ``codebook``.

    The style MLP runs in float64, so the folded bias is as exact as the
    checkpoint's dtype allows. ValueError (from the codebook) for a bad style.
    """
    from diffusers import UNet2DConditionModel

    _check_foldable(unet)
    weights = codebook.resolve(style).double()
    with torch.no_grad():
        vector = weights @ codebook.vectors.detach().double().cpu()
        mlp = unet.class_embedding
        hidden = torch.nn.functional.linear(
            vector, mlp.linear_1.weight.double().cpu(), mlp.linear_1.bias.double().cpu()
        )
        offset = torch.nn.functional.linear(
            mlp.act(hidden), mlp.linear_2.weight.double().cpu(), mlp.linear_2.bias.double().cpu()
        )
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    for key in _STYLE_CONFIG:
        config[key] = None
    plain = UNet2DConditionModel.from_config(config)
    state = {
        k: v.detach().float().cpu()
        for k, v in unet.state_dict().items()
        if not k.startswith("class_embedding.")
    }
    bias = "time_embedding.linear_2.bias"
    state[bias] = (state[bias].double() + offset).float()
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def _check_style(student_dir: Path, style: Any) -> None:
    """Resolve ``style`` against the folder's codebook alone, before any heavy loading."""
    from dmm.student.codebook import StyleCodebook

    book = StyleCodebook.from_pretrained(student_dir, subfolder="style_codebook")
    try:
        book.resolve(style)
    except ValueError as exc:
        raise DmmError(str(exc).splitlines()[0]) from None


def _folded_pipeline(student_dir: Path, style: Any, dtype: str | None) -> Any:
    from diffusers import StableDiffusionPipeline

    from dmm.student.generate import load_student_pipeline

    student = load_student_pipeline(student_dir)
    try:
        unet = fold_style(student.unet, student.style_codebook, style)
    except ValueError as exc:
        raise DmmError(str(exc).splitlines()[0]) from None
    pipe = StableDiffusionPipeline(
        vae=student.vae,
        text_encoder=student.text_encoder,
        tokenizer=student.tokenizer,
        unet=unet,
        scheduler=student.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if dtype is not None:
        pipe.to(_DTYPE_NAMES[dtype])
    return pipe


def export_style(
    student_dir: Path | str,
    out: Path | str,
    style: Any,
    *,
    fmt: str = "diffusers",
    dtype: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``student_dir`` with ``style`` folded in, as a plain SD pipeline folder or
    (``fmt="single-file"``) one LDM-layout .safetensors file. Nothing is written on error."""
    from diffusers import UNet2DConditionModel

    from dmm.student.export import _read_json

    student_dir, out = Path(student_dir), Path(out)
    if fmt not in FORMATS:
        raise DmmError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in _DTYPE_NAMES:
        raise DmmError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPE_NAMES)}")
    if not (student_dir / "style_codebook").is_dir():
        raise DmmError(f"not a student pipeline folder (no style_codebook): {student_dir}")
    _check_style(student_dir, style)
    if fmt == "single-file":
        if out.suffix != ".safetensors":
            raise DmmError(f"{out}: a single-file export must be a .safetensors file")
        plain_cfg = dict(UNet2DConditionModel.load_config(student_dir, subfolder="unet"))
        for key in _STYLE_CONFIG:
            plain_cfg[key] = None
        vae_class = str(_read_json(student_dir / "vae" / "config.json").get("_class_name"))
        check_sd15_layout(plain_cfg, vae_class)
    pipe = _folded_pipeline(student_dir, style, dtype)
    info = {"style": style, "format": fmt, "dtype": dtype or "fp32", "source": str(student_dir)}
    if fmt == "diffusers":
        with atomic_dir(out) as tmp:
            pipe.save_pretrained(tmp)
        return info
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.fold-", dir=out.parent) as tmp:
        pipe.save_pretrained(tmp)
        del pipe
        export_single_file(tmp, out, progress=progress)
    return info
