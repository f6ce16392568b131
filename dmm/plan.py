"""The merge plan: what the next merge is, decided by the library for every front end.

``dmm plan`` (the DVC ``plan`` stage, and the Dagster ``merged_student`` asset
through the same function) reads the teacher manifest, params.yaml, the
orchestrator's request and the registry's ``champion`` record, and writes:

- ``data/plan/merge_plan.json``: the decision (full / incremental / unchanged)
  and its reason, the parent version, the teachers to add, replace and
  retire, the final styles, the recipe's fingerprint and the MLflow tags;
- ``data/plan/distill.json``: the resolved ``DistillConfig`` (the recipe), the
  one input of the ``distill`` stage besides data;
- ``data/plan/evaluate.json``: the resolved ``EvaluateConfig``.

"unchanged" keeps the champion's recipe byte for byte, so DVC has nothing to
rerun. Nothing here imports torch: an orchestrator can plan in its own process.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dmm import layout, names
from dmm.atomic import DmmError, write_text_atomic
from dmm.hashing import fingerprint, folder_sha256, unet_sha256

log = logging.getLogger(__name__)

# DistillConfig fields the distill stage sets when it runs (how a run is watched and
# resumed), so the recipe leaves them out.
LAUNCH_FIELDS = frozenset({"progress", "log_with", "resume"})


class MergeRequest(BaseModel):
    """What one run asks for beyond params.yaml (``data/plan/request.json``)."""

    model_config = ConfigDict(extra="forbid")

    full_merge: bool = Field(False, description="merge every teacher from the base")
    distill: dict[str, Any] = Field(default_factory=dict, description="DistillConfig overrides")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="EvaluateConfig overrides")


@dataclass(frozen=True)
class MergePlan:
    kind: Literal["full", "incremental", "unchanged"]
    reason: str
    styles: list[str]
    trained: list[str]
    fingerprint: str
    recipe_kind: Literal["full", "incremental"] = "full"
    parent_version: str = ""
    parent_run_id: str = ""
    parent_dir: str = ""
    parent_sha256: str = ""
    new: list[str] = field(default_factory=list)
    replace: list[str] = field(default_factory=list)
    retire: list[str] = field(default_factory=list)
    old: list[str] = field(default_factory=list)
    # The parent's diagonal FD per old style: the gate's yardstick for old styles,
    # with its interval and floor where the parent's evaluation recorded them.
    parent_diag_fd: dict[str, float] = field(default_factory=dict)
    parent_scores: dict[str, dict] = field(default_factory=dict)
    base_sha256: str = ""
    teacher_sha256: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def merge_kind(self) -> str:
        """The ``dmm.merge_kind`` tag of what the recipe makes: ``full`` or ``incremental``."""
        return self.recipe_kind

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class PlanInputs:
    """Everything a plan is a function of (read by :func:`gather_inputs`)."""

    params: dict[str, Any]
    request: MergeRequest
    teachers: list[str]  # manifest order
    teacher_sha256: dict[str, str]
    base_dir: str  # relative to the project root where inside it
    base_sha256: str
    previous_recipe: dict[str, Any] | None = None  # the distill.json on disk


def recipe_fingerprint(distill: dict[str, Any], teacher_sha: dict[str, str], parent: str) -> str:
    """What a student is a function of: its config, its teachers' weights and its parent."""
    from dmm.distill.config import DistillConfig

    config = DistillConfig(**distill).fingerprint()
    trained = [t["name"] for t in distill["teachers"]]
    return fingerprint(
        {"distill": config, "teachers": {n: teacher_sha[n] for n in trained}, "parent": parent}
    )


def _distill_recipe(inputs: PlanInputs, trained: list[str], extra: dict[str, Any]) -> dict:
    from dmm.distill.config import DistillConfig

    base = {
        **(inputs.params.get("distill") or {}),
        **extra,
        **inputs.request.distill,
        "base": inputs.base_dir,
        "output_dir": layout.STUDENT,
        "teachers": [
            {"name": n, "path": f"{layout.TEACHERS}/{n}", "samples": f"{layout.SAMPLES}/{n}"}
            for n in trained
        ],
    }
    cfg = _validated(DistillConfig, base, "distill")
    return cfg.model_dump(mode="json", exclude=set(LAUNCH_FIELDS))


def _evaluate_config(inputs: PlanInputs, styles: list[str]) -> dict:
    from dmm.evaluation.config import EvaluateConfig

    methods = (inputs.params.get("baselines") or {}).get("methods", [])
    base = {
        **(inputs.params.get("evaluate") or {}),
        **inputs.request.evaluate,
        "student": f"{layout.STUDENT}/student",
        "teachers": [{"name": n, "path": f"{layout.TEACHERS}/{n}"} for n in styles],
        "baselines": {m: f"{layout.BASELINES}/{m}" for m in methods},
        "output_dir": layout.EVALUATION,
        "distill_dir": layout.STUDENT,
        "base": inputs.base_dir,
    }
    return _validated(EvaluateConfig, base, "evaluate").model_dump(mode="json")


