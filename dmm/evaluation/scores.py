"""Every Frechet-distance figure of the protocol, with its bootstrap replicates.

A figure is keyed by a tuple: ("M", i, j) = FD(student as style i, teacher j),
("M_ref", i) = FD(teacher i under the reference seeds, teacher i) (the floor),
("indep", i) = FD(student as style i, teacher i under the reference seeds),
("base", b, j) = FD(baseline b, teacher j). The aggregates (FD_t, both ratios,
the separation, each baseline's FD_t) are derived by one function that runs
on point estimates and on replicate vectors alike, so an interval always
belongs to exactly the figure it is printed next to.
"""

from __future__ import annotations

import torch

from dmm.evaluation.frechet import frechet_distance, statistics
from dmm.evaluation.intervals import Moments, frechet_replicates, interval, resample_counts

Key = tuple


def fd_pairs(names: list[str], baselines: list[str]) -> dict[Key, tuple[str, str]]:
    """Which two feature sets each figure compares (set names as in ``feature_sets``)."""
    pairs: dict[Key, tuple[str, str]] = {}
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            pairs[("M", i, j)] = (f"student/{a}", f"teacher/{b}")
        pairs[("M_ref", i)] = (f"reference/{a}", f"teacher/{a}")
        pairs[("indep", i)] = (f"student/{a}", f"reference/{a}")
    for name in baselines:
        for j, b in enumerate(names):
            pairs[("base", name, j)] = (f"baseline/{name}", f"teacher/{b}")
    return pairs


def score_repeat(
    feats: dict[str, torch.Tensor],
    pairs: dict[Key, tuple[str, str]],
    replicates: int,
    generator: torch.Generator,
) -> tuple[dict[Key, torch.Tensor], dict[Key, torch.Tensor]]:
    """Point estimates (0-d) and (B,) bootstrap replicates of every pair's FD."""
    stats = {name: statistics(f, name) for name, f in feats.items()}
    points = {
        k: torch.tensor(frechet_distance(*stats[a], *stats[b]), dtype=torch.float64)
        for k, (a, b) in pairs.items()
    }
    n = next(iter(feats.values())).shape[0]
    counts = resample_counts(n, replicates, generator)
    moments = {name: Moments.of(f, counts) for name, f in feats.items()}
    reps = {k: frechet_replicates(moments[a], moments[b]) for k, (a, b) in pairs.items()}
    reps = {k: centre(r, points[k]) for k, r in reps.items()}
    return points, reps


def centre(replicates: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Replicates shifted so that their mean is the estimate.

    A replicate compares two resampled sets, which differ more than the
    originals (duplicates add their own finite-sample bias, as large as the
    estimate itself where two sets share a distribution, as for the floor).
    Centring removes that extra bias so that sums of replicates of different
    pairs stay comparable; their spread is kept (for the floor it is then on
    the wide side: its intervals are conservative).
    """
    return replicates - replicates.mean() + estimate


def ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b for estimates; for replicate vectors, to first order in the log.

    Centred replicates of a small floor can come near 0 or below, where a plain
    quotient explodes; the log-linear form keeps the quotient's relative
    spread (that of a plus that of b) and stays positive.
    """
    if a.ndim == 0:
        return a / b
    ma, mb = a.mean(), b.mean()
    if ma <= 0 or mb <= 0:
        return a / b
    return ma / mb * torch.exp((a - ma) / ma - (b - mb) / mb)


def derive(fd: dict[Key, torch.Tensor], names: list[str], baselines: list[str]) -> dict:
    """The aggregate figures from per-pair FDs (0-d point values or (B,) replicates)."""
    n = len(names)
    diag = sum(fd[("M", i, i)] for i in range(n))
    ref = sum(fd[("M_ref", i)] for i in range(n))
    indep = sum(fd[("indep", i)] for i in range(n))
    out = {
        "fid_t": diag,
        "fid_t_ref": ref,
        "fid_t_ratio": ratio(diag, ref),
        "fid_t_independent": indep,
        "fid_t_independent_ratio": ratio(indep, ref),
    }
    if n > 1:
        off = sum(fd[("M", i, j)] for i in range(n) for j in range(n) if i != j) / (n * n - n)
        out["off_diagonal_mean"] = off
        out["separation"] = ratio(off, diag / n)
    for b in baselines:
        total = sum(fd[("base", b, j)] for j in range(n))
        out[f"baseline/{b}/fid_t"] = total
        out[f"baseline/{b}/fid_t_ratio"] = ratio(total, ref)
    return out


def combine(per_repeat: list[tuple[dict, dict]]) -> tuple[dict, dict, dict]:
    """Mean over repeats of points and of replicates, and the spread of the points.

    Each repeat drew its own resampling, so the averaged replicates describe
    the uncertainty of the averaged figure.
    """
    keys = per_repeat[0][0]
    points = {k: torch.stack([p[k] for p, _ in per_repeat]).mean(0) for k in keys}
    reps = {k: torch.stack([r[k] for _, r in per_repeat]).mean(0) for k in keys}
    spread = {
        k: torch.stack([p[k] for p, _ in per_repeat]).std(0) for k in keys if len(per_repeat) > 1
    }
    return points, reps, spread


def intervals(points: dict, reps: dict, confidence: float) -> dict:
    """[lo, hi] for every key; all these figures are non-negative."""
    return {k: interval(float(points[k]), reps[k], confidence) for k in points}
