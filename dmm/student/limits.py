"""Bounds on one generation request, shared by ``dmm generate`` and the served model.

Torch-free, so the model server can check a request before any work. A request
runs synchronously: unbounded steps or rows would let one caller hold a server
(or a terminal) for minutes with no output.
"""

from __future__ import annotations

import math

from dmm.atomic import DmmError

MAX_STEPS = 200
MAX_IMAGES = 16  # rows of one REST request; images per prompt and style in the CLI
DEFAULTS = {"seed": 0, "steps": 20, "guidance_scale": 3.0}


def check_steps(steps: int) -> int:
    if not 1 <= steps <= MAX_STEPS:
        raise DmmError(f"steps must be in 1..{MAX_STEPS}, got {steps}")
    return steps


def check_guidance(scale: float) -> float:
    if not (math.isfinite(scale) and scale >= 0):
        raise DmmError(f"guidance_scale must be a finite number >= 0, got {scale}")
    return scale


def check_count(count: int, what: str) -> int:
    if not 1 <= count <= MAX_IMAGES:
        raise DmmError(f"{what} must be in 1..{MAX_IMAGES}, got {count}")
    return count
