"""The model card of a merged student: Markdown for the folder's README.md and the
registry version's description.

At save time only the styles (and whatever the caller knows) are given, so the
card is minimal; registration passes the teachers, the merge and the gate's
evaluation to write the full card. Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from dmm.student.remote import REMOTE_MODULE

_LICENCE = (
    "A merged model is derived from every teacher: it inherits all of their licences, "
    "and the most restrictive terms apply to it."
)


def _teachers(teachers: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["| style | source | sha256 | licence |", "|---|---|---|---|"]
    for t in teachers:
        sha = t.get("sha256") or ""
        lines.append(
            f"| {t['name']} | `{t.get('source') or '?'}` | `{sha[:16]}{'…' if sha else ''}` "
            f"| {t.get('license') or 'not stated'} |"
        )
    return lines


def _gate(evaluation: Mapping[str, Any], verdict: str | None) -> list[str]:
    fd = evaluation.get("feature_extractor", "?")
    lines = [
        f"Frechet distances use the `{fd}` features (FD_t = trace of the student-vs-teacher "
        "matrix; the ratio divides by the teachers' own seed-to-seed floor).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| FD_t ratio | {float(evaluation['fid_t_ratio']):.3f} |",
    ]
    if evaluation.get("fid_t_independent_ratio") is not None:
        ratio = float(evaluation["fid_t_independent_ratio"])
        lines.append(f"| FD_t ratio, independent seeds | {ratio:.3f} |")
    if verdict:
        lines.append(f"| gate | {verdict} |")
    student = evaluation.get("style_accuracy") or {}
    teacher = evaluation.get("teacher_accuracy") or {}
    if student:
        lines += ["", "| style | style accuracy | teacher's |", "|---|---|---|"]
        for name in evaluation.get("styles", student):
            s, t = student.get(name), teacher.get(name)
            lines.append(
                f"| {name} | {'n/a' if s is None else f'{s:.2f}'} "
                f"| {'n/a' if t is None else f'{t:.2f}'} |"
            )
    return lines


def _loading(styles: Sequence[str], name: str, folder: str) -> list[str]:
    first = styles[0]
    mix = json.dumps({styles[0]: 0.5, styles[-1]: 0.5})
    rest = (
        f'curl -s http://127.0.0.1:5001/invocations -H "Content-Type: application/json" -d '
        f'\'{{"dataframe_split": {{"columns": ["prompt", "style"], '
        f'"data": [["a prompt", "{first}"]]}}, "params": {{"steps": 20}}}}\''
    )
    return [
        "With dmm installed (`import dmm` lets diffusers resolve the folder's dmm components):",
        "",
        "```python",
        "import dmm",
        "from dmm import DMMStudentPipeline",
        "",
        f'pipe = DMMStudentPipeline.from_pretrained("{folder}")',
        f'image = pipe("a prompt", style="{first}").images[0]',
        f'mixed = pipe("a prompt", style={mix}).images[0]',
        "```",
        "",
        f"Plain diffusers, without dmm: the folder ships its code in `{REMOTE_MODULE}.py`, "
        "which runs only when you ask for it:",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{folder}", '
        f'custom_pipeline="{REMOTE_MODULE}", trust_remote_code=True)',
        f'image = pipe("a prompt", style="{first}").images[0]',
        "```",
        "",
        "One style (or mix) as an ordinary SD1.5 checkpoint for any tool (A1111, Forge, "
        "ComfyUI, `from_single_file`):",
        "",
        "```bash",
        f"dmm export --student {folder} --style {first} --format single-file "
        f"--out {first}.safetensors",
        "```",
        "",
        "From the MLflow registry, as a pyfunc model or a REST service:",
        "",
        "```python",
        "import mlflow.pyfunc, pandas as pd",
        "",
        f'model = mlflow.pyfunc.load_model("models:/{name}@champion")',
        f'frame = pd.DataFrame({{"prompt": ["a prompt"], "style": ["{first}"]}})',
        'images = model.predict(frame, params={"steps": 20})["image"]  # base64 PNGs',
        "```",
        "",
        "```bash",
        f'PATH="$PWD/.venv/bin:$PATH" mlflow models serve -m models:/{name}@champion '
        "--env-manager local -p 5001",
        rest,
        "```",
    ]


def model_card(
    styles: Sequence[str],
    *,
    name: str = "dmm-student",
    folder: str = "data/student/student",
    base: str | None = None,
    teachers: Sequence[Mapping[str, Any]] | None = None,
    merge_kind: str | None = None,
    parent_version: str | None = None,
    evaluation: Mapping[str, Any] | None = None,
    gate_verdict: str | None = None,
    sample_grid: str | None = None,
) -> str:
    """The Markdown card. ``teachers``: ``{name, source, sha256, license}`` per style;
    ``evaluation``: an ``evaluation.json`` as ``dmm evaluate`` writes it; ``sample_grid``:
    a path or URL of the labelled sample grid (a row per style)."""
    styles = list(styles)
    lines = [
        f"# {name}",
        "",
        f"A DMM student: one Stable Diffusion UNet that renders {len(styles)} merged "
        "styles on request, selected (or mixed) by a style vector.",
        "",
        "Styles: " + ", ".join(f"`{s}`" for s in styles),
    ]
    if base:
        lines.append(f"Base: `{base}`")
    if merge_kind:
        parent = f" (parent version {parent_version})" if parent_version else ""
        lines.append(f"Merge: {merge_kind}{parent}")
    if teachers:
        lines += ["", "## Teachers", "", *_teachers(teachers)]
    if evaluation:
        lines += ["", "## Evaluation gate", "", *_gate(evaluation, gate_verdict)]
    if sample_grid:
        lines += [
            "",
            "## Samples",
            "",
            f"![samples, one row per style: {', '.join(styles)}]({sample_grid})",
        ]
    lines += ["", "## Loading", "", *_loading(styles, name, folder)]
    licences = sorted({t["license"] for t in teachers or () if t.get("license")})
    lines += ["", "## Licence", "", _LICENCE]
    if licences:
        lines.append("Teachers' licences: " + ", ".join(f"`{x}`" for x in licences) + ".")
    else:
        lines.append("No teacher states a licence: check each teacher's source before use.")
    return "\n".join(lines) + "\n"
