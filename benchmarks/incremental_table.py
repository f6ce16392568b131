"""Paper Table 2 on the zoo: per-style FD for a 5-teacher student from scratch,
incremental merging with the previous student as regulariser, and without it.

Merge 3 teachers, then add a 4th and a 5th. Writes benchmarks/out/incremental.json
and prints a table. Needs the zoo, prompts and samples (`dvc repro`).

    .venv/bin/python benchmarks/incremental_table.py [--steps 400 --inc-steps 200]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import yaml

from dmm.distill.config import DistillConfig
from dmm.distill.trainer import distill
from dmm.evaluation.config import EvaluateConfig
from dmm.evaluation.protocol import evaluate

ALL = ["pastel", "neon", "sepia", "blueprint", "stripes"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=400, help="full merges (scratch and first 3)")
    ap.add_argument("--inc-steps", type=int, default=200, help="each incremental merge")
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--work", default="benchmarks/out/incremental")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs (their summary.json)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    params = yaml.safe_load(Path(args.params).read_text())
    base = {k: v for k, v in params["distill"].items() if k != "teachers"}
    specs = {t["name"]: t for t in params["distill"]["teachers"]}
    work = Path(args.work)

    def run(name: str, teachers: list[str], steps: int, **extra) -> tuple[Path, float]:
        cfg = DistillConfig(
            **{**base, **extra, "teachers": [specs[n] for n in teachers],
               "output_dir": work / name, "steps": steps, "progress": False,
               "checkpoint_every": steps, "resume": None}
        )  # fmt: skip
        summary = work / name / "summary.json"
        if args.reuse and summary.is_file() and (work / name / "student").is_dir():
            return work / name / "student", json.loads(summary.read_text())["seconds"]
        t0 = time.perf_counter()
        out = distill(cfg)
        return out, time.perf_counter() - t0

    times = {}
    scratch, times["scratch5"] = run("scratch5", ALL, args.steps)
    first3, times["first3"] = run("first3", ALL[:3], args.steps)
    inc4, times["inc4"] = run(
        "inc4", ["blueprint"], args.inc_steps, init_from=first3, old_style_ratio=0.5
    )
    inc5, times["inc5"] = run(
        "inc5", ["stripes"], args.inc_steps, init_from=inc4, old_style_ratio=0.5
    )
    nreg4, times["noreg4"] = run(
        "noreg4", ["blueprint"], args.inc_steps, init_from=first3, old_style_ratio=0.0
    )
    nreg5, times["noreg5"] = run(
        "noreg5", ["stripes"], args.inc_steps, init_from=nreg4, old_style_ratio=0.0
    )

    ev = params["evaluate"]
    results = {}
    for label, student in (
        ("scratch", scratch),
        ("incremental", inc5),
        ("no_regularization", nreg5),
    ):
        cfg = EvaluateConfig(
            **{**ev, "student": student, "baselines": {}, "convergence": False, "interpolate": None,
               "images_per_style": args.images, "output_dir": work / f"eval-{label}"}
        )  # fmt: skip
        r = evaluate(cfg, progress=False)
        results[label] = {
            "fd": {n: r["M"][i][i] for i, n in enumerate(r["styles"])},
            "style_accuracy": r["style_accuracy"],
            "fid_t_ratio": r["fid_t_ratio"],
        }
        results["reference_fd"] = dict(zip(r["styles"], r["M_ref"], strict=True))
    old = ALL[:3]
    gap = {n: results["incremental"]["fd"][n] / results["scratch"]["fd"][n] - 1 for n in old}
    summary = {
        "feature_extractor": r["feature_extractor"],
        "results": results,
        "old_style_gap_vs_scratch": gap,
        "max_old_style_gap": max(gap.values()),
        "seconds": times,
        "incremental_seconds": times["inc4"] + times["inc5"],
        "scratch_seconds": times["scratch5"],
        "steps": {"full": args.steps, "incremental": args.inc_steps},
    }
    work.mkdir(parents=True, exist_ok=True)
    Path("benchmarks/out/incremental.json").write_text(json.dumps(summary, indent=2))
    print(f"\nper-style FD ({r['feature_extractor']}); reference floor in the last column")
    print(f"{'style':<11}{'scratch':>10}{'incr.+reg':>11}{'incr. no reg':>14}{'floor':>9}")
    for n in ALL:
        row = [results[k]["fd"][n] for k in ("scratch", "incremental", "no_regularization")]
        tag = " (old)" if n in old else " (new)"
        print(
            f"{n + tag:<17}{row[0]:>6.3f}{row[1]:>11.3f}{row[2]:>14.3f}{results['reference_fd'][n]:>9.3f}"
        )
    print(f"max old-style gap, incremental vs scratch: {100 * summary['max_old_style_gap']:.1f}%")
    print(f"wall time: incremental (+4th, +5th) {summary['incremental_seconds']:.0f}s "
          f"vs from scratch (5 teachers) {summary['scratch_seconds']:.0f}s")  # fmt: skip


if __name__ == "__main__":
    main()
