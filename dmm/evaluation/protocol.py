"""The FID_t protocol (DMM paper): an N x N Frechet-distance matrix against a reference floor.

Every model is sampled on the same held-out prompts, seeds and sampler:
M(i, j) = FD(student as style i, teacher j), FID_t = trace(M), and the floor
M_ref(i, i) = FD(teacher i, teacher i under other seeds). Static baselines
produce one model for every style request, so their matrix row is the same
for each i: FD_t(baseline) = sum_j FD(baseline, teacher j).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from dmm.atomic import DmmError, atomic_dir
from dmm.evaluation.cache import ImageCache, to_8bit
from dmm.evaluation.classify import load_classifier, style_accuracy, style_probabilities
from dmm.evaluation.config import EvaluateConfig
from dmm.evaluation.features import make_extractor
from dmm.evaluation.frechet import min_samples
from dmm.evaluation.intervals import check_bootstrap, images_needed, wilson_interval
from dmm.evaluation.sampling import load_pipeline, sample
from dmm.evaluation.scores import combine, derive, fd_pairs, intervals, score_repeat

log = logging.getLogger(__name__)


def _read_prompts(path: Path) -> list[str]:
    from dmm.data.prompts import read_prompts

    if not Path(path).is_file():
        raise DmmError(f"eval prompts not found: {path}")
    return read_prompts(path)


def eval_inputs(cfg: EvaluateConfig, repeat: int = 0) -> tuple[list[str], list[int], list[int]]:
    """Prompts, seeds and reference seeds: the same for every model compared.

    Repeat r shifts every seed by 2r x the reference offset, so no repeat's
    seeds or reference seeds meet another's (for K below the offset).
    """
    k = cfg.images_per_style
    prompts_all = _read_prompts(cfg.prompts)
    prompts = [prompts_all[i % len(prompts_all)] for i in range(k)]
    first = cfg.seed + 2 * repeat * cfg.reference_seed_offset
    seeds = [first + i for i in range(k)]
    return prompts, seeds, [s + cfg.reference_seed_offset for s in seeds]


def teacher_image_sets(
    cfg: EvaluateConfig,
    prompts: list[str],
    seeds: list[int],
    ref_seeds: list[int],
    device: torch.device,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each teacher's images under the eval seeds and under the reference seeds.

    They come from the cache when these weights, prompts, seeds and sampler
    were evaluated before; every image is 8-bit, cached or not.
    """
    kw = dict(steps=cfg.steps, guidance_scale=cfg.guidance_scale, batch=cfg.batch_size)
    cache = ImageCache(cfg.cache_dir)
    sampler = {"steps": cfg.steps, "guidance_scale": cfg.guidance_scale, "device": device.type}
    teacher_imgs, teacher_ref_imgs = {}, {}
    for t in cfg.teachers:
        pipes: dict = {}

        def make(seed_list: list[int], label: str, t=t, pipes=pipes):
            if "pipe" not in pipes:
                pipes["pipe"] = load_pipeline(t.path, device)
            return sample(pipes["pipe"], prompts, seed_list, desc=label if progress else None, **kw)

        teacher_imgs[t.name] = cache.get(
            t.path, prompts, seeds, sampler, lambda t=t: make(seeds, f"teacher {t.name}")
        )
        teacher_ref_imgs[t.name] = cache.get(
            t.path, prompts, ref_seeds, sampler, lambda t=t: make(ref_seeds, f"reference {t.name}")
        )
        pipes.clear()
    if cache.hits:
        log.info("teacher images: %d sets from the cache, %d sampled", cache.hits, cache.misses)
    return teacher_imgs, teacher_ref_imgs


def _check_inputs(cfg: EvaluateConfig) -> None:
    for t in cfg.teachers:
        if not (t.path / "model_index.json").is_file():
            raise DmmError(f"teacher {t.name!r}: pipeline folder not found: {t.path}")
    if not (Path(cfg.student) / "model_index.json").is_file():
        raise DmmError(f"student pipeline folder not found: {cfg.student}")
    for name, path in cfg.baselines.items():
        if not (Path(path) / "model_index.json").is_file():
            raise DmmError(f"baseline {name!r}: pipeline folder not found: {path}")
    check_bootstrap(cfg.bootstrap, cfg.confidence)
    names = [t.name for t in cfg.teachers]
    if cfg.interpolate and (set(cfg.interpolate) - set(names) or len(set(cfg.interpolate)) < 2):
        # Checked before sampling: mixing runs last.
        raise DmmError(
            f"interpolate: need two different styles of {', '.join(names)}, "
            f"got {', '.join(cfg.interpolate)}"
        )


