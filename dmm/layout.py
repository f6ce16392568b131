"""Where the project's products live, relative to the repository root.

One definition for the CLI's defaults, dvc.yaml, the plan and the Dagster
code location (dvc.yaml spells the same paths; a test checks they agree).
Imports neither dagster nor torch.
"""

from __future__ import annotations

PARAMS = "params.yaml"
MANIFEST = "data/teachers.yaml"
ZOO = "data/zoo"
PROMPTS = "data/prompts"
TEACHERS = "data/teachers"
SAMPLES = "data/samples"
# The merge plan: what the next merge is (written by `dmm plan`, the DVC `plan` stage).
PLAN_DIR = "data/plan"
PLAN = "data/plan/merge_plan.json"  # the decision: kind, reason, parent, changes, tags
DISTILL_PLAN = "data/plan/distill.json"  # the resolved DistillConfig (the distill stage's dep)
EVALUATE_PLAN = "data/plan/evaluate.json"  # the resolved EvaluateConfig
# What an orchestrator run asks beyond params.yaml (git-tracked; `{}` for the CLI).
REQUEST = "data/plan/request.json"
# The candidate of the latest merge (the distill stage's output); evaluated, then registered.
STUDENT = "data/student"
# The working copy of the registry's `champion`: what `dmm generate` loads by default.
# It changes only when `champion` moves, never for a refused candidate.
CHAMPION = "data/champion"
# Previous champions downloaded from the registry, parents of incremental merges.
PARENTS = "data/parents"
BASELINES = "data/baselines"
EVALUATION = "data/evaluation"
# The compact figures of an evaluation: `dvc metrics show/diff` and `dvc exp show` read it.
METRICS = "data/evaluation/metrics.json"
EVALUATED = "data/evaluation/evaluated.json"  # which student the evaluation is of
PREVIEW = "data/student/preview"
DVC_LOCK = "dvc.lock"

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
