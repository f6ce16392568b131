"""``dmm plan``, ``dmm baselines``, ``dmm register``: the re-merge without an orchestrator.

    dvc repro && dmm register      # plan, distill, baselines, evaluate; then register

``dvc repro`` runs ``dmm plan`` as its ``plan`` stage; the commands also run
by hand, from the project root. Importing this module does not import torch.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from dmm import layout

ROOT_HELP = "Project root (holds params.yaml and data/)."
# Extra `accelerate launch` arguments for the distill stage (e.g. "--num_processes 2
# --multi_gpu", or "--config_file cluster.yaml"); unset: one process, in place.
LAUNCH_ENV = "DMM_ACCELERATE_ARGS"


def tracking_client(root: Path):
    """An MlflowClient on MLFLOW_TRACKING_URI, else the project's sqlite store; checked reachable."""
    from dmm.registry.tracking import check_reachable, make_client, resolve_tracking_uri

    client = make_client(resolve_tracking_uri(root))
    check_reachable(client)
    return client


def plan_command(
    root: Annotated[Path, typer.Option(help=ROOT_HELP)] = Path("."),
    request: Annotated[
        Path | None,
        typer.Option(help=f"Merge request JSON (default: {layout.REQUEST}; missing = none)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the decision, write nothing.")] = False,
) -> None:
    """Decide the next merge (full, incremental from the champion, or unchanged) and write the plan."""
    from dmm.plan import make_plan, write_plan

    plan, recipe, evaluate = make_plan(root, tracking_client(root), request)
    if not dry_run:
        write_plan(root, plan, recipe, evaluate)
    typer.echo(f"plan: {plan.kind} ({plan.reason})")
    typer.echo(f"  styles: {', '.join(plan.styles)}; trains: {', '.join(plan.trained) or '-'}")
    if plan.parent_version:
        typer.echo(f"  parent: v{plan.parent_version} ({plan.parent_dir})")
    typer.echo(
        f"  fingerprint: {plan.fingerprint[:16]}" + ("" if dry_run else f" -> {layout.PLAN}")
    )


def baselines_command(
    root: Annotated[Path, typer.Option(help=ROOT_HELP)] = Path("."),
) -> None:
    """Static merges of the manifest's teachers, one per params.yaml `baselines.methods` entry."""
    for method, out in run_baselines(Path(root)):
        typer.echo(f"baseline {method}: {out}")


def run_baselines(root: Path) -> list[tuple[str, Path]]:
    """Merge the materialized teachers with every method params.yaml names, against the base."""
    from dmm.atomic import DmmError
    from dmm.merge import stream
    from dmm.merge.config import METHOD_NAMES
    from dmm.plan import gather_inputs

    root = Path(root).resolve()
    inputs = gather_inputs(root)
    methods = list((inputs.params.get("baselines") or {}).get("methods", []))
    unknown = sorted(set(methods) - set(METHOD_NAMES))
    if unknown:
        raise DmmError(f"unknown baselines.methods {unknown}; known: {', '.join(METHOD_NAMES)}")
    teachers = [root / layout.TEACHERS / n for n in inputs.teachers]
    done = []
    for method in methods:
        out = root / layout.BASELINES / method
        stream.merge_unets(root / inputs.base_dir, teachers, out, method)
        done.append((method, out))
    return done


def run_distill_plan(root: Path) -> Path:
    """The distill stage: train (or retire styles) exactly as the plan says."""
    from dmm.plan import check_parent, check_samples, read_params, read_plan, registry_config
    from dmm.registry import tracking
    from dmm.registry.workflow import open_merge_run

    root = Path(root).resolve()
    plan, recipe = read_plan(root)
    client = tracking_client(root)
    check_parent(root, plan, client, registry_config(read_params(root)).model_name)
    check_samples(root, recipe)
    student = root / layout.STUDENT / "student"
    run = open_merge_run(client, root, plan, recipe)
    try:
        if recipe["action"] == "retire":
            from dmm.student.edit import retire_styles

            return retire_styles(root / recipe["init_from"], recipe["retire"], student)
        env = {"MLFLOW_RUN_ID": run["run_id"], "MLFLOW_TRACKING_URI": client.tracking_uri}
        _launch(root, recipe["config"], env)
        return student
    except BaseException:
        tracking.finish_run(client, run["run_id"], ok=False)
        raise


