"""``DMMStudentPipeline``: Stable Diffusion plus a style codebook and a ``style=`` argument.

Everything except style selection is inherited from ``StableDiffusionPipeline``
(prompt encoding, CFG, schedulers, LoRA loading, offloading). During a call the
style MLP runs once, and a forward pre-hook on the UNet hands its output to
every denoising step, sized to whatever batch the UNet actually sees, so the
parent's denoising loop needs no change and each step costs what the base
UNet's does.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import StableDiffusionPipeline

from dmm.student.codebook import StyleBatchSpec, StyleCodebook, is_single_style

if TYPE_CHECKING:
    from dmm.student.model import StyleStudent

_PARENT_CALL = inspect.signature(StableDiffusionPipeline.__call__)


class DMMStudentPipeline(StableDiffusionPipeline):
    """A merged DMM student: one UNet that renders any of its styles on request.

    Call it like ``StableDiffusionPipeline`` plus ``style=``: a style name, an
    index, N mixing weights, ``{name: weight}``, or a list with one such style
    per prompt.
    """

    # Not in model_cpu_offload_seq: the codebook's forward is never called (its
    # vectors are read directly), so it must live on the execution device.
    _exclude_from_cpu_offload = ["safety_checker", "style_codebook"]

    def __init__(
        self,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        unet: Any,
        scheduler: Any,
        style_codebook: StyleCodebook,
        safety_checker: Any = None,
        feature_extractor: Any = None,
        image_encoder: Any = None,
        requires_safety_checker: bool = False,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        if style_codebook is None:
            raise ValueError("a DMMStudentPipeline needs a style_codebook")
        if unet is not None:
            _check_codebook_fits(unet, style_codebook)
        self.register_modules(style_codebook=style_codebook)

    @property
    def style_names(self) -> list[str]:
        return self.style_codebook.style_names

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """diffusers' save, plus the folder's own code (``dmm_student.py``) and model card."""
        super().save_pretrained(save_directory, *args, **kwargs)
        _write_folder_extras(self, Path(save_directory))

    def _style_embeddings(
        self, style: StyleBatchSpec, num_prompts: int | None, per_prompt: int
    ) -> torch.Tensor:
        """(1, D) for a shared style, else (num_prompts * per_prompt, D) in diffusers' order."""
        book = self.style_codebook
        if is_single_style(style):
            return book.embed(style, 1)
        weights = book.resolve_batch(style)
        n = weights.shape[0]
        if num_prompts is None:
            raise ValueError("per-prompt styles need the number of prompts")
        if n == num_prompts:
            # encode_prompt repeats each prompt per_prompt times in place:
            # [p0, p0, p1, p1], so repeat each style the same way.
            weights = weights.repeat_interleave(per_prompt, dim=0)
        elif n != num_prompts * per_prompt:
            raise ValueError(
                f"got {n} styles for {num_prompts} prompt(s) x {per_prompt} image(s) per "
                f"prompt; pass one style, one per prompt, or one per image"
            )
        return book.embed_weights(weights)

    @torch.no_grad()
    def __call__(
        self,
        *args: Any,
        style: StyleBatchSpec | None = None,
        style_regions: list | None = None,
        **kwargs: Any,
    ):
        """``StableDiffusionPipeline.__call__`` plus the required ``style=``, or
        ``style_regions=[(mask_or_box, style), ...]`` (dmm/student/regional.py)."""
        if style_regions is not None:
            if style is not None:
                raise ValueError("give style= or style_regions=, not both")
            return _regional().call_with_regions(self, style_regions, *args, **kwargs)
        if style is None:
            raise ValueError(f"style= is required; known styles: {', '.join(self.style_names)}")
        bound = _PARENT_CALL.bind(self, *args, **kwargs)
        bound.apply_defaults()
        prompt = bound.arguments.get("prompt")
        embeds = bound.arguments.get("prompt_embeds")
        if isinstance(prompt, str):
            num_prompts: int | None = 1
        elif isinstance(prompt, list):
            num_prompts = len(prompt)
        elif embeds is not None:
            num_prompts = embeds.shape[0]
        else:
            num_prompts = None
        per_prompt = bound.arguments.get("num_images_per_prompt") or 1
        # Resolve before any work, so a bad style fails fast with a clear message.
        emb = self._style_embeddings(style, num_prompts, per_prompt)
        # The style MLP's output is the same at every denoising step: compute it
        # once per call (at the first step, on the rows that step's batch needs,
        # so the numbers are those of a per-step MLP) and hand the UNet that
        # output, with the MLP swapped for an identity until the call ends. Per
        # step the student then costs the teacher's UNet plus one (B, D) addition.
        mlp = self.unet.class_embedding
        weight = mlp.linear_1.weight
        per_batch: dict[tuple, torch.Tensor] = {}

        def add_style(_module, h_args, h_kwargs):
            sample = h_args[0] if h_args else h_kwargs["sample"]
            key = (sample.shape[0], sample.device, sample.dtype)
            if key not in per_batch:
                rows = _fit_batch(emb, sample.shape[0]).to(device=weight.device, dtype=weight.dtype)
                per_batch[key] = mlp(rows).to(device=sample.device, dtype=sample.dtype)
            h_kwargs["class_labels"] = per_batch[key]
            return h_args, h_kwargs

        handle = self.unet.register_forward_pre_hook(add_style, with_kwargs=True)
        self.unet.class_embedding = torch.nn.Identity()
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self.unet.class_embedding = mlp
            handle.remove()


