"""Studies built on distill + evaluate: the convergence curve and the loss ablation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors.torch import load_file

from dmm.atomic import DmmError, atomic_file
from dmm.distill import checkpoints as ckpt
from dmm.distill.config import DistillConfig
from dmm.evaluation.config import EvaluateConfig

log = logging.getLogger(__name__)


def _mean(values) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def student_from_checkpoint(checkpoint: Path, like: Path, out: Path, base: Path) -> Path:
    """Write a student pipeline folder from a training checkpoint.

    ``like`` is any student folder of the same run (for the UNet config and
    style names); the checkpoint's ``model.safetensors`` supplies the weights.
    """
    from dmm.student.model import StyleStudent

    student = StyleStudent.from_pipeline(like)
    state = load_file(Path(checkpoint) / "model.safetensors")
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DmmError(
            f"checkpoint {checkpoint} does not match {like}: {len(missing)} missing keys"
        )
    return student.save_pipeline(out, base)


def convergence(distill_dir: Path, eval_cfg: EvaluateConfig, base: Path, work: Path) -> list[dict]:
    """FD_t ratio at every sealed checkpoint of a run (plus its final student)."""
    from dmm.evaluation.protocol import evaluate

    final = Path(distill_dir) / "student"
    points = []
    for step, directory in ckpt.list_checkpoints(Path(distill_dir) / "checkpoints"):
        folder = student_from_checkpoint(directory, final, work / f"student-{step}", base)
        cfg = eval_cfg.model_copy(
            update={
                "student": folder,
                "baselines": {},
                "output_dir": work / f"eval-{step}",
                "interpolate": None,
            }
        )
        r = evaluate(cfg, progress=False)
        points.append({"step": step, "fid_t": r["fid_t"], "fid_t_ratio": r["fid_t_ratio"],
                       "style_accuracy": r["style_accuracy"]})  # fmt: skip
        log.info("step %d: FD_t ratio %.3f", step, r["fid_t_ratio"])
    return points


ABLATION = {
    "score": {"losses": {"score": True, "feature": 0.0, "adversarial": 0.0}},
    "score+feature": {"losses": {"score": True, "feature": 0.001, "adversarial": 0.0}},
    "score+feature+adversarial": {"losses": {"score": True, "feature": 0.001, "adversarial": 0.01}},
}


def ablation(distill_cfg: DistillConfig, eval_cfg: EvaluateConfig, work: Path) -> dict:
    """The paper's Table 1 on our teachers: the same budget, losses switched on one by one."""
    from dmm.config import deep_merge
    from dmm.distill.trainer import distill
    from dmm.evaluation.protocol import evaluate

    rows = {}
    for name, change in ABLATION.items():
        run_dir = work / name.replace("+", "_")
        data = deep_merge(json.loads(distill_cfg.model_dump_json()), change)
        data.update({"output_dir": str(run_dir), "resume": None, "init_from": None})
        student = distill(DistillConfig(**data))
        r = evaluate(
            eval_cfg.model_copy(
                update={
                    "student": student,
                    "baselines": {},
                    "output_dir": run_dir / "eval",
                    "interpolate": None,
                }
            ),
            progress=False,
        )
        rows[name] = {
            "fid_t": r["fid_t"],
            "fid_t_ratio": r["fid_t_ratio"],
            "mean_style_accuracy": _mean(r["style_accuracy"].values()),
        }
        log.info("%s: ratio %.3f", name, r["fid_t_ratio"])
    result = {
        "fid_t_ref": r["fid_t_ref"],
        "feature_extractor": r["feature_extractor"],
        "rows": rows,
    }
    with atomic_file(work / "ablation.json") as fh:
        fh.write(json.dumps(result, indent=2))
    return result


def plot_convergence(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([p["step"] for p in points], [p["fid_t_ratio"] for p in points], marker="o")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("distillation step")
    ax.set_ylabel("FD_t / FD_t reference")
    ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def damage_style(pipe, style: str, how: str, other: str | None = None) -> None:
    """Damage one style of a loaded student pipeline in place, to test that gates catch it.

    ``zero``: the style's vector becomes 0 (the student forgets it);
    ``swap``: it trades vectors with ``other`` (as if its teacher had been swapped).
    """
    import torch

    book = pipe.style_codebook
    names = list(book.style_names)
    if style not in names or (how == "swap" and other not in names):
        raise DmmError(f"cannot damage style {style!r}: the student has {', '.join(names)}")
    i = names.index(style)
    with torch.no_grad():
        if how == "zero":
            book.vectors[i] = 0
        elif how == "swap":
            j = names.index(other)
            book.vectors[[i, j]] = book.vectors[[j, i]].clone()
        else:
            raise DmmError(f"unknown damage {how!r} (zero or swap)")
