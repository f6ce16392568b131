"""``dmm merge``: static merging baselines from the command line.

The main CLI registers the command with one line,
``app.command("merge")(merge_command)``; ``merge_app`` runs it on its own (tests).
Importing this module does not import torch.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from dmm.merge.config import METHOD_NAMES, METHOD_PARAMS

# The CLI's choices are the method table's names (one list, in dmm.merge.config).
Method = Enum("Method", {name: name for name in METHOD_NAMES}, type=str)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _parse_numbers(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated numbers, got {text!r}") from None


def _progress(total: int):
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI), so errors stay one line.
    return tqdm(total=total, unit="key", desc="merge", leave=False, disable=None)


def _resolve_inputs(
    base: Path | None, teachers: list[Path], zoo: Path | None
) -> tuple[Path, list[Path]]:
    from dmm.atomic import DmmError

    if zoo is not None:
        if base is not None or teachers:
            raise DmmError("use either --zoo or --base/--teacher, not both")
        base = zoo / "base"
        if not base.is_dir():
            raise DmmError(f"{base} not found: --zoo needs DIR/base and DIR/teachers/*")
        tdir = zoo / "teachers"
        # Hidden folders are leftovers of interrupted atomic writes, not teachers.
        teachers = (
            sorted(p for p in tdir.iterdir() if p.is_dir() and not p.name.startswith("."))
            if tdir.is_dir()
            else []
        )
        if not teachers:
            raise DmmError(f"no teacher folders in {tdir}")
        return base, teachers
    if base is None:
        raise DmmError("give --base and at least one --teacher, or --zoo")
    if not teachers:
        raise DmmError("give at least one --teacher")
    return base, teachers


def merge_command(
    method: Annotated[Method, typer.Option(help="Merge method.")],
    out: Annotated[
        Path,
        typer.Option(help="Output: a .safetensors file, or a pipeline folder for pipeline inputs."),
    ],
    base: Annotated[
        Path | None,
        typer.Option(help="Base model: a .safetensors file or a diffusers pipeline folder."),
    ] = None,
    teacher: Annotated[
        list[Path] | None,
        typer.Option(
            "--teacher", metavar="PATH", help="A teacher (same kind as --base); repeat for each."
        ),
    ] = None,
    zoo: Annotated[
        Path | None, typer.Option(help="A zoo folder: merge DIR/base with every DIR/teachers/*.")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated teacher weights, normalised to sum 1. Default: uniform."
        ),
    ] = None,
    lam: Annotated[
        float | None, typer.Option(help="Scale of the merged delta. Default: 1.0.")
    ] = None,
    k: Annotated[
        float | None,
        typer.Option(help="TIES: fraction of delta entries kept, 0<k<=1. Default: 0.2."),
    ] = None,
    p: Annotated[
        float | None, typer.Option(help="DARE: drop probability, 0<=p<1. Default: 0.9.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="DARE: random seed. Default: 0.")] = None,
    only_prefix: Annotated[
        str | None,
        typer.Option(
            help="Files only: merge keys with this prefix (e.g. 'model.diffusion_model.'), "
            "copy the rest from the base."
        ),
    ] = None,
    block_weights: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated merge strength per UNet block (MBW): IN00..,M00,OUT.. "
            "(25 for SD1.5), optionally BASE first. 0 keeps the base's block. Default: 1.",
        ),
    ] = None,
) -> None:
    """Merge teachers into one model with a static method (UNet only for pipelines)."""
    from pydantic import ValidationError

    from dmm.atomic import DmmError

    try:
        summary = _run(
            method.value,
            out,
            base,
            teacher or [],
            zoo,
            weights,
            lam,
            k,
            p,
            seed,
            only_prefix,
            block_weights,
        )
    except ValidationError as exc:
        parts = [
            f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()
        ]
        raise _fail(f"invalid merge config: {'; '.join(parts)}") from None
    except (DmmError, ValueError, FileNotFoundError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _fail(text) from None
    except PermissionError as exc:
        raise _fail(f"permission denied: {exc.filename or exc}") from None
    except OSError as exc:  # disk full, read-only filesystem, ...: still one line
        raise _fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None
    typer.echo(
        f"merged {summary['merged']} tensors ({summary['copied']} copied from the base) "
        f"in {summary['seconds']:.1f}s: {summary['out']}"
    )
    typer.echo(f"  {method.value} {summary['record']['params']}")
    if summary["record"]["block_weights"] is not None:
        typer.echo(f"  block weights {summary['record']['block_weights']}")


def _run(
    method: str,
    out: Path,
    base: Path | None,
    teachers: list[Path],
    zoo: Path | None,
    weights: str | None,
    lam: float | None,
    k: float | None,
    p: float | None,
    seed: int | None,
    only_prefix: str | None,
    block_weights: str | None = None,
) -> dict[str, Any]:
    from dmm.atomic import DmmError

    given = {"lam": lam, "k": k, "p": p, "seed": seed}
    given = {name: v for name, v in given.items() if v is not None}
    unused = [name for name in given if name not in METHOD_PARAMS[method]]
    if unused:
        # A silently ignored option would make the output differ from what was asked.
        raise DmmError(f"--{unused[0]} is not used by --method {method}")
    params: dict[str, Any] = dict(given)
    if weights is not None:
        params["weights"] = _parse_numbers(weights, "--weights")
    if block_weights is not None:
        params["block_weights"] = _parse_numbers(block_weights, "--block-weights")
    base, teachers = _resolve_inputs(base, teachers, zoo)

    from dmm.merge import stream

    if not base.exists():
        raise DmmError(f"base not found: {base}")
    if base.is_dir():
        not_dirs = [t for t in teachers if not t.is_dir()]
        if not_dirs:
            raise DmmError(f"{not_dirs[0]} is not a pipeline folder, but --base is one")
        if only_prefix is not None:
            raise DmmError("--only-prefix applies to single files; pipelines merge the UNet only")
        return stream.merge_unets(base, teachers, out, method, progress=_progress, **params)
    dirs = [t for t in teachers if t.is_dir()]
    if dirs:
        raise DmmError(f"{dirs[0]} is a folder, but --base is a file")
    return stream.merge_files(
        base, teachers, out, method, only_prefix=only_prefix, progress=_progress, **params
    )


merge_app = typer.Typer(
    help="Static merging baselines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
merge_app.command("merge")(merge_command)
