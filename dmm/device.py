"""Which torch device a stage runs on: ``auto`` is CUDA when there is one, else the CPU."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from dmm.atomic import DmmError

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"
DEVICE_HELP = '"auto" (CUDA when available), "cpu", "cuda", "cuda:1", "mps"'


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device that ``device`` names; ``auto`` picks CUDA when available."""
    import torch  # here, not at import: planning a merge must not load torch

    if isinstance(device, torch.device):
        return device
    if not re.match(DEVICE_PATTERN, device):
        raise DmmError(f"unknown device {device!r}; use {DEVICE_HELP}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
