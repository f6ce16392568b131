"""Confidence intervals for the protocol's figures: a paired bootstrap over images.

Every set of images (student as style i, teacher j, teacher j under the
reference seeds, each baseline) is drawn on the same K (prompt, seed) items, so
one bootstrap replicate resamples the K items once and applies that draw to
every set: correlations between sets (a student that follows its teacher image
for image) survive the resampling, and every figure derived from the same
replicate (FD_t, the floor, both ratios) stays consistent.

A replicate is a vector of counts (how often each item was drawn), so the
means and covariances of all replicates are two batched matrix products, and
the Frechet distances are batched symmetric eigendecompositions: a few hundred
replicates of 64-d features cost a second or two.

What an interval covers: the value this figure takes *on average at this K*
(images per style), i.e. what re-evaluating the same models under fresh
prompts and seeds would give. That, not the population distance, is what the
protocol's figures mean: the reference floor's population value is 0, it
exists only as the finite-K bias of the estimator, and FD_t / floor compares
two figures biased alike. So the interval is the estimate minus the
replicates' deviations from *their own mean* (a basic bootstrap that keeps
the estimator's bias rather than removing it), and it always contains the
estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dmm.atomic import DmmError

# A percentile at confidence c rests on about B * (1 - c) / 2 replicates in each
# tail; below this many the interval's ends are themselves noise.
MIN_TAIL_REPLICATES = 5


def min_replicates(confidence: float) -> int:
    return math.ceil(round(2 * MIN_TAIL_REPLICATES / (1 - confidence), 6))


def check_bootstrap(replicates: int, confidence: float) -> None:
    need = min_replicates(confidence)
    if replicates < need:
        raise DmmError(
            f"bootstrap={replicates} replicates are too few for a {confidence:.0%} interval "
            f"(need at least {need})"
        )


def resample_counts(n: int, replicates: int, generator: torch.Generator) -> torch.Tensor:
    """(B, n) float64 counts: replicate b draws item k counts[b, k] times (sum n)."""
    idx = torch.randint(0, n, (replicates, n), generator=generator)
    counts = torch.zeros(replicates, n, dtype=torch.float64)
    return counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))


@dataclass
class Moments:
    """Means (B, d) and covariances (B, d, d) of one feature set under every replicate."""

    mu: torch.Tensor
    cov: torch.Tensor
    _root: torch.Tensor | None = None

    @classmethod
    def of(cls, features: torch.Tensor, counts: torch.Tensor) -> Moments:
        f = features.double()
        n = f.shape[0]
        mu = counts @ f / n
        second = torch.einsum("bn,nd,ne->bde", counts, f, f)
        cov = (second - n * mu[:, :, None] * mu[:, None, :]) / (n - 1)
        return cls(mu, cov)

    @property
    def root(self) -> torch.Tensor:
        if self._root is None:
            evals, evecs = torch.linalg.eigh((self.cov + self.cov.mT) / 2)
            self._root = (evecs * evals.clamp_min(0).sqrt()[:, None, :]) @ evecs.mT
        return self._root


def frechet_replicates(a: Moments, b: Moments) -> torch.Tensor:
    """(B,) Frechet distances between two sets under each replicate.

    Round-off can make tiny eigenvalues negative; the point estimate
    (``frechet_distance``) already refuses broken statistics, so here they are
    clamped like any replicate of a valid estimate.
    """
    inner = a.root @ b.cov @ a.root
    evals = torch.linalg.eigvalsh((inner + inner.mT) / 2).clamp_min(0)
    mean_term = (a.mu - b.mu).pow(2).sum(-1)
    traces = torch.diagonal(a.cov, dim1=-2, dim2=-1).sum(-1)
    traces = traces + torch.diagonal(b.cov, dim1=-2, dim2=-1).sum(-1)
    return (mean_term + traces - 2 * evals.sqrt().sum(-1)).clamp_min(0)


def interval(estimate: float, replicates: torch.Tensor, confidence: float) -> list[float]:
    """[lo, hi] for the figure's expected value at this K; clipped at 0 (all figures are >= 0)."""
    alpha = (1 - confidence) / 2
    r = replicates.double()
    r = r[torch.isfinite(r)]
    if r.numel() == 0 or estimate != estimate or estimate in (float("inf"), float("-inf")):
        return [estimate, estimate]
    q = torch.quantile(r, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    centre = float(r.mean())
    lo, hi = estimate - (float(q[1]) - centre), estimate - (float(q[0]) - centre)
    # Degenerate replicates (a student identical to its teacher: every FD at
    # round-off) can leave the estimate outside; it always belongs inside.
    return [max(0.0, min(lo, estimate)), max(hi, estimate)]


def wilson_interval(successes: float, n: int, confidence: float) -> list[float]:
    """Wilson score interval for a proportion.

    Accuracies sit at or near 1.0, where a bootstrap collapses to a single
    point; Wilson's interval keeps a width there (about 1 - z^2 / n at 100%).
    """
    z = float(torch.distributions.Normal(0, 1).icdf(torch.tensor(0.5 + confidence / 2)))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def images_needed(n: int, half_width: float, target: float) -> int:
    """Images per style for an interval of half-width ``target``, by the 1/sqrt(K) law."""
    if target <= 0:
        raise DmmError(f"interval target must be positive, got {target}")
    return max(1, math.ceil(n * (half_width / target) ** 2))
