"""Crash-safe training checkpoints.

A checkpoint is written into a hidden temporary directory, sealed with a
``complete.json`` that lists every file and its size, and only then renamed to
``checkpoint-<step>``. A directory without a valid seal (a kill during the
write) is never loaded; ``latest`` means the newest sealed one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

SEAL = "complete.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def seal(directory: Path, step: int) -> None:
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
    tmp = directory / (SEAL + ".tmp")
    tmp.write_text(json.dumps({"step": step, "files": files}))
    os.replace(tmp, directory / SEAL)


def is_sealed(directory: Path) -> bool:
    try:
        meta = json.loads((directory / SEAL).read_text())
        return all(
            (directory / name).is_file() and (directory / name).stat().st_size == size
            for name, size in meta["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Sealed checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if m and d.is_dir():
            if is_sealed(d):
                found.append((int(m.group(1)), d))
            else:
                log.warning("skipping torn checkpoint %s", d)
    return sorted(found)


def resolve_resume(root: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
    if not is_sealed(path):
        raise ValueError(f"checkpoint {path} is incomplete (no valid {SEAL}); refusing to load it")
    return path


def tmp_dir_for(root: Path, step: int) -> Path:
    return root / f".tmp-checkpoint-{step}"


def finalize(root: Path, step: int, limit: int | None) -> Path:
    """Seal the temporary checkpoint of ``step``, publish it, prune old ones."""
    tmp = tmp_dir_for(root, step)
    seal(tmp, step)
    final = root / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for leftover in root.glob(".tmp-checkpoint-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if limit is not None:
        for _, old in list_checkpoints(root)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final