def _fit_batch(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Style rows for a UNet batch: one row shared, or [uncond, cond] halves under CFG."""
    if rows.shape[0] == 1:
        return rows.expand(batch, -1)
    if batch == 2 * rows.shape[0]:
        # Classifier-free guidance runs [uncond, cond] in one batch: the same
        # style conditions both halves.
        return torch.cat([rows, rows])
    if batch != rows.shape[0]:
        raise RuntimeError(f"UNet batch {batch} does not fit {rows.shape[0]} styles")
    return rows


def _write_folder_extras(pipe: DMMStudentPipeline, folder: Path) -> None:
    # dmm generates the shipped module and the card; the shipped copy of this
    # module replaces this function with one that copies its own file.
    from dmm.student.remote import write_folder_extras

    write_folder_extras(pipe, folder)


def _check_codebook_fits(unet: Any, codebook: StyleCodebook) -> None:
    cfg = unet.config
    if cfg.get("class_embed_type") != "projection":
        raise ValueError(
            "the student UNet must have class_embed_type='projection' (the style MLP), "
            f"got {cfg.get('class_embed_type')!r}"
        )
    if cfg.get("projection_class_embeddings_input_dim") != codebook.embedding_dim:
        raise ValueError(
            f"codebook width {codebook.embedding_dim} != the UNet's style input width "
            f"{cfg.get('projection_class_embeddings_input_dim')}"
        )


def build_student_pipeline(
    student: StyleStudent, base: str | Path | StableDiffusionPipeline
) -> DMMStudentPipeline:
    """A pipeline around ``student`` (shared, not copied) with the base's VAE, text
    encoder, tokenizer, scheduler and any safety checker / image encoder."""
    if isinstance(base, (str, Path)):
        # Pass the student's UNet so that diffusers skips loading the base one.
        base = StableDiffusionPipeline.from_pretrained(
            base, unet=student.unet, local_files_only=True
        )
    return DMMStudentPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=student.unet,
        scheduler=base.scheduler,
        style_codebook=student.style_codebook,
        safety_checker=getattr(base, "safety_checker", None),
        feature_extractor=getattr(base, "feature_extractor", None),
        image_encoder=getattr(base, "image_encoder", None),
        requires_safety_checker=bool(base.config.get("requires_safety_checker", False)),
    )


def _regional():
    """dmm's regional sampler, by name: the copy of this module that a student folder ships
    for plain diffusers (dmm/student/remote.py) holds no dmm import, and supports ``style=``."""
    import importlib

    try:
        return importlib.import_module("dmm.student.regional")
    except ImportError:
        raise ValueError("style_regions= needs the dmm package installed") from None
