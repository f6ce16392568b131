"""Frechet distance between feature sets, computed in float64 with explicit checks.

FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}). The matrix square root
goes through the symmetric form S1^{1/2} S2 S1^{1/2}, whose eigenvalues are
real and non-negative up to round-off; large negative ones or a negative
result mean the estimate is broken, and we say so instead of clamping.
"""

from __future__ import annotations

import torch

from dmm.atomic import DmmError

# A d-dimensional covariance is singular below d + 1 samples and noisy until
# several times d; we refuse fewer than this multiple of the feature width.
MIN_SAMPLES_PER_DIM = 2


def min_samples(dim: int) -> int:
    return MIN_SAMPLES_PER_DIM * dim


def statistics(features: torch.Tensor, name: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    f = features.double()
    if f.ndim != 2:
        raise DmmError(f"{name}: expected (N, D) features, got shape {tuple(f.shape)}")
    n, d = f.shape
    if not torch.isfinite(f).all():
        raise DmmError(f"{name}: features contain NaN or inf")
    if n < min_samples(d):
        raise DmmError(
            f"{name}: {n} images are too few for a stable {d}-dim covariance "
            f"(need at least {min_samples(d)})"
        )
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (n - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance(
    mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor
) -> float:
    root1 = _sqrt_psd(s1)
    inner = root1 @ s2 @ root1
    evals = torch.linalg.eigvalsh((inner + inner.T) / 2)
    scale = max(float(evals.abs().max()), 1e-12)
    if float(evals.min()) < -1e-6 * scale:
        raise DmmError(
            f"Frechet distance is ill-defined: covariance product has eigenvalue {float(evals.min()):.3g}"
        )
    tr_sqrt = evals.clamp_min(0).sqrt().sum()
    fd = float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)
    if fd != fd or fd < -1e-6 * max(1.0, float(torch.trace(s1) + torch.trace(s2))):
        raise DmmError(f"Frechet distance came out invalid ({fd:.4g}); refusing to clamp it")
    return max(fd, 0.0)


def frechet_between(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str] = ("a", "b")) -> float:
    return frechet_distance(*statistics(a, names[0]), *statistics(b, names[1]))