def _validated(model: type[BaseModel], data: dict, what: str) -> BaseModel:
    try:
        return model(**data)
    except ValidationError as exc:
        parts = [f"{what}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise DmmError(f"invalid {what} config: {'; '.join(parts)}") from None


def registry_config(params: dict[str, Any]):
    from dmm.registry.config import RegistryConfig

    return _validated(RegistryConfig, params.get("registry") or {}, "registry")


def _final_styles(previous: list[str], new: list[str], retire: list[str]) -> list[str]:
    """The codebook order of an incremental merge (the trainer's ``plan_styles`` order)."""
    kept = [n for n in previous if n not in retire]
    return kept + [n for n in new if n not in previous]


def _tags(plan_kind: str, reason: str, fp: str, parent: str, inputs: PlanInputs, shas: dict):
    return {
        names.MERGE_KIND_TAG: plan_kind,
        names.PARENT_VERSION_TAG: parent,
        names.MERGE_REASON_TAG: reason,
        names.FINGERPRINT_TAG: fp,
        names.BASE_TAG: inputs.base_sha256,
        **{names.teacher_tag(n): s for n, s in shas.items()},
    }


def decide(
    inputs: PlanInputs,
    champion=None,
    *,
    parent_dir: str = "",
    champion_recipe: dict | None = None,
) -> tuple[MergePlan, dict, dict]:
    """(plan, distill recipe, evaluate config): a pure function of its arguments.

    ``champion`` is a :class:`dmm.registry.lineage.ChampionRecord` or None;
    ``parent_dir`` is where its student lies (incremental merges);
    ``champion_recipe`` is the recipe it was made from, when known.
    """
    from dmm.registry import lineage

    reg = registry_config(inputs.params)
    mode = "full" if inputs.request.full_merge else reg.merge
    change = lineage.plan_merge(
        champion, inputs.teachers, inputs.teacher_sha256, inputs.base_sha256, mode
    )
    if change.kind == "incremental":
        return _incremental(inputs, champion, change, parent_dir, reg)
    if change.kind == "unchanged" and champion.merge_kind == "incremental":
        kept = _kept_recipe(inputs, champion, champion_recipe, change.reason)
        if kept is not None:
            return kept
        reason = (
            f"champion v{champion.version} is incremental and its recipe is not on disk or "
            "in its run; merging every teacher from the base"
        )
        return _full(inputs, champion, reason)
    return _full(inputs, champion, None if change.kind == "unchanged" else change.reason)


def _full(inputs: PlanInputs, champion, reason: str | None) -> tuple[MergePlan, dict, dict]:
    """A merge of every teacher from the base; ``reason`` None: the champion has them all."""
    trained = list(inputs.teachers)
    recipe = {"action": "distill", "config": _distill_recipe(inputs, trained, {})}
    fp = recipe_fingerprint(recipe["config"], inputs.teacher_sha256, "")
    kind = "full"
    if champion is not None and champion.fingerprint == fp:
        kind, reason = "unchanged", f"champion v{champion.version} was merged from this recipe"
    elif reason is None:
        reason = f"the distill config changed since champion v{champion.version}"
    shas = {n: inputs.teacher_sha256[n] for n in trained}
    plan = MergePlan(
        kind=kind,
        reason=reason,
        styles=trained,
        trained=trained,
        fingerprint=fp,
        base_sha256=inputs.base_sha256,
        teacher_sha256=shas,
        tags=_tags("full", reason, fp, "", inputs, shas),
    )
    return plan, recipe, _evaluate_config(inputs, trained)


def _incremental(inputs, champion, change, parent_dir, reg) -> tuple[MergePlan, dict, dict]:
    trained = change.new + change.replace
    if trained:
        extra = {
            **reg.incremental,
            "init_from": parent_dir,
            "retire": change.retire,
            "replace": change.replace,
        }
        recipe = {"action": "distill", "config": _distill_recipe(inputs, trained, extra)}
        fp = recipe_fingerprint(recipe["config"], inputs.teacher_sha256, champion.student_sha)
    else:  # only retirements: drop style vectors, every other style stays bit-identical
        recipe = {"action": "retire", "init_from": parent_dir, "retire": change.retire}
        fp = fingerprint({"recipe": recipe, "parent": champion.student_sha})
    styles = _final_styles(champion.styles, change.new, change.retire)
    shas = {n: champion.teacher_sha.get(n, "") for n in styles} | {
        n: inputs.teacher_sha256[n] for n in trained
    }
    plan = MergePlan(
        kind="incremental",
        reason=change.reason,
        styles=styles,
        trained=trained,
        fingerprint=fp,
        recipe_kind="incremental",
        parent_version=champion.version,
        parent_run_id=champion.run_id,
        parent_dir=parent_dir,
        parent_sha256=champion.student_sha or "",
        new=change.new,
        replace=change.replace,
        retire=change.retire,
        old=change.old,
        parent_diag_fd=change.parent_diag_fd,
        parent_scores={s: champion.diag_scores[s] for s in change.old if s in champion.diag_scores},
        base_sha256=inputs.base_sha256,
        teacher_sha256=shas,
        tags=_tags("incremental", change.reason, fp, champion.version, inputs, shas),
    )
    return plan, recipe, _evaluate_config(inputs, styles)


def _kept_recipe(inputs, champion, recipe, reason) -> tuple[MergePlan, dict, dict] | None:
    """The incremental champion's own recipe and plan, when it can be found."""
    if recipe is None or recipe.get("plan", {}).get("fingerprint") != champion.fingerprint:
        return None
    kept = MergePlan(**{**recipe["plan"], "kind": "unchanged", "reason": reason})
    return kept, recipe["recipe"], _evaluate_config(inputs, kept.styles)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise DmmError(f"{path}: unreadable ({str(exc).splitlines()[0]})") from None


def read_params(root: Path) -> dict[str, Any]:
    path = Path(root) / layout.PARAMS
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DmmError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise DmmError(f"{path} must hold a mapping")
    return loaded


def read_request(path: Path) -> MergeRequest:
    data = _read_json(path)
    try:
        return MergeRequest(**(data or {}))
    except (ValidationError, TypeError) as exc:
        raise DmmError(f"{path}: invalid merge request ({str(exc).splitlines()[0]})") from None


def teacher_records(root: Path, teachers: list[str]) -> dict[str, dict]:
    """Each materialized teacher's record (``data/teachers/<name>/teacher.json``)."""
    records = {}
    for name in teachers:
        path = Path(root) / layout.TEACHERS / name / names.TEACHER_RECORD
        record = _read_json(path)
        if record is None:
            raise DmmError(
                f"teacher {name!r} is not materialized ({path} is missing): "
                f"run `dvc repro teachers` or `dmm teachers materialize`"
            )
        records[name] = record
    return records


def resolve_manifest_base(root: Path) -> Path:
    """The manifest's base pipeline folder (the zoo's for ``zoo:base``)."""
    from dmm.teachers.manifest import load_manifest
    from dmm.teachers.sources import resolve_base

    root = Path(root).resolve()
    manifest = load_manifest(root / layout.MANIFEST, repo_root=root)
    return resolve_base(
        manifest.base,
        zoo_dir=root / layout.ZOO,
        repo_root=root,
        work_dir=root / layout.TEACHERS / ".base",
    ).resolve()


def gather_inputs(root: Path, request: Path | None = None) -> PlanInputs:
    """Read the plan's inputs from a project checkout (no registry, no torch)."""
    from dmm.teachers.manifest import load_manifest

    root = Path(root).resolve()
    manifest = load_manifest(root / layout.MANIFEST, repo_root=root)
    if not manifest.teachers:
        raise DmmError(f"{layout.MANIFEST} lists no teachers")
    teachers = manifest.names
    records = teacher_records(root, teachers)
    base = resolve_manifest_base(root)
    shown = str(base.relative_to(root)) if base.is_relative_to(root) else str(base)
    return PlanInputs(
        params=read_params(root),
        request=read_request(root / (request or layout.REQUEST)),
        teachers=teachers,
        teacher_sha256={n: str(r.get("sha256", "")) for n, r in records.items()},
        base_dir=shown,
        base_sha256=unet_sha256(base),
        previous_recipe=_read_json(root / layout.DISTILL_PLAN),
    )


def _recipe_on_disk(root: Path) -> dict | None:
    plan, recipe = _read_json(root / layout.PLAN), _read_json(root / layout.DISTILL_PLAN)
    return {"plan": plan, "recipe": recipe} if plan and recipe else None


def make_plan(root: Path, client, request: Path | None = None) -> tuple[MergePlan, dict, dict]:
    """The plan for the checkout at ``root`` against the registry behind ``client``.

    An incremental merge's parent (the champion's student) is downloaded to
    ``data/parents/v<N>`` once and checked against its registry record.
    """
    from dmm.registry import lineage

    root = Path(root).resolve()
    inputs = gather_inputs(root, request)
    reg = registry_config(inputs.params)
    champion = lineage.read_champion(client, reg.model_name)
    if champion is None:
        return decide(inputs, None)
    recipe = _recipe_on_disk(root)
    if recipe is None or recipe["plan"].get("fingerprint") != champion.fingerprint:
        recipe = lineage.fetch_recipe(client, champion)
    parent_dir = ""
    if set(champion.styles) != set(inputs.teachers) or any(
        champion.teacher_sha.get(n) != inputs.teacher_sha256[n] for n in inputs.teachers
    ):
        if champion.base_sha == inputs.base_sha256 and reg.merge == "auto":
            folder = lineage.fetch_parent_student(
                client, reg.model_name, champion, root / layout.PARENTS
            )
            parent_dir = str(folder.relative_to(root))
    return decide(inputs, champion, parent_dir=parent_dir, champion_recipe=recipe)


def write_plan(root: Path, plan: MergePlan, recipe: dict, evaluate: dict) -> None:
    """Write the three plan files; an unchanged file is left as it is (and its mtime)."""
    root = Path(root)
    for rel, text in (
        (layout.DISTILL_PLAN, json.dumps(recipe, indent=2, sort_keys=True) + "\n"),
        (layout.EVALUATE_PLAN, json.dumps(evaluate, indent=2, sort_keys=True) + "\n"),
        (layout.PLAN, plan.to_json()),
    ):
        path = root / rel
        if not (path.is_file() and path.read_text() == text):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, text)


