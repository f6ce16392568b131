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
import time
from pathlib import Path

import torch

from dmm.atomic import DmmError, atomic_dir
from dmm.evaluation.cache import ImageCache, to_8bit
from dmm.evaluation.classify import load_classifier, style_accuracy, style_probabilities
from dmm.evaluation.config import EvaluateConfig
from dmm.evaluation.features import make_extractor
from dmm.evaluation.frechet import frechet_distance, min_samples, statistics
from dmm.evaluation.sampling import load_pipeline, sample

log = logging.getLogger(__name__)


def _read_prompts(path: Path) -> list[str]:
    from dmm.data.prompts import read_prompts

    if not Path(path).is_file():
        raise DmmError(f"eval prompts not found: {path}")
    return read_prompts(path)


def eval_inputs(cfg: EvaluateConfig) -> tuple[list[str], list[int], list[int]]:
    """Prompts, seeds and reference seeds: the same for every model compared."""
    k = cfg.images_per_style
    prompts_all = _read_prompts(cfg.prompts)
    prompts = [prompts_all[i % len(prompts_all)] for i in range(k)]
    seeds = [cfg.seed + i for i in range(k)]
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


def fd_matrix(rows: list, cols: list) -> list[list[float]]:
    return [[frechet_distance(*r, *c) for c in cols] for r in rows]


