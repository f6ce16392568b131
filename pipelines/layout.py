"""Where the pipeline's products live, relative to the repository root.

Shared by the Dagster definitions and ``python -m pipelines.demo``; it imports
neither dagster nor torch.
"""

from __future__ import annotations

PARAMS = "params.yaml"
MANIFEST = "data/teachers.yaml"
ZOO = "data/zoo"
PROMPTS = "data/prompts"
TEACHERS = "data/teachers"
SAMPLES = "data/samples"
STUDENT = "data/student"
# Previous champions downloaded from the registry, parents of incremental merges.
PARENTS = "data/parents"
BASELINES = "data/baselines"
EVALUATION = "data/evaluation"
PREVIEW = "data/student/preview"
DVC_LOCK = "dvc.lock"

TEACHER_RECORD = "teacher.json"
BASELINE_METHODS = ("weighted", "task_arithmetic", "ties", "dare_linear", "dare_ties")
PREVIEW_PROMPTS = (
    "a large red circle in the center",
    "a small blue square at the top left",
    "a large green triangle at the bottom right",
)


def sample_stage(index: int) -> str:
    """The DVC stage of the samples of the manifest's teacher at ``index``."""
    return f"samples@{index}"


def teacher_stage(index: int) -> str:
    """The DVC stage of the manifest's teacher at ``index`` (dvc.yaml ``foreach`` names)."""
    return f"teachers@{index}"
