"""Block-weight (MBW) sweep of the static baselines against the DMM student.

Merges the zoo's teachers with every method under a set of block-weight presets,
scores all merges and the student with the FD_t protocol in one evaluation
(teacher images are sampled once), and prints the baselines sorted by FD_t
ratio, so that the strongest static baseline is the one compared with DMM.

Full run (the embedded zoo, params.yaml's `evaluate:` section and its student):

    python benchmarks/mbw_sweep.py --params params.yaml --base data/zoo/base \\
        --work benchmarks/out/mbw

Smoke run on a miniature zoo built on the spot (minutes on a CPU; its figures
mean nothing, the teachers are barely trained):

    python benchmarks/mbw_sweep.py --mini --work /tmp/mbw_mini

Writes WORK/mbw_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("weighted", "task_arithmetic", "ties", "dare_linear", "dare_ties")


def presets(n_in: int, n_out: int) -> dict[str, list[float] | None]:
    """Named block weights, BASE first; ``flat`` is the plain merge."""
    n = n_in + 1 + n_out
    ramp = [i / (n - 1) for i in range(n)]
    return {
        "flat": None,
        "keep_in": [1.0] + [0.0] * n_in + [1.0] * (1 + n_out),
        "keep_out": [1.0] * (1 + n_in + 1) + [0.0] * n_out,
        "ramp_up": [1.0, *ramp],
        "ramp_down": [1.0, *reversed(ramp)],
        "out_heavy": [1.0] + [0.5] * n_in + [1.0] + [1.5] * n_out,
    }


def merge_all(
    base: Path, teachers: list[Path], work: Path, methods, names
) -> tuple[dict[str, Path], dict[str, list[float] | None]]:
    from safetensors import safe_open

    from dmm.merge.blocks import detect_layout
    from dmm.merge.stream import UNET_WEIGHTS, merge_unets

    with safe_open(str(base / UNET_WEIGHTS), framework="pt") as fh:
        layout = detect_layout(fh.keys())
    table = presets(layout.n_in, layout.n_out)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"unknown presets {unknown}; known: {sorted(table)}")
    merged = {}
    for method in methods:
        for name in names:
            out = work / "merges" / f"{method}-{name}"
            merge_unets(base, teachers, out, method, block_weights=table[name])
            merged[f"{method}-{name}"] = out
    return merged, {n: table[n] for n in names}


def build_mini(work: Path):
    """A miniature zoo, prompts, samples and a short-distilled student (a smoke setup)."""
    from dmm.data.config import PromptsConfig, SampleConfig
    from dmm.data.prompts import build_prompts
    from dmm.data.samples import sample_all
    from dmm.distill.config import DistillConfig
    from dmm.distill.trainer import distill
    from dmm.evaluation.config import EvaluateConfig
    from dmm.zoo.build import build_zoo
    from dmm.zoo.config import ZooConfig

    zoo = work / "zoo"
    manifest = build_zoo(zoo, ZooConfig.miniature())
    styles = list(manifest["teachers"])[:3]
    teachers = {s: zoo / manifest["teachers"][s]["path"] for s in styles}
    build_prompts(PromptsConfig(n_train=24, n_eval=8), work / "prompts", manifest)
    sample_all(
        teachers, zoo / "base", work / "prompts/train.jsonl", work / "samples",
        SampleConfig(steps=2, batch_size=32), progress=False,
    )  # fmt: skip
    specs = [{"name": s, "path": p, "samples": work / "samples" / s} for s, p in teachers.items()]
    student = distill(
        DistillConfig(
            base=zoo / "base",
            teachers=specs,
            output_dir=work / "distill",
            steps=20,
            batch_size=4,
            checkpoint_every=20,
            warmup_steps=0,
            progress=False,
        )  # fmt: skip
    )
    cfg = EvaluateConfig(
        student=student,
        teachers=[{"name": s, "path": p} for s, p in teachers.items()],
        prompts=work / "prompts/eval.jsonl",
        classifier=zoo / manifest["classifier"],
        images_per_style=128,  # the least stylenet FD accepts
        steps=2,
        batch_size=128,
    )
    return zoo / "base", cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--params", type=Path, help="YAML whose `evaluate:` section is used")
    ap.add_argument("--base", type=Path, default=Path("data/zoo/base"))
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--presets", default=",".join(presets(1, 1)))
    ap.add_argument("--set", action="append", default=[], help="evaluate override key=value")
    ap.add_argument("--mini", action="store_true", help="build a miniature setup in --work")
    args = ap.parse_args()

    from dmm.config import load_stage_config
    from dmm.evaluation.config import EvaluateConfig
    from dmm.evaluation.protocol import evaluate

    work = args.work
    if args.mini:
        base, cfg = build_mini(work)
    else:
        if args.params is None:
            raise SystemExit("give --params (or --mini)")
        base = args.base
        cfg = load_stage_config(EvaluateConfig, args.params, "evaluate", args.set)
    methods = [m for m in args.methods.split(",") if m]
    names = [p for p in args.presets.split(",") if p]
    merged, weights = merge_all(base, [t.path for t in cfg.teachers], work, methods, names)
    cfg = cfg.model_copy(update={"baselines": merged, "output_dir": work / "evaluation"})
    r = evaluate(cfg, progress=True)
    rows = sorted(
        ({"baseline": b, **{k: v[k] for k in ("fid_t_ratio", "mean_style_accuracy")}}
         for b, v in r["baselines"].items()),
        key=lambda row: row["fid_t_ratio"],
    )  # fmt: skip
    best = rows[0]
    result = {
        "feature_extractor": r["feature_extractor"],
        "student_fid_t_ratio": r["fid_t_ratio"],
        "baselines": rows,
        "best": best,
        "best_over_student": best["fid_t_ratio"] / r["fid_t_ratio"],
        "block_weights": weights,
    }
    (work / "mbw_sweep.json").write_text(json.dumps(result, indent=2))
    print(f"student FD_t ratio ({r['feature_extractor']} FD): {r['fid_t_ratio']:.3f}")
    print("| baseline | FD_t ratio | mean style acc |\n| --- | --- | --- |")
    for row in rows:
        print(f"| {row['baseline']} | {row['fid_t_ratio']:.3f} | {row['mean_style_accuracy']} |")
    print(
        f"best static baseline {best['baseline']}: {result['best_over_student']:.2f}x the student"
    )


if __name__ == "__main__":
    main()
