"""Asset metadata helpers: Markdown tables, inline PNG previews, DVC hashes, fingerprints."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

# Metadata lives in the event log; a preview above this size is linked, not inlined.
MAX_INLINE_PNG_BYTES = 400_000


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def png_preview(path: Path, caption: str) -> dg.MetadataValue:
    data = Path(path).read_bytes()
    if len(data) > MAX_INLINE_PNG_BYTES:
        return dg.MetadataValue.md(f"{caption}: {path} ({len(data) // 1000} kB, not inlined)")
    encoded = base64.b64encode(data).decode("ascii")
    return dg.MetadataValue.md(f"**{caption}**\n\n![{caption}](data:image/png;base64,{encoded})")


def dvc_metadata(hashes: Mapping[str, str]) -> dict[str, dg.MetadataValue]:
    return {f"dvc_md5 {path}": dg.MetadataValue.text(md5) for path, md5 in hashes.items()}


def fingerprint(payload: Any) -> str:
    """sha256 of a JSON-able description of everything an output depends on."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def unet_sha256(pipeline_dir: Path) -> str:
    """sha256 of a pipeline folder's UNet weight file(s), without importing torch."""
    digest = hashlib.sha256()
    for path in sorted((Path(pipeline_dir) / "unet").glob("*.safetensors")):
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def dmm_source(repo_root: Path, subpackage: str) -> Path:
    """The source of ``dmm.<subpackage>`` in the checkout (as DVC's deps see it), else as installed."""
    in_checkout = Path(repo_root) / "dmm" / subpackage
    if in_checkout.is_dir():
        return in_checkout
    import dmm

    return Path(dmm.__file__).parent / subpackage


def source_hash(*folders: Path) -> str:
    """sha256 of the .py files under ``folders``: a code change invalidates memoized outputs."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def fid_table(results: dict) -> str:
    rows = [
        (
            name,
            results["M"][i][i],
            results["M_ref"][i],
            results["style_accuracy"][name],
            results["teacher_accuracy"][name],
        )
        for i, name in enumerate(results["styles"])
    ]
    rows.append(("**FD_t (sum)**", results["fid_t"], results["fid_t_ref"], "", ""))
    table = md_table(
        ["style", "M(i,i)", "M_ref(i,i)", "student style acc.", "teacher style acc."], rows
    )
    base_rows = [
        (b, v["fid_t"], v["fid_t_ratio"], v["mean_style_accuracy"])
        for b, v in (results.get("baselines") or {}).items()
    ]
    head = (
        f"FD_t ({results['feature_extractor']} features) = {results['fid_t']:.4g}, "
        f"reference {results['fid_t_ref']:.4g}, **ratio {results['fid_t_ratio']:.3f}**\n\n"
    )
    out = head + table
    if base_rows:
        out += "\n\n**Static baselines**\n\n" + md_table(
            ["method", "FD_t", "ratio", "mean style acc."],
            [(b, f, r, a) for b, f, r, a in base_rows],
        )
    return out
