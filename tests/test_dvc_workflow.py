"""The re-merge without Dagster: `dvc repro && dmm register`, DVC experiments, metrics, plots.

Runs on a copy of the project the pipeline tests built (the miniature zoo),
made a git repository so that `dvc exp` and `dvc metrics diff` have commits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline_support import BIN, DISTILL_SETTINGS, EVALUATE_SETTINGS, LENIENT_GATE, tool_env

pytestmark = pytest.mark.timeout(1500)
TEACHERS = ["pastel", "neon", "sepia", "blueprint", "stripes"]


def sh(cmd: list[str], repo: Path, ok: bool = True, uri: str = "") -> subprocess.CompletedProcess:
    env = tool_env(MLFLOW_TRACKING_URI=uri) if uri else tool_env()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def project(built, tmp_path_factory):
    """The built project as a git + DVC repository whose params.yaml holds the miniature run."""
    root = tmp_path_factory.mktemp("dvcflow")
    repo = root / "repo"
    shutil.copytree(built.repo, repo, symlinks=True)
    shutil.copytree(built.repo.parent / "remote", root / "remote")
    shutil.copy(built.repo.parent / "mlflow.db", root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    sh([str(BIN / "dvc"), "remote", "modify", "local", "url", str(root / "remote")], repo)
    # What the Dagster run asked for goes into params.yaml: the CLI needs no request.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["distill"].update(DISTILL_SETTINGS)
    params["evaluate"].update(EVALUATE_SETTINGS)
    params["registry"]["gate"].update(LENIENT_GATE)
    # Incremental merges read registry.incremental on top of distill: keep them miniature too.
    params["registry"]["incremental"].update(steps=2, old_style_samples=8)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "data/plan/request.json").write_text("{}\n")
    # Git holds the code and the configs; DVC the data (as in the project's own .gitignore).
    (repo / ".gitignore").write_text(
        "/data/*\n!/data/teachers.yaml\n!/data/plan/\n/data/plan/*\n!/data/plan/request.json\n"
        "/.dvc/tmp\n/.dvc/cache\n"
    )
    sh([str(BIN / "dvc"), "config", "--unset", "core.no_scm"], repo)
    sh(["git", "init", "-q"], repo)
    sh(["git", "config", "user.email", "ci@example.org"], repo)
    sh(["git", "config", "user.name", "ci"], repo)
    sh([str(BIN / "dvc"), "config", "core.analytics", "false"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "miniature project"], repo)
    sh([str(BIN / "dvc"), "repro"], repo, uri=uri)
    sh([str(BIN / "dmm"), "register"], repo, uri=uri)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "the miniature run"], repo)
    return repo, uri


def dvc(repo: Path, uri: str, *args: str, ok: bool = True):
    return sh([str(BIN / "dvc"), *args], repo, ok=ok, uri=uri)


def test_after_repro_and_register_dvc_status_is_clean(project):
    repo, uri = project
    assert json.loads(dvc(repo, uri, "status", "--json").stdout) == {}
    metrics = json.loads(dvc(repo, uri, "metrics", "show", "--json").stdout)
    (figures,) = [m["data"]["data/evaluation/metrics.json"]["data"] for m in metrics.values()]
    assert figures["fid_t_ratio"] > 0 and set(figures["style_accuracy"]) == set(TEACHERS)


def test_an_experiment_trains_and_evaluates_a_variant(project):
    repo, uri = project
    # --temp: the variant runs in a copy, so the workspace keeps the committed run.
    dvc(repo, uri, "exp", "run", "--temp", "-n", "lr3e-4",
        "-S", "distill.steps=3", "-S", "distill.lr=3e-4")  # fmt: skip
    table = json.loads(dvc(repo, uri, "exp", "show", "--json").stdout)
    ratios = {}
    for commit in table:
        for exp in [commit, *(e for ex in commit.get("experiments") or [] for e in ex["revs"])]:
            data = exp.get("data") or {}
            metrics = (data.get("metrics") or {}).get("data/evaluation/metrics.json", {})
            if metrics.get("data"):
                ratios[exp.get("name") or data.get("rev")] = metrics["data"]["fid_t_ratio"]
    assert "lr3e-4" in ratios and len(ratios) >= 2, ratios
    diff = json.loads(dvc(repo, uri, "metrics", "diff", "HEAD", "lr3e-4", "--json").stdout)
    assert "fid_t_ratio" in diff["data/evaluation/metrics.json"]


def test_plots_show_renders_losses_and_the_fd_matrix(project, tmp_path):
    repo, uri = project
    dvc(repo, uri, "plots", "show", "--json", "-o", str(tmp_path / "plots"))
    shown = dvc(repo, uri, "plots", "show", "--json").stdout
    assert "data/student/metrics.jsonl" in shown and "data/evaluation/M.png" in shown


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "setting, message",
    [("distill.lr=-1", "distill.lr: Input should be greater than 0"),
     # DVC refuses a key params.yaml lacks unless asked to add it (+KEY): then the plan does.
     ("+distill.bogus=1", "distill.bogus: Extra inputs are not permitted")],
)  # fmt: skip
def test_an_invalid_experiment_fails_in_the_plan_stage_with_one_line(project, setting, message):
    repo, uri = project
    before = (repo / "dvc.lock").read_text()
    proc = dvc(repo, uri, "exp", "run", "--temp", "-S", setting, ok=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert (repo / "dvc.lock").read_text() == before


@pytest.mark.bad_input
def test_register_refuses_a_student_with_no_evaluation(project, tmp_path):
    repo, uri = project
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    (copy / "data/evaluation/evaluated.json").unlink()
    proc = sh([str(BIN / "dmm"), "register"], copy, ok=False, uri=uri)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "has no evaluation" in proc.stderr


def test_a_new_teacher_merges_incrementally_without_dagster(project, tmp_path):
    """The documented commands after a manifest change: an incremental merge from the champion."""
    from mlflow import MlflowClient
    from tests.pipeline_support import MODEL_NAME

    repo, uri = project
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = str(client.get_model_version_by_alias(MODEL_NAME, "champion").version)
    manifest = repo / "data" / "teachers.yaml"
    manifest.write_text(manifest.read_text() + '  - {name: pastel2, source: "zoo:pastel"}\n')
    dvc(repo, uri, "repro")  # teachers, samples, then the plan stage: incremental
    from_cli = json.loads((repo / "data/plan/merge_plan.json").read_text())
    assert from_cli["kind"] == "incremental" and from_cli["trained"] == ["pastel2"]
    dry = sh([str(BIN / "dmm"), "plan", "--dry-run"], repo, uri=uri).stdout
    assert dry.startswith("plan: incremental (add pastel2 on top of champion v")
    # The code location's plan of the same state, in a process that never imports torch.
    code = (
        "import json, sys\n"
        "from pipelines.defs.resources import MlflowResource, ProjectResource\n"
        f"p = ProjectResource(repo_root={str(repo)!r})\n"
        f"plan, recipe, evaluate = p.plan(MlflowResource(project=p, tracking_uri={uri!r}).client())\n"
        "assert 'torch' not in sys.modules\n"
        "print(plan.to_json())\n"
    )
    asset = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                           env=tool_env(), capture_output=True, text=True)  # fmt: skip
    assert asset.returncode == 0, asset.stderr
    assert json.loads(asset.stdout[asset.stdout.index("{") :]) == from_cli
    # A refused candidate: challenger, the champion's working copy untouched, its run ended.
    from dmm.hashing import folder_sha256

    working_copy = folder_sha256(repo / "data/champion")
    refused = sh([str(BIN / "dmm"), "register", "--set", "max_independent_ratio=1e-9"], repo,
                 ok=False, uri=uri)  # fmt: skip
    assert refused.returncode == 1 and "gate: FAILED" in refused.stdout
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == parent
    assert folder_sha256(repo / "data/champion") == working_copy
    run_id = json.loads((repo / "data/student/mlflow_run.json").read_text())["run_id"]
    ended = client.get_run(run_id)
    assert ended.info.status == "FINISHED" and ended.data.tags["dmm.gate"] == "failed"
    registered = sh([str(BIN / "dmm"), "register"], repo, uri=uri)
    assert "gate: passed" in registered.stdout
    assert folder_sha256(repo / "data/champion") != working_copy
    new = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(new.version) != parent
    assert new.tags["dmm.merge_kind"] == "incremental"
    assert new.tags["dmm.parent_version"] == parent
    assert new.tags["dmm.teachers"] == ",".join([*TEACHERS, "pastel2"])
    assert json.loads(dvc(repo, uri, "status", "--json").stdout) == {}