def read_plan(root: Path) -> tuple[MergePlan, dict]:
    """The plan and recipe on disk, checked against each other (a hand edit is refused)."""
    root = Path(root)
    data, recipe = _read_json(root / layout.PLAN), _read_json(root / layout.DISTILL_PLAN)
    if data is None or recipe is None:
        raise DmmError(f"no merge plan at {root / layout.PLAN_DIR}: run `dmm plan` first")
    try:
        plan = MergePlan(**data)
    except TypeError as exc:
        raise DmmError(f"{root / layout.PLAN}: not a merge plan ({exc})") from None
    check_recipe(plan, recipe, root / layout.PLAN)
    return plan, recipe


def check_recipe(plan: MergePlan, recipe: dict, where: Path) -> None:
    """The recipe must be the one the plan's fingerprint names, for the plan's styles."""
    if recipe.get("action") == "distill":
        trained = [t["name"] for t in recipe["config"]["teachers"]]
        fp = recipe_fingerprint(recipe["config"], plan.teacher_sha256, plan.parent_sha256)
    else:
        trained = []
        fp = fingerprint({"recipe": recipe, "parent": plan.parent_sha256})
    if fp != plan.fingerprint or trained != plan.trained:
        raise DmmError(
            f"{where} does not match {layout.DISTILL_PLAN} (edited by hand?): run `dmm plan` again"
        )
    expected = plan.styles
    if plan.recipe_kind == "full" and trained != expected:
        raise DmmError(f"{where}: styles {expected} differ from the teachers trained {trained}")


