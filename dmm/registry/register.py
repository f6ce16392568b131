"""Register a student folder as a version of one MLflow registered model.

- The version's artifact is a pyfunc model (``dmm.registry.pyfunc``) holding the
  student pipeline folder and a snapshot of the ``dmm`` package.
- Idempotent: every version is tagged with the sha256 of the student folder; the
  same folder registered again reuses its version instead of adding one.
- Aliases: ``champion`` moves to a version only when its evaluation gate
  passed; otherwise the version is the ``challenger``. Nothing here ever moves
  ``champion`` for a failed gate.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dmm.atomic import DmmError
from dmm.hashing import folder_sha256
from dmm.names import GATE_TAG, MERGE_KIND_TAG, PARENT_VERSION_TAG
from dmm.names import STUDENT_SHA_TAG as SHA_TAG
from mlflow import MlflowClient

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "student_model"


@dataclass
class RegisteredStudent:
    name: str
    version: str
    alias: str
    reused: bool
    student_sha256: str
    source: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def student_sha256(student_dir: Path) -> str:
    """sha256 over the relative paths and contents of every file in the folder."""
    student_dir = Path(student_dir)
    if not (student_dir / "model_index.json").is_file():
        raise DmmError(f"not a student pipeline folder (no model_index.json): {student_dir}")
    return folder_sha256(student_dir)


def student_styles(student_dir: Path) -> list[str]:
    """The style names of a student folder, read from its codebook config (no weights loaded)."""
    config = Path(student_dir) / "style_codebook" / "config.json"
    try:
        return list(json.loads(config.read_text())["style_names"])
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise DmmError(f"cannot read the style names of {student_dir}: {exc}") from exc


def _dmm_source_snapshot(dest: Path) -> Path:
    """A copy of the installed ``dmm`` package, so the model loads where dmm is not installed."""
    import dmm

    src = Path(dmm.__file__).parent
    out = dest / "dmm"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return out


def save_student_model(student_dir: Path, dest: Path, styles: list[str], sha: str) -> Path:
    """Write an MLflow pyfunc model folder for ``student_dir`` at ``dest``."""
    import mlflow.pyfunc

    from dmm.registry.pyfunc import STUDENT_ARTIFACT, input_example, model_signature
    from dmm.registry.requirements import pinned_requirements

    code = _dmm_source_snapshot(dest.parent / "code")
    mlflow.pyfunc.save_model(
        path=str(dest),
        # By file, not by object: importing it would run its set_model().
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={STUDENT_ARTIFACT: str(student_dir)},
        code_paths=[str(code)],
        pip_requirements=pinned_requirements(),
        signature=model_signature(),
        # MLflow checks the example against the model once, here, and shows it to users.
        input_example=input_example(styles),
        metadata={"styles": styles, SHA_TAG: sha},
    )
    return dest


def find_version(client: MlflowClient, name: str, sha: str):
    versions = client.search_model_versions(f"name='{name}' and tags.`{SHA_TAG}`='{sha}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def register_student(
    client: MlflowClient,
    *,
    model_name: str,
    run_id: str,
    student_dir: Path,
    passed: bool,
    tags: Mapping[str, str],
    merge_kind: str = "full",
    parent_version: str = "",
) -> RegisteredStudent:
    """Log (or reuse) the model version of ``student_dir`` and set its alias."""
    from mlflow.exceptions import MlflowException

    student_dir = Path(student_dir)
    sha = student_sha256(student_dir)
    version_tags = {
        **{k: str(v) for k, v in tags.items()},
        SHA_TAG: sha,
        MERGE_KIND_TAG: merge_kind,
        PARENT_VERSION_TAG: parent_version,
    }
    created_model = False
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(
            model_name, description="DMM students: one style-promptable model per merge."
        )
        created_model = True

    existing = None if created_model else find_version(client, model_name, sha)
    reused = existing is not None
    try:
        if existing is None:
            styles = student_styles(student_dir)
            with tempfile.TemporaryDirectory(prefix="dmm-model-") as tmp:
                model_dir = save_student_model(student_dir, Path(tmp) / "model", styles, sha)
                client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
            source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
            existing = client.create_model_version(
                model_name, source=source, run_id=run_id, tags=version_tags
            )
    except BaseException:
        if created_model:
            # Leave no empty registered model behind a failed first registration.
            client.delete_registered_model(model_name)
        raise
    version = str(existing.version)
    client.set_model_version_tag(model_name, version, GATE_TAG, "passed" if passed else "failed")

    if passed:
        client.set_registered_model_alias(model_name, CHAMPION, version)
        if _alias_version(client, model_name, CHALLENGER) == version:
            client.delete_registered_model_alias(model_name, CHALLENGER)
        alias = CHAMPION
    elif _alias_version(client, model_name, CHAMPION) == version:
        # An older, passing evaluation of these very weights made them champion;
        # a later failing gate keeps them there (a failure never moves champion).
        alias = CHAMPION
    else:
        client.set_registered_model_alias(model_name, CHALLENGER, version)
        alias = CHALLENGER
    return RegisteredStudent(model_name, version, alias, reused, sha, existing.source)
