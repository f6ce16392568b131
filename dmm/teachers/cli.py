"""``dmm teachers ...``: check and materialize the teachers of ``data/teachers.yaml``.

Registered in the main CLI with ``app.add_typer(teachers_app, name="teachers")``.
Importing this module does not import torch.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

teachers_app = typer.Typer(
    help="Teachers from data/teachers.yaml: check them against the base, or write them out.",
    no_args_is_help=True,
)

ManifestOpt = Annotated[Path, typer.Option(help="The teacher manifest.")]
ZooOpt = Annotated[Path, typer.Option(help="The toy zoo, for zoo: sources.")]
RootOpt = Annotated[
    Path, typer.Option(help="Project root: local sources must lie inside it (symlinks followed).")
]
OnlyOpt = Annotated[list[str] | None, typer.Option(help="Only these teachers (repeatable).")]


def _one_line(fn):
    """Expected failures print one line and exit 2; teacher failures are rows, not this."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        from dmm.atomic import DmmError

        try:
            return fn(*args, **kwargs)
        except DmmError as exc:
            typer.echo(f"error: {str(exc).splitlines()[0] if str(exc) else 'failed'}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _quiet() -> None:
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def _entries(manifest: Any, path: Path, only: list[str] | None) -> list[Any]:
    """The teachers to work on; an empty manifest is an error, not a silent success."""
    from dmm.atomic import DmmError

    if not manifest.teachers:
        raise DmmError(f"{path}: no teachers listed under 'teachers'")
    if not only:
        return list(manifest.teachers)
    return [manifest.get(name) for name in only]


def format_table(rows: list[dict[str, str]]) -> str:
    """A plain-text table; the detail column is last and never truncated."""
    cols = [
        ("name", "NAME"),
        ("kind", "SOURCE"),
        ("status", "STATUS"),
        ("text_encoder", "TEXT ENCODER TUNED"),
        ("detail", "DETAIL"),
    ]
    widths = {k: max(len(title), *(len(r[k]) for r in rows)) for k, title in cols[:-1]}
    lines = ["  ".join(title.ljust(widths.get(k, 0)) for k, title in cols).rstrip()]
    for r in rows:
        lines.append("  ".join(r[k].ljust(widths.get(k, 0)) for k, _ in cols).rstrip())
    return "\n".join(lines)


@teachers_app.command("check")
@_one_line
def check_command(
    manifest: ManifestOpt = Path("data/teachers.yaml"),
    zoo: ZooOpt = Path("data/zoo"),
    root: RootOpt = Path("."),
    only: OnlyOpt = None,
) -> None:
    """Validate every teacher against the base; prints a table, exits 1 if any fails."""
    from dmm.atomic import DmmError
    from dmm.teachers.manifest import load_manifest

    m = load_manifest(manifest, repo_root=root)
    entries = _entries(m, manifest, only)
    _quiet()
    from dmm.teachers.sources import prepare_teacher, resolve_base, validate_prepared
    from dmm.teachers.validate import describe

    rows = []
    with tempfile.TemporaryDirectory(prefix="dmm-teachers-check-") as scratch:
        base_dir = resolve_base(m.base, zoo_dir=zoo, repo_root=root, work_dir=Path(scratch) / "b")
        for entry in entries:
            row = {"name": entry.name, "kind": entry.kind, "text_encoder": "-"}
            try:
                folder, where, _ = prepare_teacher(
                    entry, base_dir, Path(scratch) / entry.name, zoo_dir=zoo, repo_root=root
                )
                facts = validate_prepared(folder, base_dir, entry.name, where)
            except DmmError as exc:
                row.update(status="FAIL", detail=str(exc).splitlines()[0])
            else:
                row.update(
                    status="ok",
                    text_encoder="yes" if facts["trained_text_encoder"] else "no",
                    detail=describe(facts),
                )
            rows.append(row)
    typer.echo(f"base: {m.base} ({base_dir})")
    typer.echo(format_table(rows))
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    if failed:
        typer.echo(f"{len(failed)} of {len(rows)} teachers failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


@teachers_app.command("materialize")
@_one_line
def materialize_command(
    manifest: ManifestOpt = Path("data/teachers.yaml"),
    zoo: ZooOpt = Path("data/zoo"),
    root: RootOpt = Path("."),
    out: Annotated[Path, typer.Option(help="One pipeline folder per teacher goes here.")] = Path(
        "data/teachers"
    ),
    only: OnlyOpt = None,
) -> None:
    """Write each teacher as a checked diffusers folder OUT/<name> (atomically)."""
    from dmm.atomic import DmmError
    from dmm.teachers.manifest import load_manifest

    m = load_manifest(manifest, repo_root=root)
    entries = _entries(m, manifest, only)
    _quiet()
    from dmm.teachers.sources import materialize_teacher, resolve_base

    failed = []
    base_dir = resolve_base(m.base, zoo_dir=zoo, repo_root=root, work_dir=out / ".base")
    for entry in entries:
        try:
            meta = materialize_teacher(
                entry, base_dir, out / entry.name, zoo_dir=zoo, repo_root=root
            )
        except DmmError as exc:
            failed.append(entry.name)
            typer.echo(f"{entry.name}: FAIL {str(exc).splitlines()[0]}", err=True)
            continue
        tuned = "tuned" if meta["trained_text_encoder"] else "base"
        typer.echo(
            f"{entry.name}: {meta['path']} (unet {meta['sha256'][:12]}, text encoder {tuned})"
        )
    if failed:
        raise typer.Exit(1)
