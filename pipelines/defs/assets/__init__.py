"""The asset graph: data layer (DVC) and model layer (Accelerate, MLflow)."""

from pipelines.defs.assets.data import (
    base_model,
    prompt_set,
    teacher_manifest,
    teacher_samples,
    teachers,
)
from pipelines.defs.assets.models import (
    evaluation,
    merged_student,
    registered_model,
    static_baselines,
)

ASSETS = [
    teacher_manifest,
    base_model,
    prompt_set,
    teachers,
    teacher_samples,
    merged_student,
    static_baselines,
    evaluation,
    registered_model,
]

__all__ = ["ASSETS"]
