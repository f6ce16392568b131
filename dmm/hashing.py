"""Content hashes: one helper per meaning, torch-free.

- :func:`sha256_file`: a file's bytes.
- :func:`weights_sha256`: a model component's weights (its default weights
  file; sharded weights hash their sorted "name sha256" lines).
- :func:`unet_sha256`: a pipeline folder's UNet weights, what "the UNet's
  hash" means everywhere (teacher records, the base hash of a student's
  lineage, the plan).
- :func:`folder_sha256`: every file of a folder (a student), by relative path.
- :func:`fingerprint`: a JSON-able description of what an output depends on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dmm.atomic import DmmError

CHUNK = 1 << 20


def sha256_file(path: Path | str, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _weight_files(component_dir: Path, ext: str) -> list[Path]:
    files = sorted(component_dir.glob(f"*.{ext}"))
    # Variants ("model.fp16.safetensors") sit beside the default weights,
    # which are the ones from_pretrained loads without a variant argument.
    default = [f for f in files if f.name.count(".") == 1]
    return default or files


def weights_sha256(component_dir: Path) -> str:
    """sha256 of a component's weights file.

    With one *.safetensors file this is that file's sha256. Sharded (or
    .bin-only) weights hash the sorted "name sha256" lines of their files.
    """
    component_dir = Path(component_dir)
    files = _weight_files(component_dir, "safetensors") or _weight_files(component_dir, "bin")
    if not files:
        raise DmmError(f"no weights (*.safetensors or *.bin) in {component_dir}")
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def unet_sha256(pipeline_dir: Path) -> str:
    return weights_sha256(Path(pipeline_dir) / "unet")


def folder_sha256(folder: Path) -> str:
    """sha256 over the relative paths and contents of every file in ``folder``.

    Hidden files (leftovers of interrupted atomic writes) are not part of it.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        digest.update(f"{rel}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def fingerprint(payload: Any) -> str:
    """sha256 of a JSON-able description of everything an output depends on."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def source_hash(*folders: Path) -> str:
    """sha256 of the .py files under ``folders`` (a code change invalidates a fingerprint)."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
