"""The ``dmm`` command line: one subcommand per pipeline stage."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Merge text-to-image models by distillation (DMM).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
zoo_app = typer.Typer(help="The embedded toy teacher zoo.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

log = logging.getLogger("dmm")


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()


def one_line_errors(fn):
    """Turn expected failures into a one-line message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        from dmm.atomic import DmmError

        try:
            return fn(*args, **kwargs)
        except ValidationError as exc:
            parts = [
                f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}"
                for e in exc.errors()
            ]
            typer.echo(f"error: invalid {exc.title} config: {'; '.join(parts)}", err=True)
        except (DmmError, ValueError, FileNotFoundError) as exc:
            typer.echo(
                f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True
            )
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            typer.echo(f"error: {exc.strerror or exc}{where}", err=True)
        raise typer.Exit(2)

    return wrapper


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@zoo_app.command("build")
@one_line_errors
def zoo_build(
    out: Annotated[Path, typer.Option(help="Where the zoo is written.")] = Path("data/zoo"),
    config: Annotated[
        Path | None, typer.Option(help="YAML file; its `zoo:` section is read if present.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Override the config's seed.")] = None,
    miniature: Annotated[bool, typer.Option(help="A seconds-long zoo for tests.")] = False,
    force: Annotated[bool, typer.Option(help="Rebuild even if up to date.")] = False,
) -> None:
    """Build the toy zoo (base + style teachers + style classifier), or reuse it."""
    import yaml

    from dmm.config import load_config
    from dmm.zoo.config import ZooConfig

    section = None
    if config is not None and config.exists():
        raw = yaml.safe_load(config.read_text()) or {}
        section = "zoo" if isinstance(raw, dict) and "zoo" in raw else None
    cfg = load_config(ZooConfig, config, section, seed=seed)
    if miniature:
        cfg = ZooConfig.miniature(**cfg.model_dump(exclude_defaults=True))
    _quiet_libraries()
    from dmm.zoo.build import build_zoo, check_output_dir

    check_output_dir(out)
    manifest = build_zoo(out, cfg, force=force)
    m = manifest["metrics"]
    typer.echo(f"zoo: {out.resolve()}")
    typer.echo(f"  teachers: {', '.join(manifest['teachers'])}")
    typer.echo(f"  style classifier held-out accuracy: {m['classifier_accuracy']:.3f}")
    cap = m["caption_following"]
    for split in ("train_captions", "held_out_captions"):
        b = cap[split]["base"]
        typer.echo(
            f"  base {split}: shape {b['shape']:.2f} colour {b['colour']:.2f} "
            f"position {b['position']:.2f} all {b['all']:.2f}"
        )
    typer.echo(
        f"  size: {manifest['total_bytes'] / 1e6:.1f} MB, built in {manifest['timings_s']['total']:.0f}s"
    )


@app.command("distill")
@one_line_errors
def distill_cmd(
    config: Annotated[
        Path | None, typer.Option(help="YAML config (its `distill:` section if present).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override, e.g. --set steps=100 --set losses.feature=0"),
    ] = None,
    resume: Annotated[str | None, typer.Option(help='"latest" or a checkpoint directory.')] = None,
) -> None:
    """Distill every teacher into one style-promptable student (runs under accelerate launch too)."""
    from dmm.config import load_stage_config
    from dmm.distill.config import DistillConfig

    overrides = list(set_ or [])
    if resume is not None:
        overrides.append(f"resume={resume}")
    cfg = load_stage_config(DistillConfig, config, "distill", overrides)
    _quiet_libraries()
    from dmm.distill.trainer import distill

    final = distill(cfg)
    typer.echo(f"student: {final}")


if __name__ == "__main__":
    sys.exit(app())
