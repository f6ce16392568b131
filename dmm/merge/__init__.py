"""Static merging baselines (weighted, task arithmetic, TIES, DARE) for UNets.

Names are imported lazily so that ``dmm merge --help`` and the CLI's import of
``dmm.merge.cli`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "METHODS": "dmm.merge.methods",
    "merge_tensor": "dmm.merge.methods",
    "generalized_task_arithmetic": "dmm.merge.methods",
    "MergeConfig": "dmm.merge.config",
    "MergeError": "dmm.merge.stream",
    "merge_files": "dmm.merge.stream",
    "merge_unets": "dmm.merge.stream",
    "read_merge_metadata": "dmm.merge.stream",
    "merge_files_mecha": "dmm.merge.mecha",
    "mecha_available": "dmm.merge.mecha",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dmm.merge' has no attribute {name!r}")
