"""The evaluation report: PNG figures and a self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import torch


def _png(images01: torch.Tensor, path: Path, rows: int, scale: int = 3) -> None:
    from PIL import Image

    n, c, h, w = images01.shape
    cols = n // rows
    grid = images01[: rows * cols].reshape(rows, cols, c, h, w).permute(0, 3, 1, 4, 2)
    arr = (grid.reshape(rows * h, cols * w, c).clamp(0, 1) * 255).round().byte().numpy()
    img = Image.fromarray(arr)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def _heatmap(matrix, labels_rows, labels_cols, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.1 * len(labels_cols) + 2, 0.9 * len(labels_rows) + 1.5))
    im = ax.imshow(matrix, cmap="viridis_r")
    ax.set_xticks(range(len(labels_cols)), labels_cols, rotation=45, ha="right")
    ax.set_yticks(range(len(labels_rows)), labels_rows)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _loss_curves(metrics_file: Path, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_file or not Path(metrics_file).is_file():
        return False
    rows = [
        json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()
    ]
    if not rows:
        return False
    keys = sorted({k for r in rows for k in r if k.startswith("loss/")})
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_report(
    out: Path,
    results: dict,
    images: dict,
    strip: dict | None,
    gate=None,
    metrics_file: Path | None = None,
    columns: int = 8,
) -> None:
    teacher_imgs, student_imgs = images["teacher"], images["student"]
    baseline_imgs = images["baseline"]
    names = results["styles"]
    fe = results["feature_extractor"]
    figures: list[tuple[str, str]] = []
    _heatmap(
        results["M"], [f"student:{n}" for n in names], names, f"M(i, j) [{fe} FD]", out / "M.png"
    )
    figures.append(("M.png", "FD(student as style i, teacher j); the diagonal is FD_t's terms"))
    if results["baselines"]:
        rows = [b["M_row"] for b in results["baselines"].values()]
        _heatmap(
            rows,
            list(results["baselines"]),
            names,
            f"baselines vs teachers [{fe} FD]",
            out / "M_baselines.png",
        )
        figures.append(("M_baselines.png", "FD(baseline, teacher j)"))
    for n in names:
        parts = [teacher_imgs[n][:columns], student_imgs[n][:columns]]
        parts += [imgs[:columns] for imgs in baseline_imgs.values()]
        _png(torch.cat(parts), out / f"grid_{n}.png", rows=len(parts))
        labels = ", ".join(["teacher", "student", *baseline_imgs])
        figures.append((f"grid_{n}.png", f"style {n}: rows {labels}; same prompts and seeds"))
    if strip is not None:
        _png(torch.cat(strip["images"]), out / "interpolation.png", rows=len(strip["images"]))
        s = strip["summary"]
        figures.append(
            (
                "interpolation.png",
                f"{s['from']} -> {s['to']}, weights {', '.join(f'{w:.2f}' for w in s['weights'])}",
            )
        )
    if results.get("convergence"):
        from dmm.evaluation.studies import plot_convergence

        pts = [p for p in results["convergence"] if isinstance(p["step"], int)]
        if pts:
            plot_convergence(pts, out / "convergence.png")
            figures.append(("convergence.png", "FD_t / reference against distillation steps"))
    if metrics_file and _loss_curves(metrics_file, out / "losses.png"):
        figures.append(("losses.png", "distillation losses by step"))

    def table(rows: list[list], head: list[str]) -> str:
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        body = "".join(
            "<tr>"
            + "".join(
                f"<td>{html.escape(c if isinstance(c, str) else 'n/a' if c is None else f'{c:.4g}')}</td>"
                for c in r
            )
            + "</tr>"
            for r in rows
        )
        return f"<table><tr>{th}</tr>{body}</table>"

    per_style = [
        [
            n,
            results["M"][i][i],
            results["M_ref"][i],
            results["style_accuracy"][n],
            results["teacher_accuracy"][n],
        ]
        for i, n in enumerate(names)
    ]
    base_rows = [
        [b, v["fid_t"], v["fid_t_ratio"], v["mean_style_accuracy"]]
        for b, v in results["baselines"].items()
    ]
    imgs_html = "".join(
        f"<figure><img src='data:image/png;base64,{base64.b64encode((out / f).read_bytes()).decode()}'>"
        f"<figcaption>{html.escape(cap)}</figcaption></figure>"
        for f, cap in figures
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>DMM evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px}}img{{image-rendering:pixelated;max-width:100%}}</style></head><body>
<h1>DMM evaluation</h1>
<p>Distances are Frechet distances of <b>{html.escape(fe)}</b> features
({results["feature_dim"]} dims, {results["images_per_style"]} images per style){"" if fe.startswith("inception") else " — not FID"}.</p>
<p><b>FD_t</b> = {results["fid_t"]:.4g}, reference floor = {results["fid_t_ref"]:.4g},
<b>ratio = {results["fid_t_ratio"]:.3f}</b>; off-diagonal / diagonal = {results.get("separation") or float("nan"):.3g}</p>
<h2>Per style</h2>{table(per_style, ["style", "M(i,i)", "M_ref(i,i)", "student style acc.", "teacher style acc."])}
<h2>Static baselines</h2>{table(base_rows, ["method", "FD_t", "ratio", "mean style acc."]) if base_rows else "<p>none</p>"}
<h2>Figures</h2>{imgs_html}
<h2>Raw results</h2><pre>{html.escape(json.dumps({k: v for k, v in results.items() if k not in ("M",)}, indent=1))}</pre>
</body></html>"""
    (out / "report.html").write_text(page)
