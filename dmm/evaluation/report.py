"""The evaluation report: PNG figures and a self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
import textwrap
from pathlib import Path

import torch


def _grid(rows: dict[str, torch.Tensor], prompts: list[str], title: str, path: Path) -> None:
    """Images in rows (one per model, labelled), columns headed by their prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(v) for v in rows.values())
    fig, axes = plt.subplots(
        len(rows), cols, figsize=(1.25 * cols + 1.2, 1.3 * len(rows) + 0.9), squeeze=False
    )
    for r, (label, imgs) in enumerate(rows.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(imgs[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
            if r == 0 and c < len(prompts):
                ax.set_title(textwrap.fill(prompts[c], 18), fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _num(v: float | None) -> str:
    """Plain numbers: 1400, 12.3, 0.0412 (never 1.4e+03)."""
    if v is None or v != v:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _heatmap(matrix, labels_rows, labels_cols, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    values = [v for row in matrix for v in row if v > 0]
    norm = LogNorm(vmin=min(values), vmax=max(values)) if values else None
    fig, ax = plt.subplots(figsize=(1.2 * len(labels_cols) + 2.5, 0.9 * len(labels_rows) + 1.6))
    cmap = plt.get_cmap("viridis_r")
    im = ax.imshow([[max(v, 1e-12) for v in row] for row in matrix], cmap=cmap, norm=norm)
    ax.set_xticks(range(len(labels_cols)), labels_cols, rotation=45, ha="right")
    ax.set_yticks(range(len(labels_rows)), labels_rows)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            r, g, b, _ = cmap(float(norm(max(v, 1e-12))) if norm else 0.5)
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            bold = "bold" if i == j and len(matrix) == len(row) else "normal"
            ax.text(j, i, _num(v), ha="center", va="center", fontsize=8, weight=bold,
                    color="white" if dark else "black")  # fmt: skip
    ax.set_title(title)
    from matplotlib.ticker import FuncFormatter

    bar = fig.colorbar(im, ax=ax, label="FD (log scale)")
    plain = FuncFormatter(lambda v, _pos: _num(v))
    bar.ax.yaxis.set_major_formatter(plain)
    bar.ax.yaxis.set_minor_formatter(plain)
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


def _iv(pair) -> str:
    return "" if not pair else f" [{_num(pair[0])}, {_num(pair[1])}]"


def _table(rows: list[list], head: list[str], flag: int | None = None) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        f"<tr{' class=flag' if i == flag else ''}>"
        + "".join(f"<td>{html.escape(c if isinstance(c, str) else _num(c))}</td>" for c in r)
        + "</tr>"
        for i, r in enumerate(rows)
    )
    return f"<table><tr>{th}</tr>{body}</table>"


def worst_style(results: dict) -> tuple[int, float] | None:
    """The style furthest from its floor: (index, M(i,i) / M_ref(i,i))."""
    ratios = [
        (i, results["M_diag_independent_seeds"][i] / f)
        for i, f in enumerate(results["M_ref"])
        if f > 0
    ]
    return max(ratios, key=lambda t: t[1]) if ratios else None


def headline(results: dict, gate=None) -> str:
    """The report's first sentences: the verdict and the figure that decides it."""
    ivs = results.get("intervals") or {}
    ind = results["fid_t_independent_ratio"]
    conf = (results.get("uncertainty") or {}).get("confidence")
    ci = f"{conf:.0%} interval" if conf else "interval"
    verdict = (
        "No gate was applied."
        if gate is None
        else f"The gate <b>{'PASSED' if gate.passed else 'FAILED'}</b> "
        f"({html.escape(gate.summary())})."
    )
    text = (
        f"<p class=headline>{verdict} Independent-seed ratio <b>{_num(ind)}</b>"
        f"{_iv(ivs.get('fid_t_independent_ratio'))} ({ci}): the student's distance to each "
        "teacher's images under other seeds, over the teachers' own distance to them. "
        "<b>1.0 is the floor</b> (as close as a teacher is to itself); lower is better.</p>"
        f"<p>Shared-seed ratio {_num(results['fid_t_ratio'])}{_iv(ivs.get('fid_t_ratio'))} "
        "(secondary: the student is compared with the teacher's images under the same seeds, "
        "so a student that copies its teacher image for image can score below 1).</p>"
    )
    baselines = results.get("baselines") or {}
    if baselines:
        best, v = min(baselines.items(), key=lambda kv: kv[1]["fid_t_ratio"])
        ahead = v["fid_t_ratio"] / results["fid_t_ratio"] if results["fid_t_ratio"] > 0 else None
        text += (
            f"<p>The best static merge, <b>{html.escape(best)}</b>, has shared-seed ratio "
            f"{_num(v['fid_t_ratio'])}: the student is <b>{_num(ahead)}x</b> closer to the "
            "teachers.</p>"
        )
    worst = worst_style(results)
    if worst:
        i, r = worst
        text += (
            f"<p>Worst style: <b class=flagtext>{html.escape(results['styles'][i])}</b>, "
            f"at {_num(r)}x its floor (independent seeds).</p>"
        )
    return text


def _meta_line(meta: dict | None, results: dict) -> str:
    items = [(k, (meta or {}).get(k)) for k in ("run_id", "commit", "steps", "date")]
    items += [("evaluation seconds", results.get("seconds"))]
    shown = [f"{k.replace('_', ' ')}: <code>{html.escape(str(v))}</code>" for k, v in items if v]
    return f"<p class=meta>{' &middot; '.join(shown)}</p>" if shown else ""


def _sections(results: dict, gate) -> str:
    names, ivs = results["styles"], results.get("intervals") or {}
    worst = worst_style(results)
    per_style = []
    for i, n in enumerate(names):
        m_iv = (ivs.get("M") or [[None] * len(names)] * len(names))[i][i]
        ref_iv = (ivs.get("M_ref") or [None] * len(names))[i]
        ind_iv = (ivs.get("M_diag_independent_seeds") or [None] * len(names))[i]
        acc = results["style_accuracy"][n]
        floor = results["M_ref"][i]
        per_style.append([
            n + (" (worst)" if worst and worst[0] == i else ""),
            f"{_num(results['M_diag_independent_seeds'][i])}{_iv(ind_iv)}",
            f"{_num(results['M'][i][i])}{_iv(m_iv)}",
            f"{_num(floor)}{_iv(ref_iv)}",
            _num(results["M_diag_independent_seeds"][i] / floor) if floor > 0 else "n/a",
            "n/a" if acc is None else f"{acc:.2f}{_iv((ivs.get('style_accuracy') or {}).get(n))}",
            results["teacher_accuracy"][n],
        ])  # fmt: skip
    out = "<h2>Per style</h2>" + _table(
        per_style,
        [
            "style",
            "FD indep. seeds",
            "FD shared seeds M(i,i)",
            "floor M_ref(i,i)",
            "indep. / floor",
            "student style acc.",
            "teacher style acc.",
        ],  # fmt: skip
        flag=worst[0] if worst else None,
    )
    if gate is not None:
        rows = [[c.name, c.value, _iv(c.interval).strip() or "n/a", c.threshold,
                 "yes" if c.passed else "NO"] for c in gate.criteria]  # fmt: skip
        out += (
            "<h2>Gate</h2><p>A bar fails only when the figure's whole interval is beyond it; "
            "an old style regresses only beyond the tolerance (in floors) and the noise.</p>"
        )
        out += _table(rows, ["criterion", "value", "interval", "threshold", "passed"])
    base_rows = [
        [b, f"{_num(v['fid_t_ratio'])}{_iv((v.get('interval') or {}).get('fid_t_ratio'))}",
         v["fid_t"], f"{v.get('collapses_to', 'n/a')} ({v.get('collapse_share', 0):.0%} of images)"]
        for b, v in results["baselines"].items()
    ]  # fmt: skip
    out += (
        "<h2>Static merges</h2><p>One model for every style request; it collapses to "
        "one style (classifier's majority).</p>"
    )
    out += _table(base_rows, ["method", "shared-seed ratio", "FD_t", "collapses to"]) \
        if base_rows else "<p>none</p>"  # fmt: skip
    return out + _mixing_section(results.get("mixing")) + _uncertainty_section(results)


def _mixing_section(mix: dict | None) -> str:
    if not mix:
        return ""
    rows = []
    for method in ("dmm", "weight_average"):
        m = mix[method]
        for k, w in enumerate(mix["weights"]):
            rows.append([method if k == 0 else "", f"{w:.2f}", m["p_from"][k], m["p_to"][k],
                         m["fd_from"][k], m["fd_to"][k]])  # fmt: skip
    smooth = "; ".join(
        f"{m}: largest step of p({mix['to']}) {_num(mix[m]['max_step'])}, "
        f"{'monotonic' if mix[m]['monotonic'] else 'not monotonic'}"
        for m in ("dmm", "weight_average")
    )
    ideal = 1 / (len(mix["weights"]) - 1)
    return (
        f"<h2>Mixing {html.escape(mix['from'])} &rarr; {html.escape(mix['to'])}</h2>"
        f"<p>DMM style mixing against weight-averaging the two teachers ({mix['images']} images "
        f"a point). {html.escape(smooth)} (an even path steps {_num(ideal)}).</p>"
        + _table(
            rows,
            [
                "method",
                "w",
                f"p({mix['from']})",
                f"p({mix['to']})",
                f"FD to {mix['from']}",
                f"FD to {mix['to']}",
            ],
        )  # fmt: skip
    )


def _uncertainty_section(results: dict) -> str:
    u = results.get("uncertainty")
    if not u:
        return ""
    need = ", ".join(
        f"+/-{t}: {n}" for t, n in u["images_per_style_for_half_width"].items() if n is not None
    )
    return (
        f"<h2>Uncertainty</h2><p>{u['confidence']:.0%} intervals: {html.escape(u['method'])}; "
        f"{u['bootstrap']} replicates, {u['repeats']} repeat(s). The independent-seed ratio is "
        f"known to +/-{_num(u['independent_ratio_half_width'])} at "
        f"{results['images_per_style']} images per style; images per style for a half-width "
        f"of {need}.</p>"
    )


def write_report(
    out: Path,
    results: dict,
    images: dict,
    mixing: dict | None,
    gate=None,
    metrics_file: Path | None = None,
    meta: dict | None = None,
    columns: int = 8,
) -> None:
    """Figures as PNGs and report.html; ``gate`` (a GateResult) adds the verdict."""
    names, fe = results["styles"], results["feature_extractor"]
    figures: list[tuple[str, str]] = []
    _heatmap(results["M"], [f"student:{n}" for n in names], names,
             f"M(i, j): FD(student as style i, teacher j) [{fe}]", out / "M.png")  # fmt: skip
    figures.append(("M.png", "lower is better; the diagonal (bold) is FD_t's terms"))
    if results["baselines"]:
        rows = [b["M_row"] for b in results["baselines"].values()]
        _heatmap(rows, list(results["baselines"]), names,
                 f"static merges vs teachers [{fe} FD]", out / "M_baselines.png")  # fmt: skip
        figures.append(("M_baselines.png", "FD(static merge, teacher j)"))
    prompts = images.get("prompts") or []
    for n in names:
        rows = {
            "teacher": images["teacher"][n][:columns],
            "student": images["student"][n][:columns],
        }
        rows.update({b: imgs[:columns] for b, imgs in images["baseline"].items()})
        _grid(rows, prompts[:columns], f"style {n}: same prompts and seeds", out / f"grid_{n}.png")
        figures.append((f"grid_{n}.png", f"style {n}"))
    if mixing is not None:
        s = mixing["summary"]
        strip = {f"{m} w={w:.2f}": imgs for m, ims in mixing["images"].items()
                 for w, imgs in zip(s["weights"], ims, strict=True)}  # fmt: skip
        _grid(strip, prompts[:4], f"{s['from']} -> {s['to']}", out / "mixing.png")
        figures.append(("mixing.png", "rows: method and weight of the second style"))
    if results.get("convergence"):
        from dmm.evaluation.studies import plot_convergence

        pts = [p for p in results["convergence"] if isinstance(p["step"], int)]
        if pts:
            plot_convergence(pts, out / "convergence.png")
            figures.append(("convergence.png", "FD_t / reference against distillation steps"))
    if metrics_file and _loss_curves(metrics_file, out / "losses.png"):
        figures.append(("losses.png", "distillation losses by step"))
    imgs_html = "".join(
        f"<figure><img src='data:image/png;base64,{base64.b64encode((out / f).read_bytes()).decode()}'>"
        f"<figcaption>{html.escape(cap)}</figcaption></figure>"
        for f, cap in figures
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>DMM evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
img{{max-width:100%}}.headline{{font-size:1.15em}}.meta{{color:#666}}
tr.flag td{{background:#fde2e2}}.flagtext{{color:#b00}}</style></head><body>
<h1>DMM evaluation</h1>{_meta_line(meta, results)}
{headline(results, gate)}
<p>Distances are Frechet distances of <b>{html.escape(fe)}</b> features
({results["feature_dim"]} dims, {results["images_per_style"]} images per style){"" if fe.startswith("inception") else " (not FID)"}.</p>
{_sections(results, gate)}
<h2>Figures</h2>{imgs_html}
<details><summary>Raw results (evaluation.json)</summary><pre>{html.escape(json.dumps(results, indent=1))}</pre></details>
</body></html>"""
    (out / "report.html").write_text(page)
