"""A miniature copy of the project, and the whole Dagster graph run once on it.

The copy is a real DVC repository (``dvc init --no-scm``, a local remote in the
temp folder) whose params.yaml shrinks the DVC stages (zoo, prompts, samples),
since DVC reads its parameters from there; the Dagster run config carries the
miniature distillation and evaluation settings. MLflow is a sqlite file in the
same temp folder. Three test modules share one build through the ``built`` fixture (conftest).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL_NAME = "dmm-student-test"
# Every asset of the code location, as the tests expect to see them materialized.
ALL_ASSETS = {
    "teacher_manifest",
    "base_model",
    "prompt_set",
    "teachers",
    "teacher_samples",
    "merged_student",
    "static_baselines",
    "evaluation",
    "registered_model",
}

# The miniature run's settings, as a launchpad would set them (resource merge_request).
DISTILL_SETTINGS = {
    "steps": 2,
    "batch_size": 2,
    "checkpoint_every": 2,
    "log_every": 1,
    "warmup_steps": 0,
}
EVALUATE_SETTINGS = {
    "images_per_style": 128,
    "steps": 2,
    "batch_size": 128,
    "interpolation_points": 2,
}
# A 2-step student cannot beat anything: the test gate accepts whatever it is,
# so the registration path (champion) runs; test_pipeline checks the failing side.
LENIENT_GATE = {
    "max_fid_t_ratio": 1e9,
    "max_independent_ratio": 1e9,
    "min_relative_style_accuracy": 0.0,
    "baseline_ratio_factor": 1e9,
}


def tool_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def miniature_params() -> dict:
    from dmm.zoo.config import ZooConfig

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["zoo"] = ZooConfig.miniature().model_dump()
    params["prompts"] = {**params.get("prompts", {}), "n_train": 8, "n_eval": 8}
    params["sample"] = {
        **params.get("sample", {}),
        "steps": 2,
        "samples_per_prompt": 1,
        "batch_size": 8,
    }
    params["preview"] = {"steps": 2}
    params.setdefault("registry", {})["model_name"] = MODEL_NAME
    return params


def make_repo(dest: Path) -> Path:
    """A DVC repository with the project's stages, miniature params and a local remote."""
    dest.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, dest / name)
    (dest / "data" / "plan").mkdir(parents=True)
    shutil.copy(REPO / "data" / "teachers.yaml", dest / "data" / "teachers.yaml")
    shutil.copy(REPO / "data" / "plan" / "request.json", dest / "data" / "plan" / "request.json")
    # dvc.yaml's deps name dmm source folders; the commands run the installed dmm.
    shutil.copytree(REPO / "dmm", dest / "dmm", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "params.yaml").write_text(yaml.safe_dump(miniature_params(), sort_keys=False))
    run([str(BIN / "dvc"), "init", "--no-scm", "-q"], dest)
    run([str(BIN / "dvc"), "config", "core.analytics", "false"], dest)
    run([str(BIN / "dvc"), "remote", "add", "-d", "local", str(dest.parent / "remote")], dest)
    return dest


def merge_request(**extra):
    from pipelines.defs.config import DistillSettings, EvaluateSettings
    from pipelines.defs.resources import MergeRequestResource

    return MergeRequestResource(
        distill=DistillSettings(**DISTILL_SETTINGS),
        evaluate=EvaluateSettings(**EVALUATE_SETTINGS),
        **extra,
    )


def resources_for(repo: Path, tracking_uri: str, **request) -> dict:
    from pipelines.definitions import build_resources
    from pipelines.defs.resources import ComputeResource, MlflowResource, ProjectResource

    project = ProjectResource(repo_root=str(repo))
    resources = build_resources(project)
    resources["mlflow"] = MlflowResource(project=project, tracking_uri=tracking_uri)
    resources["compute"] = ComputeResource()
    resources["merge_request"] = merge_request(**request)
    return resources


def run_config(gate: dict | None = None) -> dict:
    return {
        "ops": {
            "evaluation_evaluation_gate": {"config": gate if gate is not None else LENIENT_GATE},
        }
    }


def materialize_all(repo: Path, instance, resources: dict, gate: dict | None = None, **kw):
    """What `make demo` does, in process: the manifest first (it adds the partitions),
    then the whole graph as one run over the range of teacher partitions."""
    import dagster as dg

    from pipelines.defs.asset_checks import evaluation_gate
    from pipelines.defs.assets import ASSETS
    from pipelines.defs.assets.data import teacher_manifest
    from pipelines.defs.partitions import TEACHER_PARTITIONS, range_tags

    first = dg.materialize([teacher_manifest], resources=resources, instance=instance)
    assert first.success
    keys = instance.get_dynamic_partitions(TEACHER_PARTITIONS.name)
    return dg.materialize(
        [*ASSETS, evaluation_gate],
        resources=resources,
        instance=instance,
        run_config=run_config(gate),
        tags=range_tags(keys[0], keys[-1]),
        **kw,
    )


@dataclass
class BuiltPipeline:
    repo: Path
    tracking_uri: str
    dagster_home: Path
    result: object


_BUILT: dict[str, BuiltPipeline] = {}


def build_pipeline(root: Path) -> BuiltPipeline:
    """Run the whole graph once per session on a miniature repo (shared by test modules)."""
    if "built" in _BUILT:
        return _BUILT["built"]
    import dagster as dg

    repo = make_repo(root / "repo")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    dagster_home = root / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO / "pipelines" / "dagster.yaml", dagster_home / "dagster.yaml")
    # A persistent instance, so a webserver started later sees these runs.
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    result = materialize_all(repo, instance, resources_for(repo, tracking_uri))
    assert result.success
    _BUILT["built"] = BuiltPipeline(repo, tracking_uri, dagster_home, result)
    return _BUILT["built"]
