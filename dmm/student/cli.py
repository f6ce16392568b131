"""``dmm export``: a student folder as one LDM-layout .safetensors file.

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
    out: Annotated[Path, typer.Option(help="Output .safetensors file.")] = Path(
        "data/student/student.safetensors"
    ),
    dtype: Annotated[
        str | None,
        typer.Option(help="fp32, fp16 or bf16; default keeps the stored dtype (exact round trip)."),
    ] = None,
) -> None:
    """Export a student as a single file: UNet + style MLP + codebook + text encoder + VAE."""
    from dmm.atomic import DmmError

    try:
        from dmm.student.export import export_single_file

        info = export_single_file(student, out, dtype=dtype)
    except DmmError as exc:
        typer.echo(f"error: {str(exc).splitlines()[0] if str(exc) else 'failed'}", err=True)
        raise typer.Exit(2) from None
    styles = ", ".join(info["style_names"]) or "none (a plain pipeline)"
    size = out.stat().st_size / 1e6
    typer.echo(f"exported: {out} ({size:.1f} MB; styles: {styles}; VAE: {info['vae']})")