# + host and pid of the writer: a killed writer's file is stale, and only its
# own host can tell (the folder may be on a filesystem several hosts share).
RUN_CONFIG_PREFIX = ".run-config-"


def _run_config_prefix() -> str:
    return f"{RUN_CONFIG_PREFIX}{socket.gethostname()}-{os.getpid()}-"


def _remove_stale_run_configs(out: Path) -> None:
    """Delete this host's run configs whose writing process is gone (a killed run cannot)."""
    from dmm.atomic import _pid_alive

    mine = f"{RUN_CONFIG_PREFIX}{socket.gethostname()}-"
    for path in out.glob(f"{mine}*.json"):
        pid = path.name[len(mine) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            path.unlink(missing_ok=True)


def _launch(root: Path, config: dict, env: dict[str, str]) -> None:
    """Run the trainer (through Dagster Pipes when Dagster launched us) in place or under accelerate."""
    from dmm.distill.config import DistillConfig

    # `auto`: resume from this very recipe's last sealed checkpoint, else start afresh.
    cfg = DistillConfig(**config, resume="auto", progress=sys.stderr.isatty())
    os.environ.update(env)
    out = root / layout.STUDENT
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_run_configs(out)
    prefix = _run_config_prefix()
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=out, prefix=prefix) as fh:
        fh.write(cfg.model_dump_json())
        fh.flush()
        args = shlex.split(os.environ.get(LAUNCH_ENV, ""))
        if not args:
            from dmm.distill.pipes_entry import main

            main(["--config", fh.name])
            return
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *args]
        cmd += ["-m", "dmm.distill.pipes_entry", "--config", fh.name]
        proc = subprocess.run(cmd, cwd=root)
        if proc.returncode != 0:
            from dmm.atomic import DmmError

            raise DmmError(f"distillation failed (accelerate launch exited {proc.returncode})")


def register_command(
    root: Annotated[Path, typer.Option(help=ROOT_HELP)] = Path("."),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Gate threshold override, e.g. --set max_fid_t_ratio=5"),
    ] = None,
) -> None:
    """Log the merge's evaluation, judge the gate, register the student; `champion` only if it passed.

    Exits 1 when the gate failed (the version is then the `challenger`).
    """
    from dmm.config import parse_overrides
    from dmm.registry.workflow import register_merge

    registered, passed, summary = register_merge(
        root, tracking_client(root), gate_overrides=parse_overrides(set_)
    )
    typer.echo(f"gate: {'passed' if passed else 'FAILED'} ({summary})")
    typer.echo(
        f"model: models:/{registered.name}/{registered.version} (alias {registered.alias}"
        f"{', reused' if registered.reused else ''})"
    )
    if not passed:
        raise typer.Exit(1)


def write_metrics(root: Path, results: dict, student: Path) -> Path:
    """The compact figures of an evaluation, for `dvc metrics` / `dvc exp show`."""
    from dmm.atomic import write_text_atomic
    from dmm.hashing import folder_sha256

    metrics = {
        "fid_t_ratio": results["fid_t_ratio"],
        "fid_t_independent_ratio": results.get("fid_t_independent_ratio"),
        "fid_t": results["fid_t"],
        "fid_t_ref": results["fid_t_ref"],
        "style_accuracy": results["style_accuracy"],
        "diagonal_fd": {n: results["M"][i][i] for i, n in enumerate(results["styles"])},
        "baselines": {b: v["fid_t_ratio"] for b, v in (results.get("baselines") or {}).items()},
    }
    path = Path(root) / layout.METRICS
    write_text_atomic(path, json.dumps(metrics, indent=2) + "\n")
    subject = {"student_sha256": folder_sha256(student)}
    write_text_atomic(Path(root) / layout.EVALUATED, json.dumps(subject, indent=2) + "\n")
    return path
