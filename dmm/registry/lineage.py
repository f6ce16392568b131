"""Which merge to run next: full, or incremental from the registered ``champion``.

The champion's version tags record what it was made from (styles, teacher
hashes, base hash), so a re-merge can tell from the registry alone whether the
manifest only gained, lost or replaced teachers (incremental: train just those,
with the frozen champion teaching the old styles) or whether the base changed
(full). The plan is a pure function of those records, so it is unit-tested
without MLflow.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from dmm import names
from dmm.atomic import DmmError, atomic_dir
from dmm.names import BASE_TAG, DIAG_METRIC, STYLES_TAG, teacher_tag

# Where a merge run keeps its plan files (dmm.plan), so a later plan can find
# the recipe an incremental champion was made from.
PLAN_ARTIFACT = "plan"


@dataclass(frozen=True)
class ChampionRecord:
    """What the registry says about the current champion."""

    version: str
    run_id: str
    styles: list[str]
    teacher_sha: dict[str, str]
    base_sha: str | None
    student_sha: str | None
    diag_fd: dict[str, float] = field(default_factory=dict)
    merge_kind: str = "full"
    fingerprint: str = ""
    # Per style: its diagonal FD, the interval and the floor (dmm.registry.gate.StyleScore).
    diag_scores: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class MergePlan:
    kind: Literal["full", "incremental", "unchanged"]
    reason: str
    parent_version: str = ""
    parent_run_id: str = ""
    new: list[str] = field(default_factory=list)
    replace: list[str] = field(default_factory=list)
    retire: list[str] = field(default_factory=list)
    old: list[str] = field(default_factory=list)
    # The parent's diagonal FD per old style: the registration guard's yardstick.
    parent_diag_fd: dict[str, float] = field(default_factory=dict)

    @property
    def merge_kind(self) -> str:
        """The ``dmm.merge_kind`` tag: ``full`` or ``incremental``."""
        return "incremental" if self.kind == "incremental" else "full"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def plan_merge(
    champion: ChampionRecord | None,
    names: list[str],
    teacher_sha: dict[str, str],
    base_sha: str,
    mode: Literal["auto", "full"] = "auto",
) -> MergePlan:
    """Decide the next merge of the teachers ``names`` (manifest order)."""
    if mode == "full":
        return MergePlan("full", "the config asks for a full merge")
    if champion is None:
        return MergePlan("full", "no champion yet")
    if not champion.base_sha:
        return MergePlan("full", f"champion v{champion.version} does not record its base")
    if champion.base_sha != base_sha:
        return MergePlan("full", f"the base model changed since champion v{champion.version}")
    previous = champion.styles
    new = [n for n in names if n not in previous]
    retire = [n for n in previous if n not in names]
    replace = [
        n for n in names if n in previous and champion.teacher_sha.get(n) != teacher_sha.get(n)
    ]
    parent = {"parent_version": champion.version, "parent_run_id": champion.run_id}
    if not (new or retire or replace):
        return MergePlan("unchanged", f"champion v{champion.version} has these teachers", **parent)
    old = [n for n in previous if n not in retire and n not in replace]
    changes = [
        f"{verb} {', '.join(items)}"
        for verb, items in (("add", new), ("replace", replace), ("retire", retire))
        if items
    ]
    reason = f"{'; '.join(changes)} on top of champion v{champion.version}"
    return MergePlan(
        "incremental",
        reason,
        new=new,
        replace=replace,
        retire=retire,
        old=old,
        parent_diag_fd={s: champion.diag_fd[s] for s in old if s in champion.diag_fd},
        **parent,
    )


def read_champion(client, model_name: str, alias: str = "champion") -> ChampionRecord | None:
    """The record of ``model_name@alias``, or None when there is no such version."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None
    tags = version.tags or {}
    styles = [s for s in tags.get(STYLES_TAG, "").split(",") if s]
    from dmm.registry.gate import parent_from_metrics

    diag: dict[str, float] = {}
    scores: dict[str, dict] = {}
    if version.run_id:
        metrics = client.get_run(version.run_id).data.metrics
        diag = {
            k.removeprefix(DIAG_METRIC): float(v)
            for k, v in metrics.items()
            if k.startswith(DIAG_METRIC)
        }
        scores = {n: asdict(sc) for n, sc in parent_from_metrics(metrics).items()}
    return ChampionRecord(
        version=str(version.version),
        run_id=version.run_id or "",
        styles=styles,
        teacher_sha={s: tags[teacher_tag(s)] for s in styles if teacher_tag(s) in tags},
        base_sha=tags.get(BASE_TAG),
        student_sha=tags.get(names.STUDENT_SHA_TAG),
        diag_fd=diag,
        diag_scores=scores,
        merge_kind=tags.get(names.MERGE_KIND_TAG, "full"),
        fingerprint=tags.get(names.FINGERPRINT_TAG, ""),
    )


def fetch_parent_student(client, model_name: str, champion: ChampionRecord, dest: Path) -> Path:
    """The champion's student folder under ``dest`` (downloaded once, checked against its record).

    A student whose styles differ from what the registry recorded for it is
    refused: training on top of it would mislabel every old style.
    """
    from dmm.registry.register import MODEL_ARTIFACT, student_styles

    folder = Path(dest) / f"v{champion.version}"
    if not (folder / "model_index.json").is_file():
        version = client.get_model_version(model_name, champion.version)
        with atomic_dir(folder) as tmp:
            local = client.download_artifacts(
                version.run_id, f"{MODEL_ARTIFACT}/artifacts/student", str(tmp / "download")
            )
            for item in Path(local).iterdir():
                shutil.move(str(item), tmp / item.name)
            shutil.rmtree(tmp / "download", ignore_errors=True)
    styles = student_styles(folder)
    if styles != champion.styles:
        raise DmmError(
            f"champion v{champion.version} of {model_name!r} has styles {styles} but the "
            f"registry records {champion.styles}; run a full merge"
        )
    return folder


def fetch_recipe(client, champion: ChampionRecord) -> dict | None:
    """The plan files the champion's run logged (``{"plan": ..., "recipe": ...}``), or None."""
    import tempfile

    from mlflow.exceptions import MlflowException

    if not champion.run_id:
        return None
    with tempfile.TemporaryDirectory(prefix="dmm-recipe-") as tmp:
        try:
            local = Path(client.download_artifacts(champion.run_id, PLAN_ARTIFACT, tmp))
            plan = json.loads((local / "merge_plan.json").read_text())
            recipe = json.loads((local / "distill.json").read_text())
        except (MlflowException, OSError, json.JSONDecodeError):
            return None
    return {"plan": plan, "recipe": recipe}