def _check_width(cfg: EvaluateConfig, dim: int, name: str) -> None:
    k = cfg.images_per_style
    if k < min_samples(dim):
        raise DmmError(
            f"images_per_style={k} is too few for a stable {dim}-dim covariance "
            f"({name} needs at least {min_samples(dim)})"
        )


def sample_repeat(cfg: EvaluateConfig, student, repeat: int, device, progress: bool) -> dict:
    """Every model's 8-bit images under one repeat's seeds, by role."""
    prompts, seeds, ref_seeds = eval_inputs(cfg, repeat)
    kw = dict(steps=cfg.steps, guidance_scale=cfg.guidance_scale, batch=cfg.batch_size)
    tag = f" (repeat {repeat + 1}/{cfg.repeats})" if cfg.repeats > 1 else ""

    def desc(text: str) -> str | None:
        return text + tag if progress else None

    teacher, reference = teacher_image_sets(cfg, prompts, seeds, ref_seeds, device, progress)
    student_imgs = {
        n: to_8bit(sample(student, prompts, seeds, style=n, desc=desc(f"student {n}"), **kw))
        for n in (t.name for t in cfg.teachers)
    }
    baseline_imgs = {
        b: to_8bit(
            sample(load_pipeline(p, device), prompts, seeds, desc=desc(f"baseline {b}"), **kw)
        )
        for b, p in cfg.baselines.items()
    }
    return {"teacher": teacher, "reference": reference, "student": student_imgs,
            "baseline": baseline_imgs, "prompts": prompts, "seeds": seeds}  # fmt: skip


def feature_sets(images: dict, extractor) -> dict[str, torch.Tensor]:
    """Features of every image set, named "role/name" as ``scores.fd_pairs`` expects."""
    return {
        f"{role}/{name}": extractor(imgs)
        for role in ("teacher", "reference", "student", "baseline")
        for name, imgs in images[role].items()
    }


def correct_counts(clf, images_by_style: dict[str, torch.Tensor]) -> dict[str, int | None]:
    """How many of each style's images the classifier assigns to that style."""
    acc = style_accuracy(clf, images_by_style)
    return {s: None if a is None else round(a * len(images_by_style[s])) for s, a in acc.items()}


def collapse(clf, images: torch.Tensor, names: list[str]) -> dict:
    """Which style a single-output model's images are classified as, and how often."""
    cls_names = list(clf.config.heads["style"])
    pred = style_probabilities(clf, images).argmax(-1)
    share = {c: float((pred == i).float().mean()) for i, c in enumerate(cls_names)}
    known = {n: share.get(n) for n in names}
    top = max(share, key=share.get)
    scored = [v for v in known.values() if v is not None]
    return {
        "style_accuracy": known,
        # Forced to ~1/N for a single-output model (its accuracies sum to 1);
        # kept for older readers, `collapses_to` is the informative figure.
        "mean_style_accuracy": sum(scored) / len(scored) if scored else None,
        "collapses_to": top,
        "collapse_share": share[top],
    }


def score(cfg: EvaluateConfig, student, clf, extractor, device, progress: bool = False):
    """Sample every repeat and score it: (results without figures, repeat 0's images)."""
    names = [t.name for t in cfg.teachers]
    baselines = list(cfg.baselines)
    pairs = fd_pairs(names, baselines)
    generator = torch.Generator().manual_seed(cfg.seed)
    per_repeat, first = [], None
    correct: dict[str, dict[str, int | None]] = {"student": {}, "teacher": {}}
    for r in range(cfg.repeats):
        images = sample_repeat(cfg, student, r, device, progress)
        first = first or images
        per_repeat.append(
            score_repeat(feature_sets(images, extractor), pairs, cfg.bootstrap, generator)
        )
        for role in correct:
            for n, c in correct_counts(clf, images[role]).items():
                correct[role][n] = None if c is None else (correct[role].get(n) or 0) + c
    points, reps, spread = combine(per_repeat)
    results = assemble(cfg, extractor, names, baselines, points, reps, spread, correct)
    results["paired_mse"] = {
        n: float((first["student"][n] - first["teacher"][n]).pow(2).mean()) for n in names
    }
    for b, imgs in first["baseline"].items():
        results["baselines"][b].update(collapse(clf, imgs, names))
    return results, first


