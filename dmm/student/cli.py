"""``dmm export``: a student folder as one LDM-layout .safetensors file, or, with
``--style``, a plain SD1.5 model with that style (or mix) folded in.

Registered in the main CLI with ``app.command("export")(export_command)``.
Importing this module does not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export_command(
    student: Annotated[Path, typer.Option(help="Student pipeline folder.")] = Path(
        "data/student/student"
    ),
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output: a .safetensors file, or a folder for --format diffusers "
            "[default: data/student/student.safetensors, or data/student/student-STYLE]."
        ),
    ] = None,
    style: Annotated[
        str | None,
        typer.Option(
            help="Fold one style into a plain SD model: a name, an index, or JSON mix "
            'weights such as \'{"pastel": 0.3, "neon": 0.7}\'.'
        ),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="With --style: diffusers (a pipeline folder, the default) or single-file "
            "(LDM keys only).",
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="fp32, fp16 or bf16; default keeps the stored dtype (exact round trip)."),
    ] = None,
) -> None:
    """Export a student: one file with every style, or (--style) a plain SD1.5 model of one style."""
    from dmm.atomic import DmmError

    try:
        if style is None:
            if fmt is not None:
                raise DmmError("--format applies to --style exports only")
            from dmm.student.export import export_single_file

            out = out or Path("data/student/student.safetensors")
            info = export_single_file(student, out, dtype=dtype, progress=True)
            styles = ", ".join(info["style_names"]) or "none (a plain pipeline)"
            summary = f"styles: {styles}; VAE: {info['vae']}"
        else:
            from dmm.student.fold import export_style
            from dmm.student.generate import parse_style, style_label

            parsed = parse_style(style)
            fmt = fmt or "diffusers"
            out = out or Path(f"data/student/student-{style_label(parsed)}")
            export_style(student, out, parsed, fmt=fmt, dtype=dtype, progress=True)
            summary = f"style {style_label(parsed)} folded in; {fmt}, {dtype or 'fp32'}"
    except DmmError as exc:
        typer.echo(f"error: {str(exc).splitlines()[0] if str(exc) else 'failed'}", err=True)
        raise typer.Exit(2) from None
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else 0
    size = (size or out.stat().st_size) / 1e6
    typer.echo(f"exported: {out} ({size:.1f} MB; {summary})")
