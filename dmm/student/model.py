"""The DMM student: the base UNet plus a style codebook.

The UNet stays a plain diffusers ``UNet2DConditionModel`` so that everything
built around SD UNets (LoRA loading, ControlNet.from_unet, IP-Adapters,
schedulers, offloading) keeps working. Style enters through diffusers' own
class-conditioning hook: with ``class_embed_type="projection"`` the UNet owns
``class_embedding = TimestepEmbedding(D, D)`` (Linear -> SiLU -> Linear), takes
``class_labels`` of shape (B, D) and adds ``class_embedding(class_labels)`` to
the timestep embedding. That is exactly the paper's style MLP, and the codebook
supplies ``class_labels``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from dmm.student.codebook import StyleBatchSpec, StyleCodebook

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from dmm.student.pipeline import DMMStudentPipeline

STYLE_PREFIX = "class_embedding."
_SHOWN = 5  # how many offending keys an architecture error lists


def _listing(items: list[str]) -> str:
    more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return "[" + ", ".join(items[:_SHOWN]) + more + "]"


def check_same_architecture(
    base_unet: torch.nn.Module,
    other_unet: torch.nn.Module,
    name: str = "other",
    kind: str = "teacher",
    ignore_prefixes: Sequence[str] = (),
) -> None:
    """Raise ValueError unless both UNets have the same parameter names and shapes.

    The message names the model and lists the first few missing keys (in the
    base, not in ``other``), extra keys and shape mismatches.
    """
    base_sd = {k: v.shape for k, v in base_unet.state_dict().items()}
    other_sd = {k: v.shape for k, v in other_unet.state_dict().items()}

    def kept(k: str) -> bool:
        return not any(k.startswith(p) for p in ignore_prefixes)

    missing = sorted(k for k in base_sd.keys() - other_sd.keys() if kept(k))
    extra = sorted(k for k in other_sd.keys() - base_sd.keys() if kept(k))
    shapes = sorted(
        f"{k}: {tuple(other_sd[k])} vs base {tuple(base_sd[k])}"
        for k in base_sd.keys() & other_sd.keys()
        if kept(k) and base_sd[k] != other_sd[k]
    )
    if not (missing or extra or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing keys {_listing(missing)}")
    if extra:
        parts.append(f"unexpected keys {_listing(extra)}")
    if shapes:
        parts.append(f"shape mismatches {_listing(shapes)}")
    raise ValueError(f"{kind} {name!r} UNet differs from the base: " + ", ".join(parts))


def time_embedding_dim(unet: UNet2DConditionModel) -> int:
    """Width of the UNet's timestep embedding (4 x block_out_channels[0] for SD)."""
    return int(unet.time_embedding.linear_1.out_features)


def student_unet_config(base_config: Any, style_dim: int) -> dict:
    """The base UNet's config plus the projection class embedding that carries style."""
    cfg = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    if cfg.get("class_embed_type") is not None or cfg.get("num_class_embeds") is not None:
        raise ValueError(
            "the base UNet already has class conditioning "
            f"(class_embed_type={cfg.get('class_embed_type')!r}, "
            f"num_class_embeds={cfg.get('num_class_embeds')!r}); DMM needs that slot for style"
        )
    # Tuples become lists in JSON; normalise now so a saved config compares equal.
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    cfg.update(
        class_embed_type="projection",
        projection_class_embeddings_input_dim=style_dim,
        class_embeddings_concat=False,
    )
    return cfg


