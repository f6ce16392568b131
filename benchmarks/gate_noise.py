"""False alarms and detection of the evaluation gate under sampling noise.

Evaluates one student under N + 1 disjoint sample seeds (evaluation 0 plays
the parent champion), and the same student with one style damaged (its style
vector zeroed, or swapped with another style's: a swapped teacher). Then gates
every re-evaluation against evaluation 0, as an incremental merge would be
gated against its parent:

- false alarm: the undamaged student's verdict differs from its own verdict
  (gated without a parent), or an old-style criterion fails on it;
- detection: a criterion about the damaged style fails.

    python benchmarks/gate_noise.py --seeds 10                       # the zoo (dvc repro)
    python benchmarks/gate_noise.py --analyse benchmarks/out/gate_noise.json  # re-gate only

Sampling dominates: (2 x teachers + 3 x student styles) image sets per seed
(teacher images are cached across the damaged and undamaged runs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from dmm.atomic import write_text_atomic

DAMAGES = ("zero", "swap")


def _cfg(args, styles: list[str], seed: int):
    from dmm.evaluation.config import EvaluateConfig

    zoo = Path(args.zoo)
    return EvaluateConfig(
        student=args.student, teachers=[{"name": s, "path": zoo / "teachers" / s} for s in styles],
        prompts=args.prompts, classifier=zoo / "classifier", output_dir=Path(args.work) / "unused",
        images_per_style=args.images, steps=args.steps, batch_size=args.images, seed=seed,
        cache_dir=Path(args.work) / "cache",
    )  # fmt: skip


def sample_all(args) -> dict:
    """Score every seed, undamaged and damaged; the figures only (no images)."""
    from tqdm import tqdm

    from dmm.evaluation.classify import load_classifier
    from dmm.evaluation.features import make_extractor
    from dmm.evaluation.protocol import score
    from dmm.evaluation.sampling import load_pipeline
    from dmm.evaluation.studies import damage_style

    styles = args.styles.split(",")
    damaged, other = args.damage, next(s for s in styles if s != args.damage)
    cfg0 = _cfg(args, styles, args.seed)
    device = cfg0.torch_device()
    clf = load_classifier(cfg0.classifier)
    extractor = make_extractor("stylenet", cfg0.classifier)
    out: dict = {"styles": styles, "damaged": damaged, "swapped_with": other, "runs": []}
    t0 = time.perf_counter()
    for s in tqdm(range(args.seeds + 1), desc="seeds"):
        cfg = _cfg(args, styles, args.seed + s * args.seed_stride)
        row = {"seed": cfg.seed}
        for how in ("none", *DAMAGES):
            pipe = load_pipeline(cfg.student, device)
            if how != "none":
                damage_style(pipe, damaged, how, other)
            row[how], _ = score(cfg, pipe, clf, extractor, device)
        out["runs"].append(row)
        out["seconds"] = round(time.perf_counter() - t0, 1)
        # Saved after every seed: an interrupted run can still be analysed.
        write_text_atomic(Path(args.work) / "gate_noise.json", json.dumps(out))
    return out


def analyse(data: dict, thresholds) -> dict:
    from dmm.registry.gate import check_gate, parent_from_results

    parent = parent_from_results(data["runs"][0]["none"])
    own = check_gate(data["runs"][0]["none"], thresholds).passed
    damaged = data["damaged"]
    false_alarms, caught = [], {how: [] for how in DAMAGES}
    for row in data["runs"][1:]:
        ok = check_gate(row["none"], thresholds, parent)
        old_fail = [c.name for c in ok.criteria if c.name.startswith("old_style/") and not c.passed]
        false_alarms.append(bool(old_fail) or ok.passed != own)
        for how in DAMAGES:
            gate = check_gate(row[how], thresholds, parent)
            caught[how].append(
                any(not c.passed and c.name.endswith(f"/{damaged}") for c in gate.criteria)
            )
    n = len(data["runs"]) - 1
    return {
        "re_evaluations": n,
        "own_verdict": "passed" if own else "failed",
        "false_alarms": sum(false_alarms),
        "caught": {how: f"{sum(v)}/{n}" for how, v in caught.items()},
        "thresholds": thresholds.model_dump(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--zoo", default="data/zoo")
    ap.add_argument("--student", default="data/student/student")
    ap.add_argument("--prompts", default="data/prompts/eval.jsonl")
    ap.add_argument("--styles", default="pastel,neon,sepia,blueprint,stripes")
    ap.add_argument("--damage", default="sepia", help="the style to damage")
    ap.add_argument("--seeds", type=int, default=10, help="re-evaluations besides the parent")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--seed-stride", type=int, default=10_000)
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--work", default="benchmarks/out/gate_noise")
    ap.add_argument("--analyse", help="re-gate a saved gate_noise.json instead of sampling")
    ap.add_argument("--tolerance", type=float, help="old_style_tolerance (default: params.yaml)")
    args = ap.parse_args()
    from dmm.registry.gate import GateThresholds

    params = yaml.safe_load(Path(args.params).read_text()) if Path(args.params).is_file() else {}
    gate = ((params or {}).get("registry") or {}).get("gate") or {}
    gate = {k: v for k, v in gate.items() if k in GateThresholds.model_fields}
    if args.tolerance is not None:
        gate["old_style_tolerance"] = args.tolerance
    thresholds = GateThresholds(**gate)
    if args.analyse:
        data = json.loads(Path(args.analyse).read_text())
    else:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        data = sample_all(args)
    print(json.dumps(analyse(data, thresholds), indent=1))


if __name__ == "__main__":
    main()
