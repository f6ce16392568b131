"""Mixing quality (the paper's Table 3 analogue): DMM style mixing against weight averaging.

Along a path between two styles a and b (weights w = 0 .. 1), the student is
asked for style (1 - w) a + w b, and the two teachers' UNets are averaged with
weights (1 - w, w) (``dmm.merge``'s ``weighted`` method; text encoder, VAE and
scheduler stay teacher a's). At every point: the style classifier's
probabilities of a and b, and the FD to each endpoint teacher. A good mix
moves from a to b steadily: ``max_step`` is the largest change of p(b)
between neighbouring points (an even path has 1 / (points - 1)).
"""

from __future__ import annotations

import copy

import torch

from dmm.atomic import DmmError
from dmm.evaluation.classify import style_probabilities
from dmm.evaluation.frechet import frechet_between, min_samples
from dmm.evaluation.sampling import load_pipeline, sample


def weight_average(pipe_a, pipe_b, w: float):
    """A copy of ``pipe_a`` whose UNet is (1 - w) UNet_a + w UNet_b."""
    from dmm.merge.methods import merge_tensor

    out = copy.deepcopy(pipe_a)
    sa, sb = pipe_a.unet.state_dict(), pipe_b.unet.state_dict()
    merged = {
        k: merge_tensor("weighted", k, v, [v, sb[k]], weights=[1 - w, w]) for k, v in sa.items()
    }
    out.unet.load_state_dict(merged)
    return out


def _path_figures(images: list[torch.Tensor], clf, a: str, b: str, ends, extractor) -> dict:
    cls_names = list(clf.config.heads["style"])
    p_a, p_b, fd_a, fd_b = [], [], [], []
    can_fd = len(images[0]) >= min_samples(extractor.dim)
    for imgs in images:
        probs = style_probabilities(clf, imgs)
        p_a.append(float(probs[:, cls_names.index(a)].mean()) if a in cls_names else None)
        p_b.append(float(probs[:, cls_names.index(b)].mean()) if b in cls_names else None)
        feats = extractor(imgs)
        fd_a.append(frechet_between(feats, ends[0], ("path", a)) if can_fd else None)
        fd_b.append(frechet_between(feats, ends[1], ("path", b)) if can_fd else None)
    known = None not in p_b
    steps = [y - x for x, y in zip(p_b, p_b[1:], strict=False)] if known else []
    return {
        "p_from": p_a,
        "p_to": p_b,
        "fd_from": fd_a,
        "fd_to": fd_b,
        "monotonic": bool(steps) and all(s >= -1e-9 for s in steps),
        "max_step": max((abs(s) for s in steps), default=None),
    }


@torch.no_grad()
def mixing_study(cfg, student, clf, extractor, first: dict, device) -> dict:
    """Both paths' figures, and a few images per point of each (for the report's strips)."""
    names = [t.name for t in cfg.teachers]
    a, b = cfg.interpolate or (names[0], names[1])
    if a not in names or b not in names or a == b:
        raise DmmError(
            f"interpolate: need two different styles of {', '.join(names)}, got {a}, {b}"
        )
    m = min(cfg.mixing_images, cfg.images_per_style)
    prompts, seeds = first["prompts"][:m], first["seeds"][:m]
    ws = [i / (cfg.interpolation_points - 1) for i in range(cfg.interpolation_points)]
    kw = dict(steps=cfg.steps, guidance_scale=cfg.guidance_scale, batch=cfg.batch_size)
    paths = {"dmm": [], "weight_average": []}
    teachers = {t.name: t.path for t in cfg.teachers}
    pipe_a, pipe_b = load_pipeline(teachers[a], device), load_pipeline(teachers[b], device)
    for w in ws:
        if w in (0, 1):  # the endpoints were sampled already, under the same seeds
            end = a if w == 0 else b
            paths["dmm"].append(first["student"][end][:m])
            paths["weight_average"].append(first["teacher"][end][:m])
            continue
        style = {a: 1 - w, b: w}
        paths["dmm"].append(sample(student, prompts, seeds, style=style, **kw))
        merged = weight_average(pipe_a, pipe_b, w)
        paths["weight_average"].append(sample(merged, prompts, seeds, **kw))
    ends = (extractor(first["teacher"][a][:m]), extractor(first["teacher"][b][:m]))
    summary = {"from": a, "to": b, "weights": ws, "images": m}
    for method, images in paths.items():
        summary[method] = _path_figures(images, clf, a, b, ends, extractor)
    strips = {method: [imgs[:4] for imgs in images] for method, images in paths.items()}
    return {"summary": summary, "images": strips}