def evaluate(cfg: EvaluateConfig, progress: bool = True) -> dict:
    """Run the protocol; writes evaluation.json, figures and report.html; returns the results."""
    t0 = time.perf_counter()
    names = [t.name for t in cfg.teachers]
    for t in cfg.teachers:
        if not (t.path / "model_index.json").is_file():
            raise DmmError(f"teacher {t.name!r}: pipeline folder not found: {t.path}")
    if not (Path(cfg.student) / "model_index.json").is_file():
        raise DmmError(f"student pipeline folder not found: {cfg.student}")
    for name, path in cfg.baselines.items():
        if not (Path(path) / "model_index.json").is_file():
            raise DmmError(f"baseline {name!r}: pipeline folder not found: {path}")
    extractor = make_extractor(cfg.feature_extractor, cfg.classifier, cfg.inception_weights)
    k = cfg.images_per_style
    if k < min_samples(extractor.dim):
        raise DmmError(
            f"images_per_style={k} is too few for a stable {extractor.dim}-dim covariance "
            f"({extractor.name} needs at least {min_samples(extractor.dim)})"
        )
    device = cfg.torch_device()
    student = load_pipeline(cfg.student, device)
    if list(student.style_names) != names:
        raise DmmError(
            f"style count/names differ: student has {len(student.style_names)} styles "
            f"({', '.join(student.style_names)}), teachers are {len(names)} ({', '.join(names)})"
        )
    clf = load_classifier(cfg.classifier)
    prompts, seeds, ref_seeds = eval_inputs(cfg)
    kw = dict(steps=cfg.steps, guidance_scale=cfg.guidance_scale, batch=cfg.batch_size)

    def desc(text: str) -> str | None:
        return text if progress else None

    teacher_imgs, teacher_ref_imgs = teacher_image_sets(
        cfg, prompts, seeds, ref_seeds, device, progress
    )
    student_imgs = {
        n: to_8bit(sample(student, prompts, seeds, style=n, desc=desc(f"student {n}"), **kw))
        for n in names
    }
    baseline_imgs = {
        b: to_8bit(
            sample(load_pipeline(p, device), prompts, seeds, desc=desc(f"baseline {b}"), **kw)
        )
        for b, p in cfg.baselines.items()
    }

    def stats(imgs: torch.Tensor, label: str):
        return statistics(extractor(imgs), label)

    t_stats = [stats(teacher_imgs[n], f"teacher {n}") for n in names]
    ref_stats = [stats(teacher_ref_imgs[n], f"teacher {n} (reference)") for n in names]
    s_stats = [stats(student_imgs[n], f"student {n}") for n in names]
    M = fd_matrix(s_stats, t_stats)
    M_ref = [frechet_distance(*ref_stats[i], *t_stats[i]) for i in range(len(names))]
    # M shares seeds with the teacher images, so a student that reproduces its
    # teacher image for image scores below the floor (ratio < 1). Against the
    # teacher's images under the reference seeds it shares nothing, like the
    # floor itself: there ~1 is as good as it gets.
    independent = [frechet_distance(*s_stats[i], *ref_stats[i]) for i in range(len(names))]
    fid_t = sum(M[i][i] for i in range(len(names)))
    fid_t_ref = sum(M_ref)
    off = [M[i][j] for i in range(len(names)) for j in range(len(names)) if i != j]
    diag_mean = fid_t / len(names)
    results: dict = {
        "feature_extractor": extractor.name,
        "feature_dim": extractor.dim,
        "styles": names,
        "images_per_style": k,
        "M": M,
        "M_ref": M_ref,
        "fid_t": fid_t,
        "fid_t_ref": fid_t_ref,
        "fid_t_ratio": fid_t / fid_t_ref if fid_t_ref > 0 else float("inf"),
        "M_diag_independent_seeds": independent,
        "fid_t_independent_ratio": sum(independent) / fid_t_ref if fid_t_ref > 0 else float("inf"),
        "off_diagonal_mean": sum(off) / len(off) if off else None,
        "separation": (sum(off) / len(off)) / diag_mean if off and diag_mean > 0 else None,
        "style_accuracy": style_accuracy(clf, student_imgs),
        "teacher_accuracy": style_accuracy(clf, teacher_imgs),
        "paired_mse": {n: float((student_imgs[n] - teacher_imgs[n]).pow(2).mean()) for n in names},
        "baselines": {},
        "sampler": {"steps": cfg.steps, "guidance_scale": cfg.guidance_scale, "seed": cfg.seed},
    }
    for b, imgs in baseline_imgs.items():
        b_stat = stats(imgs, f"baseline {b}")
        row = [frechet_distance(*b_stat, *t_stats[j]) for j in range(len(names))]
        probs = style_probabilities(clf, imgs).argmax(-1)
        cls_names = list(clf.config.heads["style"])
        acc = {
            n: float((probs == cls_names.index(n)).float().mean()) if n in cls_names else None
            for n in names
        }
        known = [v for v in acc.values() if v is not None]
        results["baselines"][b] = {
            "fid_t": sum(row),
            "fid_t_ratio": sum(row) / fid_t_ref if fid_t_ref > 0 else float("inf"),
            "M_row": row,
            "style_accuracy": acc,
            "mean_style_accuracy": sum(known) / len(known) if known else None,
        }
    strip = None
    if cfg.interpolate or len(names) >= 2:
        a, b = cfg.interpolate or (names[0], names[1])
        strip = interpolation(student, clf, a, b, prompts[:16], seeds[:16], cfg, kw)
        results["interpolation"] = strip["summary"]
    if cfg.convergence and cfg.distill_dir is not None:
        import tempfile

        from dmm.evaluation.studies import convergence

        if cfg.base is None:
            raise DmmError("convergence needs `base` (the base pipeline folder)")
        with tempfile.TemporaryDirectory(prefix="dmm-convergence-") as work:
            points = convergence(
                cfg.distill_dir, cfg.model_copy(update={"convergence": False}), cfg.base, Path(work)
            )
        points.append({"step": "final", "fid_t": fid_t, "fid_t_ratio": results["fid_t_ratio"]})
        results["convergence"] = points
    results["seconds"] = round(time.perf_counter() - t0, 1)

    from dmm.evaluation.report import write_report

    out = Path(cfg.output_dir)
    with atomic_dir(out) as tmp:
        (tmp / "evaluation.json").write_text(json.dumps(results, indent=2))
        write_report(
            tmp, results, teacher_imgs, student_imgs, baseline_imgs, strip,
            metrics_file=(cfg.distill_dir / "metrics.jsonl") if cfg.distill_dir else None,
        )  # fmt: skip
    return results


@torch.no_grad()
def interpolation(student, clf, a: str, b: str, prompts, seeds, cfg: EvaluateConfig, kw) -> dict:
    """Classifier probabilities along style = (1 - w) * a + w * b."""
    names = list(student.style_names)
    cls_names = list(clf.config.heads["style"])
    ws = [i / (cfg.interpolation_points - 1) for i in range(cfg.interpolation_points)]
    images, p_a, p_b = [], [], []
    for w in ws:
        imgs = sample(
            student,
            prompts,
            seeds,
            style={a: 1 - w, b: w} if 0 < w < 1 else (a if w == 0 else b),
            **kw,
        )
        probs = style_probabilities(clf, imgs)
        p_a.append(float(probs[:, cls_names.index(a)].mean()))
        p_b.append(float(probs[:, cls_names.index(b)].mean()))
        images.append(imgs[:4])
    monotonic = all(x >= y - 1e-9 for x, y in zip(p_a, p_a[1:], strict=False)) and all(
        x <= y + 1e-9 for x, y in zip(p_b, p_b[1:], strict=False)
    )
    del names
    return {
        "images": images,
        "summary": {
            "from": a,
            "to": b,
            "weights": ws,
            "p_from": p_a,
            "p_to": p_b,
            "monotonic": monotonic,
        },
    }
