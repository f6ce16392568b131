"""Crash-safe training checkpoints.

A checkpoint is written into a hidden temporary directory, sealed with a
``complete.json`` that lists every file and its size, and only then renamed to
``checkpoint-<step>``. A directory without a valid seal (a kill during the
write) is never loaded. The seal also records the fingerprint of the run's
config (``DistillConfig.fingerprint``): a run resumes only from a checkpoint
of its own config, and ``latest`` means the newest sealed one of that config.
Checkpoints sealed without a fingerprint count as another config's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from dmm.atomic import DmmError

log = logging.getLogger(__name__)

SEAL = "complete.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def seal(directory: Path, step: int, fingerprint: str | None = None) -> None:
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
    tmp = directory / (SEAL + ".tmp")
    tmp.write_text(json.dumps({"step": step, "files": files, "fingerprint": fingerprint}))
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


def fingerprint_of(directory: Path) -> str | None:
    """The config fingerprint a sealed checkpoint was written under (None if it has none)."""
    try:
        return json.loads((directory / SEAL).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def list_checkpoints(root: Path, fingerprint: str | None = None) -> list[tuple[int, Path]]:
    """Sealed checkpoints under ``root`` (of that config only, if given), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if m and d.is_dir():
            if is_sealed(d):
                if fingerprint is None or fingerprint_of(d) == fingerprint:
                    found.append((int(m.group(1)), d))
            else:
                log.warning("skipping torn checkpoint %s", d)
    return sorted(found)


def resolve_resume(root: Path, resume: str | None, fingerprint: str) -> Path | None:
    """The checkpoint to resume from, of the config ``fingerprint`` only; None: start fresh."""
    if resume is None:
        return None
    if resume in ("latest", "auto"):
        mine = list_checkpoints(root, fingerprint)
        if mine:
            return mine[-1][1]
        others = list_checkpoints(root)
        why = f"{len(others)} of other configs" if others else "none at all"
        if others and resume == "latest":
            raise DmmError(
                f"no checkpoint of this config under {root} ({why}); "
                "resume 'auto' starts fresh instead"
            )
        log.warning("starting fresh: no checkpoint of this config under %s (%s)", root, why)
        return None
    path = Path(resume)
    if not path.is_dir():
        raise DmmError(f"checkpoint to resume from not found: {path}")
    if not is_sealed(path):
        raise DmmError(f"checkpoint {path} is incomplete (no valid {SEAL}); refusing to load it")
    theirs = fingerprint_of(path)
    if theirs != fingerprint:
        raise DmmError(
            f"checkpoint {path} is of another config (fingerprint {(theirs or 'none')[:12]}, "
            f"this run {fingerprint[:12]}); refusing to load it"
        )
    return path


def tmp_dir_for(root: Path, step: int) -> Path:
    return root / f".tmp-checkpoint-{step}"


def finalize(root: Path, step: int, limit: int | None, fingerprint: str) -> Path:
    """Seal the temporary checkpoint of ``step``, publish it, prune old ones.

    Checkpoints of other configs go: this run's output folder is now its own,
    and no run of this config could resume from them.
    """
    tmp = tmp_dir_for(root, step)
    seal(tmp, step, fingerprint)
    final = root / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for leftover in root.glob(".tmp-checkpoint-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    mine = list_checkpoints(root, fingerprint)
    for _, other in sorted(set(list_checkpoints(root)) - set(mine)):
        log.info("removing %s, a checkpoint of another config", other)
        shutil.rmtree(other, ignore_errors=True)
    if limit is not None:
        for _, old in mine[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final
