"""The DMM student: base UNet + style MLP + style codebook, and its pipeline.

Submodules are imported on first use, so that diffusers resolving a pipeline
component such as ``["dmm.student.codebook", "StyleCodebook"]`` does not pull
in the pipeline module.
"""

from __future__ import annotations

_LAZY = {
    "StyleCodebook": "dmm.student.codebook",
    "StyleStudent": "dmm.student.model",
    "check_same_architecture": "dmm.student.model",
    "DMMStudentPipeline": "dmm.student.pipeline",
    "build_student_pipeline": "dmm.student.pipeline",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dmm.student' has no attribute {name!r}")
