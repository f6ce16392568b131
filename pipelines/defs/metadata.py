"""Asset metadata helpers: Markdown tables, inline PNG previews, DVC hashes, fingerprints."""

from __future__ import annotations

import base64
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


def student_metadata(root: Path, plan, losses: list[dict], ui_url: str) -> dict[str, Any]:
    """What merged_student shows: the plan, the last losses, the preview and the MLflow run."""
    from dmm import layout
    from dmm.registry.tracking import read_metrics_jsonl, read_run_file, run_url

    root = Path(root)
    losses = losses or read_metrics_jsonl(root / layout.STUDENT / "metrics.jsonl")
    last = losses[-1] if losses else {}
    rows = [(k, round(v, 4)) for k, v in last.items() if k.startswith(("loss/", "loss_score/"))]
    meta: dict[str, Any] = {
        "path": dg.MetadataValue.path(str(root / layout.STUDENT / "student")),
        "merge": dg.MetadataValue.md(
            md_table(
                ["kind", "reason", "parent", "styles", "trained"],
                [
                    (
                        plan.kind,
                        plan.reason,
                        plan.parent_version or "-",
                        ", ".join(plan.styles),
                        ", ".join(plan.trained) or "-",
                    )
                ],
            )
        ),  # fmt: skip
        "merge_kind": plan.merge_kind,
        "fingerprint": plan.fingerprint[:16],
        "final_losses": dg.MetadataValue.md(
            md_table(["loss", f"step {last.get('step', '?')}"], rows)
        ),
    }
    preview = root / layout.PREVIEW / "grid.png"
    if preview.is_file():
        meta["preview"] = png_preview(preview, f"one row per style: {', '.join(plan.styles)}")
    run = read_run_file(root / layout.STUDENT)
    if run:
        meta["mlflow_run"] = dg.MetadataValue.url(
            run_url(ui_url, run["experiment_id"], run["run_id"])
        )
    return meta


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
        (b, v["fid_t"], v["fid_t_ratio"], v.get("collapses_to", "-"))
        for b, v in (results.get("baselines") or {}).items()
    ]
    head = (
        f"FD_t ({results['feature_extractor']} features) = {results['fid_t']:.4g}, "
        f"reference {results['fid_t_ref']:.4g}, **ratio {results['fid_t_ratio']:.3f}**\n\n"
    )
    out = head + table
    if base_rows:
        out += "\n\n**Static baselines**\n\n" + md_table(
            ["method", "FD_t", "ratio", "collapses to"],
            [(b, f, r, a) for b, f, r, a in base_rows],
        )
    return out
