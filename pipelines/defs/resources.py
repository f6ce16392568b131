"""Resources: the project checkout, DVC, MLflow and the compute used to distill.

Each is a ConfigurableResource whose methods never change its own fields; the
repository root comes from ``DMM_REPO_ROOT`` (tests point it at a scratch
copy) and defaults to this checkout.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import yaml
from pydantic import Field

from dmm import layout
from pipelines.defs.config import DistillSettings, EvaluateSettings, set_fields

CHECKOUT = Path(__file__).resolve().parents[2]


def default_repo_root() -> str:
    return os.environ.get("DMM_REPO_ROOT", str(CHECKOUT))


def tool_env() -> dict[str, str]:
    """The environment for dmm / dvc / accelerate subprocesses.

    The interpreter's own bin folder goes first on PATH, so ``dmm`` and
    ``python`` inside DVC stage commands are this environment's, however
    Dagster was started. Telemetry stays off in every child.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.lower().startswith(("error", "err:")):
            return line
    return lines[-1] if lines else "no output"


class ProjectResource(dg.ConfigurableResource):
    """The checkout the pipeline works in: params.yaml, the teacher manifest, data/."""

    repo_root: str = Field(default_factory=default_repo_root)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Every step uses the project: the run records its host once, so that
        # only this host judges whether the run's processes died (recovery.py).
        from pipelines.defs.recovery import tag_host

        tag_host(context.instance, context.run_id)

    @property
    def root(self) -> Path:
        return Path(self.repo_root).resolve()

    def path(self, relative: str) -> Path:
        return self.root / relative

    def params(self) -> dict[str, Any]:
        try:
            loaded = yaml.safe_load(self.path(layout.PARAMS).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise dg.Failure(description=f"cannot read {layout.PARAMS}: {exc}") from exc
        return loaded

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.params().get(name) or {})

    def manifest(self):
        """The validated teacher manifest; a Failure that says what is wrong otherwise."""
        from pydantic import ValidationError

        from dmm.atomic import DmmError
        from dmm.teachers.manifest import load_manifest

        path = self.path(layout.MANIFEST)
        try:
            return load_manifest(path, repo_root=self.root)
        except (DmmError, ValidationError, ValueError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise dg.Failure(
                description=f"invalid teacher manifest {layout.MANIFEST}: {first}"
            ) from exc

    def base_dir(self, manifest) -> Path:
        """The manifest's base pipeline folder (the zoo's base for ``zoo:base``)."""
        from dmm.atomic import DmmError
        from dmm.teachers.sources import resolve_base

        try:
            return resolve_base(
                manifest.base,
                zoo_dir=self.path(layout.ZOO),
                repo_root=self.root,
                work_dir=self.path(layout.TEACHERS) / ".base",
            )
        except DmmError as exc:
            raise dg.Failure(description=f"base {manifest.base!r}: {exc}") from exc

    def relative(self, path: Path) -> str:
        """``path`` relative to the checkout when inside it (configs stay portable)."""
        path = Path(path).resolve()
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def manifest_sha256(self) -> str:
        from dmm.teachers.manifest import manifest_sha256

        return manifest_sha256(self.path(layout.MANIFEST))

    def write_request(self, request) -> None:
        """The merge request the plan stage reads (rewritten only when it changes)."""
        from dmm.atomic import write_text_atomic

        path = self.path(layout.REQUEST)
        # Only what differs from params.yaml: a run that asks nothing writes `{}`.
        text = json.dumps(request.model_dump(exclude_defaults=True), indent=2) + "\n"
        if not (path.is_file() and path.read_text() == text):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, text)

    def plan(self, client):
        """The merge plan, computed in this process (dmm.plan: no torch)."""
        from dmm.atomic import DmmError
        from dmm.plan import make_plan

        try:
            return make_plan(self.root, client)
        except DmmError as exc:
            raise dg.Failure(description=str(exc)) from exc

    def run(
        self, context: dg.AssetExecutionContext, cmd: Sequence[str], what: str
    ) -> subprocess.CompletedProcess:
        """Run a command in the checkout, its output in the run log; a one-line Failure if it fails."""
        context.log.info("$ %s", " ".join(cmd))
        proc = subprocess.run(
            list(cmd), cwd=self.root, env=tool_env(), capture_output=True, text=True
        )
        for stream in (proc.stdout, proc.stderr):
            if stream.strip():
                context.log.debug(stream.strip()[-4000:])
        if proc.returncode != 0:
            raise dg.Failure(
                description=f"{what} failed: {_last_error_line(proc.stderr or proc.stdout)}",
                metadata={"command": " ".join(cmd), "output": (proc.stderr or proc.stdout)[-4000:]},
            )
        return proc


