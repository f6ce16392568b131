"""Data stages: prompt sets, teacher samples and captioned image folders.

Names resolve lazily so that ``import dmm.data`` does not import torch.
"""

from __future__ import annotations

_LAZY = {
    "PromptsConfig": "dmm.data.config",
    "SampleConfig": "dmm.data.config",
    "ImageFolderConfig": "dmm.data.config",
    "build_prompts": "dmm.data.prompts",
    "read_prompts": "dmm.data.prompts",
    "sample_teacher": "dmm.data.samples",
    "sample_all": "dmm.data.samples",
    "load_samples": "dmm.data.samples",
    "load_uncond": "dmm.data.samples",
    "teachers_from_zoo": "dmm.data.samples",
    "encode_image_folder": "dmm.data.imagefolder",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dmm.data' has no attribute {name!r}")