class StyleStudent(ModelMixin, ConfigMixin):
    """Training-time student: ``unet`` (with the style MLP) + ``style_codebook``.

    ``save_pretrained``/``from_pretrained`` store both in one folder;
    ``save_pipeline`` writes a generating ``DMMStudentPipeline`` folder.
    """

    @register_to_config
    def __init__(self, unet_config: dict, style_names: list[str]):
        super().__init__()
        unet_config = dict(unet_config)
        if unet_config.get("class_embed_type") != "projection":
            raise ValueError(
                "unet_config must use class_embed_type='projection' (see student_unet_config), "
                f"got {unet_config.get('class_embed_type')!r}"
            )
        self.unet = UNet2DConditionModel.from_config(unet_config)
        dim = time_embedding_dim(self.unet)
        if unet_config.get("projection_class_embeddings_input_dim") != dim:
            raise ValueError(
                "projection_class_embeddings_input_dim must equal the time-embedding width "
                f"{dim}, got {unet_config.get('projection_class_embeddings_input_dim')!r}"
            )
        self.style_codebook = StyleCodebook(list(style_names), dim)

    @property
    def style_names(self) -> list[str]:
        return self.style_codebook.style_names

    @property
    def style_dim(self) -> int:
        return self.style_codebook.embedding_dim

    def set_codebook(self, codebook: StyleCodebook) -> None:
        """Swap in another codebook (e.g. from ``append_styles``) and update the config."""
        if codebook.embedding_dim != self.style_dim:
            raise ValueError(
                f"codebook width {codebook.embedding_dim} != student style width {self.style_dim}"
            )
        self.style_codebook = codebook
        self.register_to_config(style_names=codebook.style_names)

    @classmethod
    def from_base(
        cls, base_unet: UNet2DConditionModel, style_names: Sequence[str], seed: int = 0
    ) -> StyleStudent:
        """A student that reproduces ``base_unet`` exactly, for every style.

        The style MLP's last layer is zero (weight and bias), so the style adds
        exactly 0 to the timestep embedding until training moves it; linear_1
        and the codebook get a random init drawn from ``seed`` (the global RNG
        is left as it was). The student is float32 on the CPU; move it with ``to``.
        """
        dim = time_embedding_dim(base_unet)
        config = student_unet_config(base_unet.config, dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            student = cls(unet_config=config, style_names=list(style_names))
        result = student.unet.load_state_dict(base_unet.state_dict(), strict=False)
        bad_missing = [k for k in result.missing_keys if not k.startswith(STYLE_PREFIX)]
        if bad_missing or result.unexpected_keys:
            raise ValueError(
                "the base UNet's weights do not fit the student: "
                f"missing {_listing(bad_missing)}, unexpected {_listing(result.unexpected_keys)}"
            )
        with torch.no_grad():
            student.unet.class_embedding.linear_2.weight.zero_()
            student.unet.class_embedding.linear_2.bias.zero_()
        return student

    def validate_base(self, base_unet: torch.nn.Module, name: str = "base") -> None:
        """Raise ValueError unless ``base_unet`` is this student's UNet minus the style MLP."""
        check_same_architecture(
            base_unet, self.unet, name=name, kind="student", ignore_prefixes=(STYLE_PREFIX,)
        )

    def style_embedding(
        self, style: StyleBatchSpec, batch_size: int, device=None, dtype=None
    ) -> torch.Tensor:
        """(B, D) ``class_labels`` for the UNet: the codebook's (mixed) style vectors."""
        return self.style_codebook.embed(style, batch_size, device=device, dtype=dtype)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        style: StyleBatchSpec,
        return_features: bool = False,
        **unet_kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Epsilon prediction (B, C, H, W) for ``style``.

        ``style`` is anything ``StyleCodebook.embed`` accepts, including (B, N)
        weights. With ``return_features`` also returns the outputs of every down
        block (hidden states only), the mid block and every up block, in order.
        Extra keyword arguments go to the UNet (e.g. ``cross_attention_kwargs``).
        """
        if "class_labels" in unet_kwargs:
            raise TypeError("pass style=, not class_labels=; the student computes class_labels")
        labels = self.style_embedding(
            style, sample.shape[0], device=sample.device, dtype=self.unet.dtype
        )
        if not return_features:
            return self.unet(
                sample,
                timestep,
                encoder_hidden_states,
                class_labels=labels,
                return_dict=False,
                **unet_kwargs,
            )[0]
        features: list[torch.Tensor] = []

        def grab(_module, _inputs, output):
            # Down blocks return (hidden_states, residuals); the rest return a tensor.
            features.append(output[0] if isinstance(output, tuple) else output)

        blocks = [*self.unet.down_blocks]
        if self.unet.mid_block is not None:
            blocks.append(self.unet.mid_block)
        blocks += [*self.unet.up_blocks]
        # Hooks live for one call only, so gradient-checkpoint recomputation in
        # backward cannot append stale features.
        handles = [b.register_forward_hook(grab) for b in blocks]
        try:
            eps = self.unet(
                sample,
                timestep,
                encoder_hidden_states,
                class_labels=labels,
                return_dict=False,
                **unet_kwargs,
            )[0]
        finally:
            for h in handles:
                h.remove()
        return eps, features

    def save_pipeline(
        self, out_dir: str | Path, base: str | Path | StableDiffusionPipeline
    ) -> Path:
        """Write a ``DMMStudentPipeline`` folder (atomically) using the base's VAE,
        text encoder, tokenizer and scheduler."""
        from dmm.atomic import atomic_dir
        from dmm.student.pipeline import build_student_pipeline

        pipe = build_student_pipeline(self, base)
        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as tmp:
            pipe.save_pretrained(tmp)
        return out_dir

    @classmethod
    def from_pipeline(cls, pipeline: str | Path | DMMStudentPipeline) -> StyleStudent:
        """The student inside a ``DMMStudentPipeline`` (or its saved folder), for more training.

        Loaded from a folder, the student owns fresh modules; from a pipeline
        object, it shares the pipeline's UNet and codebook.
        """
        from accelerate import init_empty_weights

        if isinstance(pipeline, (str, Path)):
            folder = Path(pipeline)
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
            codebook = StyleCodebook.from_pretrained(folder, subfolder="style_codebook")
        else:
            unet, codebook = pipeline.unet, pipeline.style_codebook
        config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
        # Build the shell on the meta device: its random init would be thrown away.
        with init_empty_weights():
            student = cls(unet_config=config, style_names=codebook.style_names)
        if codebook.embedding_dim != time_embedding_dim(unet):
            raise ValueError(
                f"codebook width {codebook.embedding_dim} != UNet style width "
                f"{time_embedding_dim(unet)}"
            )
        student.unet = unet
        student.style_codebook = codebook
        return student
