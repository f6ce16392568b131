"""Block-weighted merges (MBW): one merge strength per UNet block.

The grouping is the one supermerger and sd-mecha (``sd1-supermerger_blocks``)
use for SD1.5: ``BASE``, ``IN00``..``IN11``, ``M00``, ``OUT00``..``OUT11``, where
an LDM key ``input_blocks.N`` belongs to ``INnn``, ``middle_block`` to ``M00``,
``output_blocks.N`` to ``OUTnn``, the final ``out.`` norm/conv to the last
output block, and everything else (``time_embed`` and, in a single-file
checkpoint, the text encoder and VAE) to ``BASE``.

Diffusers UNets are mapped onto the same blocks, so that one list of weights
means the same on both layouts (with L layers per level):

- ``conv_in`` is ``IN00`` (LDM's ``input_blocks.0``);
- ``down_blocks.i.{resnets,attentions}.j`` is ``IN(1 + i (L+1) + j)`` and
  ``down_blocks.i.downsamplers`` is ``IN((i+1) (L+1))``;
- ``mid_block`` is ``M00``;
- ``up_blocks.i.{resnets,attentions}.j`` is ``OUT(i (L+1) + j)`` and
  ``up_blocks.i.upsamplers`` joins the level's last block ``OUT(i (L+1) + L)``;
- ``conv_norm_out``/``conv_out`` join the last output block;
- ``time_embedding``, ``class_embedding`` and anything else are ``BASE``.

The counts come from the base's keys (SD1.5: 12 + 1 + 12; the miniature zoo's
3-level UNet with one layer per level: 6 + 1 + 6). Weights are given for the
blocks in that order, with or without a leading ``BASE`` (without it, the BASE
keys merge at full strength).

A block weight b scales the block's merge relative to the base:
theta = theta_0 + b (merge(theta) - theta_0). For the delta methods that is
``lam * b``; for ``weighted`` it is supermerger's per-block alpha,
(1 - b) theta_0 + b sum_t w_t theta_t. b = 0 keeps the base's block, b = 1 is
the plain merge.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dmm.atomic import DmmError

BASE = "BASE"

_LDM_IN = re.compile(r"(?:^|\.)input_blocks\.(\d+)\.")
_LDM_MID = re.compile(r"(?:^|\.)middle_block\.")
_LDM_OUT = re.compile(r"(?:^|\.)output_blocks\.(\d+)\.")
_LDM_FINAL = re.compile(r"(?:^|\.)diffusion_model\.out\.")
_HF_DOWN = re.compile(r"^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.")
_HF_UP = re.compile(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.")
_HF_FINAL = ("conv_norm_out.", "conv_out.")


@dataclass(frozen=True)
class BlockLayout:
    """How many input and output blocks a UNet has, and in which key naming."""

    n_in: int
    n_out: int
    ldm: bool
    layers: int = 0  # diffusers only: resnets per down level (L)

    @property
    def names(self) -> list[str]:
        """The blocks in weight order, BASE first."""
        return [
            BASE,
            *(f"IN{i:02}" for i in range(self.n_in)),
            "M00",
            *(f"OUT{i:02}" for i in range(self.n_out)),
        ]

    def block_of(self, key: str) -> str:
        return _ldm_block(key, self.n_out) if self.ldm else _hf_block(key, self.layers, self.n_out)


def _ldm_block(key: str, n_out: int) -> str:
    if m := _LDM_IN.search(key):
        return f"IN{int(m.group(1)):02}"
    if _LDM_MID.search(key):
        return "M00"
    if m := _LDM_OUT.search(key):
        return f"OUT{int(m.group(1)):02}"
    if _LDM_FINAL.search(key):
        return f"OUT{n_out - 1:02}"
    return BASE


def _hf_block(key: str, layers: int, n_out: int) -> str:
    if key.startswith("conv_in."):
        return "IN00"
    if m := _HF_DOWN.match(key):
        level, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
        step = layers + 1
        return f"IN{(level + 1) * step if kind == 'downsamplers' else 1 + level * step + j:02}"
    if key.startswith("mid_block."):
        return "M00"
    if m := _HF_UP.match(key):
        level, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
        return f"OUT{level * (layers + 1) + (layers if kind == 'upsamplers' else j):02}"
    if key.startswith(_HF_FINAL):
        return f"OUT{n_out - 1:02}"
    return BASE


def detect_layout(keys: Iterable[str]) -> BlockLayout:
    """The block layout of a UNet (LDM or diffusers key names) from its keys."""
    keys = list(keys)
    ldm_in = [int(m.group(1)) for k in keys if (m := _LDM_IN.search(k))]
    ldm_out = [int(m.group(1)) for k in keys if (m := _LDM_OUT.search(k))]
    if ldm_in and ldm_out:
        return BlockLayout(n_in=max(ldm_in) + 1, n_out=max(ldm_out) + 1, ldm=True)
    down = [m for k in keys if (m := _HF_DOWN.match(k))]
    if down and any(_HF_UP.match(k) for k in keys):
        levels = max(int(m.group(1)) for m in down) + 1
        layers = max(int(m.group(3)) for m in down if m.group(2) == "resnets") + 1
        n = levels * (layers + 1)
        return BlockLayout(n_in=n, n_out=n, ldm=False, layers=layers)
    raise DmmError(
        "block weights need a UNet, but the base has no input/output blocks "
        "(neither LDM input_blocks/output_blocks nor diffusers down_blocks/up_blocks keys)"
    )


def block_strengths(
    values: Sequence[float], keys: Iterable[str]
) -> tuple[dict[str, float], dict[str, float]]:
    """Check ``values`` against the base's blocks; return the weight of every
    block (BASE included, for the record) and of every key."""
    keys = list(keys)
    layout = detect_layout(keys)
    names = layout.names
    n = len(names) - 1
    if len(values) not in (n, n + 1):
        raise DmmError(
            f"block weights: got {len(values)} values, but this UNet has {n} blocks "
            f"(IN00..IN{layout.n_in - 1:02}, M00, OUT00..OUT{layout.n_out - 1:02}): "
            f"give {n}, or {n + 1} with BASE first"
        )
    full = [1.0, *values] if len(values) == n else list(values)
    by_block = dict(zip(names, (float(v) for v in full), strict=True))
    return by_block, {k: by_block[layout.block_of(k)] for k in keys}
