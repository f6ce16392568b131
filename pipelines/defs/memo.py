"""Skip work whose inputs are unchanged, as DVC does for stages.

A ``.dagster-fingerprint.json`` beside an output records the fingerprint of the
inputs it was made from; it is written only after the output is complete.
"""

from __future__ import annotations

import json
from pathlib import Path

from dmm.atomic import write_text_atomic

MEMO_FILE = ".dagster-fingerprint.json"


def read_memo(folder: Path) -> dict:
    path = Path(folder) / MEMO_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def is_current(folder: Path, fingerprint: str, must_exist: Path) -> bool:
    return Path(must_exist).exists() and read_memo(folder).get("fingerprint") == fingerprint


def write_memo(folder: Path, fingerprint: str, **extra) -> None:
    write_text_atomic(
        Path(folder) / MEMO_FILE, json.dumps({"fingerprint": fingerprint, **extra}, indent=2)
    )