class DvcResource(dg.ConfigurableResource):
    """``dvc repro`` / ``dvc push`` in the checkout: DVC owns the data versions.

    DVC holds one lock per repository, so calls from parallel steps are
    serialized here as well as by the ``dvc`` pool.
    """

    project: ProjectResource
    push: bool = Field(True, description="push stage outputs to the default remote")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.project.path(".dvc/tmp/dagster-dvc.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def default_remote(self) -> tuple[str, str]:
        """(name, url) of the default remote; a Failure naming the fix when there is none."""
        from dvc.config import Config

        config = Config(self.project.path(".dvc"))
        name = config["core"].get("remote")
        remotes = config["remote"]
        if not name:
            raise dg.Failure(
                description="DVC has no default remote: add one with `dvc remote add -d NAME URL`"
            )
        if name not in remotes:
            raise dg.Failure(description=f"DVC default remote {name!r} is not defined")
        url = str(remotes[name]["url"])
        if "://" not in url:
            # A local remote: DVC creates the folder, but not missing parents
            # or a mount that is gone.
            local = Path(url) if Path(url).is_absolute() else self.project.path(".dvc") / url
            parent = local.resolve().parent
            if not parent.is_dir() or not os.access(parent, os.W_OK):
                raise dg.Failure(
                    description=f"DVC remote {name!r} is unreachable: {parent} is not a writable folder"
                )
        return name, url

    def repro(
        self, context: dg.AssetExecutionContext, stages: Sequence[str], force: bool = False
    ) -> None:
        """Reproduce ``stages`` (DVC skips those up to date) and push their outputs."""
        if self.push:
            self.default_remote()  # before any work, so a bad remote changes nothing
        with self._locked():
            if force:
                self._force(context, stages)
            self.project.run(context, ["dvc", "repro", *stages], f"dvc repro {' '.join(stages)}")
            self._push(context, stages)

    def _force(self, context: dg.AssetExecutionContext, stages: Sequence[str]) -> None:
        cmd = ["dvc", "repro", "--force", "--single-item", *stages]
        self.project.run(context, cmd, " ".join(cmd))

    def _push(self, context: dg.AssetExecutionContext, stages: Sequence[str]) -> None:
        if self.push:
            cmd = ["dvc", "push", "--quiet", *stages]
            self.project.run(context, cmd, f"dvc push {' '.join(stages)}")

    def repro_with_pipes(
        self,
        context: dg.AssetExecutionContext,
        stages: Sequence[str],
        client: dg.PipesSubprocessClient,
        env: dict[str, str],
        force: Sequence[str] = (),
    ):
        """``dvc repro`` whose stage commands report through Dagster Pipes (distillation)."""
        if self.push:
            self.default_remote()
        with self._locked():
            cmd = ["dvc", "repro", "--force", "--single-item", *force] if force else None
            for command in ([cmd] if cmd else []) + [["dvc", "repro", *stages]]:
                context.log.info("$ %s", " ".join(command))
                invocation = client.run(
                    context=context, command=command, cwd=str(self.project.root),
                    env={**tool_env(), **env},
                )  # fmt: skip
            self._push(context, stages)
        return invocation

    def lock(self) -> dict[str, Any]:
        path = self.project.path(layout.DVC_LOCK)
        if not path.is_file():
            return {}
        return (yaml.safe_load(path.read_text()) or {}).get("stages", {})

    def out_hashes(self, stage: str) -> dict[str, str]:
        """``{path: md5}`` of a stage's outputs as recorded in dvc.lock."""
        entry = self.lock().get(stage, {})
        return {o["path"]: o.get("md5", "") for o in entry.get("outs", [])}


class MlflowResource(dg.ConfigurableResource):
    """An explicit MlflowClient per call; the tracking URI is never set process-wide.

    ``tracking_uri`` unset: ``MLFLOW_TRACKING_URI``, else the checkout's
    ``mlflow/mlflow.db`` with artifacts under ``mlflow/artifacts``.
    """

    project: ProjectResource
    tracking_uri: str | None = None
    registry_uri: str | None = None
    ui_url: str = Field("http://127.0.0.1:5000", description="for links in asset metadata")

    def uri(self) -> str:
        from dmm.registry.tracking import resolve_tracking_uri

        return resolve_tracking_uri(self.project.root, self.tracking_uri)

    def client(self):
        from dmm.atomic import DmmError
        from dmm.registry.tracking import check_reachable, make_client

        client = make_client(self.uri(), self.registry_uri)
        try:
            check_reachable(client)
        except DmmError as exc:
            raise dg.Failure(description=str(exc)) from exc
        return client

    def env(self) -> dict[str, str]:
        """For the DVC stages this resource launches: the same tracking store."""
        return {"MLFLOW_TRACKING_URI": self.uri()}

    def run_url(self, run: dict) -> str:
        from dmm.registry.tracking import run_url

        return run_url(self.ui_url, run["experiment_id"], run["run_id"])

    def model_version_url(self, name: str, version: str) -> str:
        from dmm.registry.tracking import model_version_url

        return model_version_url(self.ui_url, name, version)


class MergeRequestResource(dg.ConfigurableResource):
    """What one run asks of the merge beyond params.yaml, set in the launchpad per run.

    One resource, read by both merged_student and evaluation, so a run writes one
    consistent request (data/plan/request.json) for the plan and the DVC stages.
    """

    distill: DistillSettings = Field(  # type: ignore[valid-type]
        default_factory=DistillSettings,
        description="DistillConfig settings; unset ones come from params.yaml",
    )
    evaluate: EvaluateSettings = Field(  # type: ignore[valid-type]
        default_factory=EvaluateSettings,
        description="EvaluateConfig settings; unset ones come from params.yaml",
    )
    full_merge: bool = Field(
        False,
        description="merge every teacher from the base, even where an incremental merge "
        "from the champion would do (params.yaml registry.merge sets the default)",
    )

    def request(self, compute: ComputeResource):
        from dmm.plan import MergeRequest

        distill = {**set_fields(self.distill)}
        if compute.mixed_precision != "no":
            distill["mixed_precision"] = compute.mixed_precision
        return MergeRequest(
            full_merge=self.full_merge, distill=distill, evaluate=set_fields(self.evaluate)
        )


class ComputeResource(dg.ConfigurableResource):
    """How distillation is launched: ``accelerate launch`` flags, or an Accelerate config file."""

    num_processes: int = Field(1, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    device: Literal["auto", "cpu"] = Field(
        "auto", description="cpu forces the CPU even where a GPU is visible"
    )
    accelerate_config: str | None = Field(
        None,
        description="an `accelerate config` YAML (multi-GPU, multi-node, FSDP, DeepSpeed); "
        "it then decides processes and precision",
    )

    def launch_args(self) -> list[str]:
        """``accelerate launch`` arguments; none for one process on this machine (runs in place)."""
        if self.accelerate_config:
            args = ["--config_file", self.accelerate_config]
        elif self.num_processes > 1 or self.device == "cpu":
            args = [
                "--num_processes", str(self.num_processes),
                "--num_machines", "1",
                "--mixed_precision", self.mixed_precision,
                "--dynamo_backend", "no",
            ]  # fmt: skip
            if self.num_processes > 1:
                args.append("--multi_gpu")
            if self.device == "cpu":
                args.append("--cpu")
        else:
            return []
        # Without this flag `accelerate launch` sets OMP_NUM_THREADS=1 on a machine
        # with no GPU (unless --cpu), and CPU distillation ran at half speed on 2 cores.
        return [*args, "--num_cpu_threads_per_process", str(self.cpu_threads())]

    def env(self) -> dict[str, str]:
        """What the distill stage reads to launch itself (dmm.workflow_cli.LAUNCH_ENV)."""
        from dmm.workflow_cli import LAUNCH_ENV

        args = self.launch_args()
        return {LAUNCH_ENV: shlex.join(args)} if args else {}

    def cpu_threads(self) -> int:
        """OMP_NUM_THREADS if set, else this machine's cores shared among the processes."""
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) > 0:
            return int(env)
        return max(1, (os.cpu_count() or 1) // self.num_processes)
