"""Names the project writes in one place and reads in another: never spell them twice.

Torch-free and dagster-free: the CLI, the registry, the plan and the Dagster
code location all import these.
"""

from __future__ import annotations

import re

# A teacher's name is a style name: it names files, DVC stages, Dagster
# partitions, MLflow tags and the student's codebook entries.
STYLE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
STYLE_NAME_RE = re.compile(STYLE_NAME_PATTERN)

# Files written next to a student or a merge.
LINEAGE_FILE = "dmm_lineage.json"  # inside a student folder: base hash, styles, parent
RUN_FILE = "mlflow_run.json"  # beside a student: the MLflow run of its merge
REGISTERED_FILE = "registered.json"  # beside a student: the version it became
TEACHER_RECORD = "teacher.json"  # inside a materialized teacher folder

# MLflow tags of merge runs and model versions.
TAG_PREFIX = "dmm."
STYLES_TAG = "dmm.teachers"  # comma-separated style names, in codebook order
BASE_TAG = "dmm.base_sha256"
STUDENT_SHA_TAG = "dmm.student_sha256"
FINGERPRINT_TAG = "dmm.fingerprint"
MERGE_KIND_TAG = "dmm.merge_kind"
PARENT_VERSION_TAG = "dmm.parent_version"
MERGE_REASON_TAG = "dmm.merge_reason"
GIT_COMMIT_TAG = "dmm.git_commit"
GATE_TAG = "dmm.gate"
GATE_SUMMARY_TAG = "dmm.gate_summary"
FEATURE_EXTRACTOR_TAG = "dmm.feature_extractor"
EVALUATED_TAG = "dmm.evaluated_student"  # the student sha whose evaluation the run holds
ORCHESTRATOR_RUN_TAG = "dagster.run_id"

# MLflow metric names of an evaluation, read back when planning an incremental merge.
DIAG_METRIC = "eval/M_diag/"


def teacher_tag(name: str) -> str:
    """The tag holding a teacher's UNet sha256."""
    return f"dmm.teacher.{name}.sha256"


def check_style_name(name: str, what: str = "style") -> str:
    if not isinstance(name, str) or not STYLE_NAME_RE.match(name):
        raise ValueError(
            f"invalid {what} name {name!r}: letters, digits, '_', '.', '-' (64 at most), "
            "starting with a letter or digit"
        )
    return name