def check_parent(root: Path, plan: MergePlan, client, model_name: str) -> None:
    """An incremental plan's parent must be the registry version it names, as recorded."""
    if plan.recipe_kind != "incremental":
        return
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version(model_name, plan.parent_version)
    except MlflowException:
        raise DmmError(
            f"the plan's parent v{plan.parent_version} is not a version of {model_name!r}: "
            "run `dmm plan` again"
        ) from None
    tags = version.tags or {}
    previous = [s for s in tags.get(names.STYLES_TAG, "").split(",") if s]
    expected = _final_styles(previous, plan.new, plan.retire)
    if tags.get(names.STUDENT_SHA_TAG) != plan.parent_sha256 or expected != plan.styles:
        raise DmmError(
            f"the plan contradicts the registry: v{plan.parent_version} has styles {previous} "
            f"and student {tags.get(names.STUDENT_SHA_TAG, '?')[:12]}, the plan expects "
            f"{plan.styles} from {plan.parent_sha256[:12]}: run `dmm plan` again"
        )
    parent = Path(root) / plan.parent_dir
    if parent.is_dir() and folder_sha256(parent) != plan.parent_sha256:
        raise DmmError(f"{parent} is not the student of v{plan.parent_version}: remove it")


def check_samples(root: Path, recipe: dict) -> None:
    """Each trained teacher's samples must come from the recipe's base (its text encoder)."""
    from dmm.hashing import weights_sha256

    if recipe.get("action") != "distill":
        return
    root = Path(root)
    config = recipe["config"]
    base = weights_sha256(root / config["base"] / "text_encoder")
    for teacher in config["teachers"]:
        index = _read_json(root / teacher["samples"] / "index.json")
        if index is None:
            raise DmmError(f"no samples of teacher {teacher['name']!r}: run `dvc repro samples`")
        if index.get("base_text_encoder_sha256") != base:
            raise DmmError(
                f"the samples of {teacher['name']!r} were drawn with another base than "
                f"{config['base']} (the manifest's): run `dvc repro samples` again"
            )
