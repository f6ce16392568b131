"""Teachers: the manifest that lists them, their sources, and their checks.

The manifest half imports no torch (a Dagster sensor reads it every tick);
materializing and validating are imported on first use.
"""

from __future__ import annotations

from dmm.teachers.manifest import (
    SourceKind,
    TeacherEntry,
    TeacherManifest,
    load_manifest,
    manifest_sha256,
    source_kind,
)

_LAZY = {
    "materialize_teacher": "dmm.teachers.sources",
    "prepare_teacher": "dmm.teachers.sources",
    "resolve_base": "dmm.teachers.sources",
    "validate_teacher": "dmm.teachers.validate",
    "check_teacher": "dmm.teachers.validate",
}

__all__ = [
    "SourceKind",
    "TeacherEntry",
    "TeacherManifest",
    "load_manifest",
    "manifest_sha256",
    "source_kind",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dmm.teachers' has no attribute {name!r}")