def run_meta(cfg: EvaluateConfig) -> dict:
    """Run id, commit, steps and date for the report's header (whatever is known)."""
    import datetime as dt
    import subprocess

    from dmm.registry.tracking import read_run_file

    root = Path(cfg.distill_dir) if cfg.distill_dir else Path(cfg.student).parent
    meta: dict = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    summary = root / "summary.json"
    if summary.is_file():
        meta["steps"] = json.loads(summary.read_text()).get("steps")
    run = read_run_file(root) or read_run_file(Path(cfg.student))
    meta["run_id"] = (run or {}).get("run_id")
    try:
        meta["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        pass  # not a git checkout: no commit to show
    return meta


def evaluate(cfg: EvaluateConfig, progress: bool = True, gate=None) -> dict:
    """Run the protocol; writes evaluation.json, figures and report.html; returns the results.

    ``gate`` (GateThresholds, optional): judge the results and show the verdict
    in the report and under ``gate`` in evaluation.json.
    """
    t0 = time.perf_counter()
    names = [t.name for t in cfg.teachers]
    _check_inputs(cfg)
    extractor = make_extractor(cfg.feature_extractor, cfg.classifier, cfg.inception_weights)
    _check_width(cfg, extractor.dim, extractor.name)
    device = cfg.torch_device()
    student = load_pipeline(cfg.student, device)
    if list(student.style_names) != names:
        raise DmmError(
            f"style count/names differ: student has {len(student.style_names)} styles "
            f"({', '.join(student.style_names)}), teachers are {len(names)} ({', '.join(names)})"
        )
    clf = load_classifier(cfg.classifier)
    results, first = score(cfg, student, clf, extractor, device, progress)
    strip = _mixing(cfg, student, clf, first, extractor, device, results)
    _convergence(cfg, results)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    _check_target(cfg, results)
    verdict = None
    if gate is not None:
        from dmm.registry.gate import check_gate

        verdict = check_gate(results, gate)
        results["gate"] = {"passed": verdict.passed, "summary": verdict.summary()}

    from dmm.evaluation.report import write_report

    out = Path(cfg.output_dir)
    with atomic_dir(out) as tmp:
        (tmp / "evaluation.json").write_text(json.dumps(results, indent=2))
        write_report(
            tmp, results, first, strip, gate=verdict, meta=run_meta(cfg),
            metrics_file=(cfg.distill_dir / "metrics.jsonl") if cfg.distill_dir else None,
        )  # fmt: skip
    return results


def assemble(cfg, extractor, names, baselines, points, reps, spread, correct) -> dict:
    """evaluation.json: the point figures, and beside them ``intervals`` with the same keys."""
    n = len(names)
    agg_points, agg_reps = derive(points, names, baselines), derive(reps, names, baselines)
    iv = intervals({**points, **agg_points}, {**reps, **agg_reps}, cfg.confidence)
    f = {k: float(v) for k, v in {**points, **agg_points}.items()}
    k_total = cfg.images_per_style * cfg.repeats

    def acc(role: str) -> tuple[dict, dict]:
        got = correct[role]
        point = {s: None if c is None else c / k_total for s, c in got.items()}
        ci = {
            s: None if c is None else wilson_interval(c, k_total, cfg.confidence)
            for s, c in got.items()
        }
        return point, ci

    s_acc, s_acc_iv = acc("student")
    t_acc, t_acc_iv = acc("teacher")
    results: dict = {
        "feature_extractor": extractor.name,
        "feature_dim": extractor.dim,
        "styles": names,
        "images_per_style": cfg.images_per_style,
        "M": [[f[("M", i, j)] for j in range(n)] for i in range(n)],
        "M_ref": [f[("M_ref", i)] for i in range(n)],
        # M shares seeds with the teacher images, so a student that reproduces its
        # teacher image for image scores below the floor (ratio < 1). Against the
        # teacher's images under the reference seeds it shares nothing, like the
        # floor itself: there ~1 is as good as it gets.
        "M_diag_independent_seeds": [f[("indep", i)] for i in range(n)],
        **{k: f[k] for k in agg_points if not k.startswith("baseline/")},
        "style_accuracy": s_acc,
        "teacher_accuracy": t_acc,
        "baselines": {
            b: {
                "fid_t": f[f"baseline/{b}/fid_t"],
                "fid_t_ratio": f[f"baseline/{b}/fid_t_ratio"],
                "M_row": [f[("base", b, j)] for j in range(n)],
                "interval": {
                    "fid_t_ratio": iv[f"baseline/{b}/fid_t_ratio"],
                    "M_row": [iv[("base", b, j)] for j in range(n)],
                },
            }
            for b in baselines
        },
        "sampler": {"steps": cfg.steps, "guidance_scale": cfg.guidance_scale, "seed": cfg.seed},
    }
    results["intervals"] = {
        "M": [[iv[("M", i, j)] for j in range(n)] for i in range(n)],
        "M_ref": [iv[("M_ref", i)] for i in range(n)],
        "M_diag_independent_seeds": [iv[("indep", i)] for i in range(n)],
        **{k: iv[k] for k in agg_points if not k.startswith("baseline/")},
        "style_accuracy": s_acc_iv,
        "teacher_accuracy": t_acc_iv,
    }
    results["uncertainty"] = uncertainty(cfg, names, f, iv, reps, spread)
    return results


def uncertainty(cfg, names, f, iv, reps, spread) -> dict:
    """How the intervals were made, the floor's own spread, and the images a width needs."""
    k = cfg.images_per_style
    lo, hi = iv["fid_t_independent_ratio"]
    half = (hi - lo) / 2
    per_style = {}
    for i, n in enumerate(names):
        d_lo, d_hi = iv[("M", i, i)]
        floor = f[("M_ref", i)]
        per_style[n] = {
            "floor_std": float(reps[("M_ref", i)].std()),
            "diag_half_width_in_floors": (d_hi - d_lo) / 2 / floor if floor > 0 else None,
        }
        if spread:
            per_style[n]["diag_repeat_std"] = float(spread[("M", i, i)])
            per_style[n]["floor_repeat_std"] = float(spread[("M_ref", i)])
    return {
        "method": "paired bootstrap over (prompt, seed) items, basic intervals; "
        "accuracies: Wilson score",
        "confidence": cfg.confidence,
        "bootstrap": cfg.bootstrap,
        "repeats": cfg.repeats,
        "independent_ratio_half_width": half,
        # An infinite ratio (a zero floor) has no width to scale.
        "images_per_style_for_half_width": {
            str(t): images_needed(k * cfg.repeats, half, t) if math.isfinite(half) else None
            for t in (0.05, 0.1, 0.25, 0.5)
        },
        "per_style": per_style,
    }


def _check_target(cfg: EvaluateConfig, results: dict) -> None:
    if cfg.interval_target is None:
        return
    half = results["uncertainty"]["independent_ratio_half_width"]
    if math.isfinite(half) and half > cfg.interval_target:
        need = images_needed(cfg.images_per_style * cfg.repeats, half, cfg.interval_target)
        per_repeat = -(-need // cfg.repeats)
        raise DmmError(
            f"images_per_style={cfg.images_per_style} x repeats={cfg.repeats} gives "
            f"+/-{half:.3g} on the independent-seed ratio; +/-{cfg.interval_target:g} needs "
            f"about {per_repeat} images per style per repeat"
        )


def _convergence(cfg: EvaluateConfig, results: dict) -> None:
    if not (cfg.convergence and cfg.distill_dir is not None):
        return
    import tempfile

    from dmm.evaluation.studies import convergence

    if cfg.base is None:
        raise DmmError("convergence needs `base` (the base pipeline folder)")
    with tempfile.TemporaryDirectory(prefix="dmm-convergence-") as work:
        points = convergence(
            cfg.distill_dir, cfg.model_copy(update={"convergence": False}), cfg.base, Path(work)
        )
    points.append(
        {"step": "final", "fid_t": results["fid_t"], "fid_t_ratio": results["fid_t_ratio"]}
    )
    results["convergence"] = points


def _mixing(cfg, student, clf, first, extractor, device, results) -> dict | None:
    if not cfg.mixing or len(student.style_names) < 2:
        return None
    from dmm.evaluation.mixing import mixing_study

    study = mixing_study(cfg, student, clf, extractor, first, device)
    results["mixing"] = study["summary"]
    return study
