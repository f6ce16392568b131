"""The style codebook: one learnable vector per merged teacher.

A style is selected (or mixed) by a weight vector over the codebook's N styles;
the style embedding is ``weights @ vectors``. Every way a user can name a style
(name, index, weight vector, ``{name: weight}``) is first turned into such a
weight vector, so they all take exactly the same numerical path and a name and
its one-hot vector give bit-identical results.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from dmm.names import STYLE_NAME_RE

# One style: a name, an index, a weight vector of length N, or {name: weight}.
StyleSpec = str | int | Sequence[float] | torch.Tensor | Mapping[str, float]
# A batch: one StyleSpec (shared by every sample), a list of StyleSpecs (one per
# sample), or a (B, N) weight tensor.
StyleBatchSpec = StyleSpec | Sequence[StyleSpec]

# Names end up in file names, CLI arguments and metric keys: keep them boring.


def validate_style_names(names: Any) -> list[str]:
    """Return ``names`` as a list, or raise ValueError saying what is wrong with it."""
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise ValueError(f"style names must be a list of strings, got {names!r}")
    names = list(names)
    if not names:
        raise ValueError("a style codebook needs at least one style name")
    for name in names:
        if not isinstance(name, str) or not STYLE_NAME_RE.match(name):
            raise ValueError(
                f"invalid style name {name!r}: names must match {STYLE_NAME_RE.pattern} "
                "(a letter or digit, then up to 63 letters, digits, '_', '.', '-')"
            )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"style names must be unique; duplicated: {', '.join(dupes)}")
    return names


def _is_number(x: Any) -> bool:
    # bool is an int subclass, but True/False as a style is almost surely a bug.
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_single_style(style: Any) -> bool:
    """True if ``style`` names one style (shared by a batch), False if one per sample.

    A flat sequence of numbers is always ONE weight vector, never a list of
    per-sample indices: ``[0, 1]`` means "all weight on style 1". Per-sample
    styles are lists of names, dicts, or weight vectors, or a (B, N) tensor.
    """
    if isinstance(style, (str, Mapping)) or _is_number(style):
        return True
    if isinstance(style, torch.Tensor):
        return style.dim() <= 1
    if hasattr(style, "__array__") and not isinstance(style, (list, tuple)):
        return torch.as_tensor(style).dim() <= 1
    if isinstance(style, Sequence):
        return len(style) > 0 and all(_is_number(x) for x in style)
    return True  # let resolve() raise its clear error


class StyleCodebook(ModelMixin, ConfigMixin):
    """N learnable style vectors of width ``embedding_dim``, addressed by name.

    Weights are always normalised to sum to 1, so ``{"a": 3, "b": 1}`` is the
    same style as ``{"a": 0.75, "b": 0.25}``: a style mix is a convex
    combination of codebook vectors, as in the DMM paper.
    """

    @register_to_config
    def __init__(self, style_names: list[str], embedding_dim: int):
        super().__init__()
        names = validate_style_names(style_names)
        if not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        # The global RNG (no seed argument): callers control reproducibility
        # with torch.manual_seed, and from_pretrained overwrites it anyway.
        self.vectors = nn.Parameter(torch.randn(len(names), embedding_dim))
        self._index = {n: i for i, n in enumerate(names)}

    @property
    def style_names(self) -> list[str]:
        return list(self.config.style_names)

    @property
    def num_styles(self) -> int:
        return len(self.config.style_names)

    @property
    def embedding_dim(self) -> int:
        return int(self.config.embedding_dim)

    def _known(self) -> str:
        return ", ".join(self.style_names)

    def index(self, name: str) -> int:
        """The row of style ``name``; ValueError listing the known styles otherwise."""
        try:
            return self._index[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown style {name!r}; known styles: {self._known()}") from None

    def _check_weights(self, w: torch.Tensor, what: str) -> torch.Tensor:
        """Validate (..., N) weights and normalise each row to sum 1."""
        n = self.num_styles
        if w.shape[-1] != n:
            raise ValueError(
                f"{what} has {w.shape[-1]} entries but the codebook has {n} styles "
                f"({self._known()})"
            )
        if not torch.isfinite(w).all():
            raise ValueError(f"{what} must be finite, got {w.tolist()}")
        if (w < 0).any():
            raise ValueError(f"{what} must be non-negative, got {w.tolist()}")
        total = w.sum(-1, keepdim=True)
        if (total <= 0).any():
            raise ValueError(f"{what} must have a positive sum, got {w.tolist()}")
        return w / total

    def resolve(self, style: StyleSpec) -> torch.Tensor:
        """Turn one style into normalised float32 weights of shape (N,) that sum to 1.

        Accepts a style name, an int index, a sequence/1-D tensor of N
        non-negative weights, or a ``{name: weight}`` dict (missing names weigh 0).
        """
        n = self.num_styles
        if isinstance(style, str):
            w = torch.zeros(n)
            w[self.index(style)] = 1.0
            return w
        if isinstance(style, torch.Tensor) and style.dim() == 0:
            if style.dtype.is_floating_point or style.dtype == torch.bool:
                raise ValueError(f"a 0-d style tensor must hold an integer index, got {style}")
            style = int(style.item())
        if _is_number(style) and not isinstance(style, numbers.Integral):
            raise ValueError(
                f"style {style!r} is a single float; pass a name, an int index or {n} weights"
            )
        if isinstance(style, numbers.Integral) and not isinstance(style, bool):
            if not 0 <= style < n:
                raise ValueError(
                    f"style index {style} out of range for {n} styles ({self._known()})"
                )
            w = torch.zeros(n)
            w[int(style)] = 1.0
            return w
        if isinstance(style, Mapping):
            if not style:
                raise ValueError("style dict is empty; give at least one {name: weight}")
            w = torch.zeros(n, dtype=torch.float64)
            for name, weight in style.items():
                if not _is_number(weight):
                    raise ValueError(f"weight of style {name!r} must be a number, got {weight!r}")
                w[self.index(name)] = float(weight)
            # float64 first so that the dict and the equivalent list go through
            # the same float64 -> float32 conversion below.
            return self._check_weights(w.float(), "style weights")
        if isinstance(style, torch.Tensor) or (
            isinstance(style, Sequence) and all(_is_number(x) for x in style) and style
        ):
            w = torch.as_tensor(style, dtype=torch.float64).detach().cpu().float()
            if w.dim() != 1:
                raise ValueError(f"style weights must be 1-D, got shape {tuple(w.shape)}")
            return self._check_weights(w, "style weights")
        if hasattr(style, "__array__") and not isinstance(style, (list, tuple)):
            return self.resolve(torch.as_tensor(style))
        raise ValueError(
            f"cannot interpret style {style!r}: pass a name ({self._known()}), an index "
            f"0..{n - 1}, {n} weights, or a {{name: weight}} dict"
        )

    def resolve_batch(self, style: StyleBatchSpec, batch_size: int | None = None) -> torch.Tensor:
        """Normalised weights of shape (B, N).

        ``style`` is one style (repeated ``batch_size`` times, which is then
        required), a list of B styles, or a (B, N) weight tensor.
        """
        if is_single_style(style):
            if batch_size is None:
                raise ValueError("batch_size is required when a single style is given")
            return self.resolve(style).unsqueeze(0).expand(batch_size, -1)
        if isinstance(style, torch.Tensor) or (
            hasattr(style, "__array__") and not isinstance(style, (list, tuple))
        ):
            w = torch.as_tensor(style).detach().cpu()
            if w.dim() != 2:
                raise ValueError(f"per-sample style weights must be (B, N), got {tuple(w.shape)}")
            w = self._check_weights(w.float(), "style weights")
        else:
            if isinstance(style, str) or not isinstance(style, Sequence) or not style:
                raise ValueError(f"cannot interpret style {style!r}")
            w = torch.stack([self.resolve(s) for s in style])
        if batch_size is not None and w.shape[0] != batch_size:
            raise ValueError(f"got {w.shape[0]} per-sample styles for a batch of {batch_size}")
        return w

    def embed_weights(
        self,
        weights: torch.Tensor,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """(B, N) already-normalised weights -> (B, D) embeddings; differentiable in vectors."""
        out = weights.to(device=self.vectors.device, dtype=self.vectors.dtype) @ self.vectors
        return out.to(device=device or out.device, dtype=dtype or out.dtype)

    def embed(
        self,
        style: StyleBatchSpec,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Style embeddings of shape (B, D): ``resolve_batch(style, batch_size) @ vectors``."""
        return self.embed_weights(self.resolve_batch(style, batch_size), device, dtype)

    def forward(self, style: StyleBatchSpec, batch_size: int | None = None) -> torch.Tensor:
        return self.embed(style, batch_size)

    def _copy_rows(self, new: StyleCodebook, rows: dict[int, int]) -> StyleCodebook:
        """Copy self.vectors[src] into new.vectors[dst] for {dst: src}, bit-exact."""
        new.to(device=self.vectors.device, dtype=self.vectors.dtype)
        with torch.no_grad():
            for dst, src in rows.items():
                new.vectors[dst].copy_(self.vectors[src])
        new.vectors.requires_grad_(self.vectors.requires_grad)
        return new

    def append_styles(self, names: Sequence[str]) -> StyleCodebook:
        """A NEW codebook: these styles' vectors copied, then ``names`` with random N(0, 1) ones.

        ``self`` is left untouched, so a frozen copy of the previous student can
        keep using it (incremental merging).
        """
        if isinstance(names, str):
            names = [names]
        names = list(names)
        if not names:
            raise ValueError("append_styles needs at least one new style name")
        clash = [n for n in names if n in self._index]
        if clash:
            raise ValueError(f"styles already in the codebook: {', '.join(clash)}")
        new = StyleCodebook(self.style_names + names, self.embedding_dim)
        return self._copy_rows(new, {i: i for i in range(self.num_styles)})

    def drop_styles(self, names: Sequence[str]) -> StyleCodebook:
        """A NEW codebook without ``names``; the kept vectors are copied exactly."""
        if isinstance(names, str):
            names = [names]
        drop = {self.style_names[self.index(n)] for n in names}
        keep = [n for n in self.style_names if n not in drop]
        if not keep:
            raise ValueError("cannot drop every style; a codebook needs at least one")
        new = StyleCodebook(keep, self.embedding_dim)
        return self._copy_rows(new, {i: self.index(n) for i, n in enumerate(keep)})

    def extra_repr(self) -> str:
        shown = ", ".join(self.style_names[:8]) + (", ..." if self.num_styles > 8 else "")
        return f"styles=[{shown}], embedding_dim={self.embedding_dim}"


# Recorded as ["dmm", "StyleCodebook"] in student folders: see the note at the
# end of dmm/zoo/autoencoder.py.
StyleCodebook.__module__ = "dmm"
