"""dmm: merge text-to-image models by distillation.

Heavy imports (torch, diffusers) are deferred, so that ``import dmm`` stays
cheap for the CLI and for diffusers, which imports this package to find the
classes a pipeline folder names (e.g. ``["dmm", "PatchAutoencoder"]``).
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    # Diffusers finds a component's loading method by looking its base classes
    # up on the library a folder names (here "dmm"), so the base is exposed too.
    "ModelMixin": "diffusers.models.modeling_utils",
    "PatchAutoencoder": "dmm.zoo.autoencoder",
    "StyleCodebook": "dmm.student.codebook",
    "StyleStudent": "dmm.student.model",
    "DMMStudentPipeline": "dmm.student.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dmm' has no attribute {name!r}")
