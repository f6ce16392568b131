"""Edits of a student folder that need no training: retiring styles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dmm.atomic import DmmError, atomic_dir
from dmm.names import LINEAGE_FILE as LINEAGE


def retire_styles(student_dir: Path, names: list[str], out_dir: Path) -> Path:
    """Copy a student folder without ``names``; every other style is bit-identical."""
    from dmm.student.codebook import StyleCodebook

    student_dir, out_dir = Path(student_dir), Path(out_dir)
    book_dir = student_dir / "style_codebook"
    if not book_dir.is_dir():
        raise DmmError(f"not a student pipeline folder (no style_codebook): {student_dir}")
    if student_dir.resolve() == out_dir.resolve():
        raise DmmError("retire writes a new folder; --out must differ from the student folder")
    book = StyleCodebook.from_pretrained(book_dir)
    unknown = sorted(set(names) - set(book.style_names))
    if unknown:
        raise DmmError(
            f"cannot retire unknown styles: {', '.join(unknown)}; known styles: {', '.join(book.style_names)}"
        )
    try:
        kept = book.drop_styles(names)
    except ValueError as exc:
        raise DmmError(str(exc)) from exc
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(student_dir, tmp, dirs_exist_ok=True)
        shutil.rmtree(tmp / "style_codebook")
        kept.save_pretrained(tmp / "style_codebook")
        if (tmp / "README.md").is_file():  # the card lists the styles
            from dmm.student.card import model_card

            (tmp / "README.md").write_text(model_card(styles=kept.style_names))
        lineage_file = tmp / LINEAGE
        lineage = json.loads(lineage_file.read_text()) if lineage_file.is_file() else {}
        lineage.update(
            {
                "styles": kept.style_names,
                "retired": sorted(set(lineage.get("retired", [])) | set(names)),
                "parent": str(student_dir),
            }
        )
        lineage_file.write_text(json.dumps(lineage, indent=2))
    return out_dir
