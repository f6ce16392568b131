"""Pinned pip requirements of a logged student: what loading and sampling it needs."""

from __future__ import annotations

from importlib import metadata

from packaging.version import Version

# The inference path: diffusers pipelines (torch, transformers for the text
# encoder, accelerate for loading), safetensors weights, PIL for PNG output,
# pydantic/pyyaml for dmm itself, pandas + mlflow for pyfunc. Never
# torchvision: its only wheel for this torch is CUDA-linked and breaks diffusers.
INFERENCE_DISTRIBUTIONS = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "safetensors",
    "numpy",
    "pillow",
    "pydantic",
    "pyyaml",
    "tqdm",
    "pandas",
    "mlflow",
)


def public_version(dist: str) -> str:
    """The installed version without a local label: ``2.13.0+cpu`` -> ``2.13.0``.

    ``torch==2.13.0`` matches both the CPU and the CUDA builds, so the same
    model installs on either machine.
    """
    return Version(metadata.version(dist)).public


def pinned_requirements() -> list[str]:
    return [f"{dist}=={public_version(dist)}" for dist in INFERENCE_DISTRIBUTIONS]
