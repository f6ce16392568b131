"""Confidence intervals: coverage on synthetic Gaussians, the 1/sqrt(K) law, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from dmm.atomic import DmmError
from dmm.evaluation.frechet import frechet_distance, statistics
from dmm.evaluation.intervals import (
    Moments,
    check_bootstrap,
    frechet_replicates,
    images_needed,
    interval,
    min_replicates,
    resample_counts,
    wilson_interval,
)
from dmm.evaluation.scores import centre, ratio

D, K = 6, 120
MU = torch.full((D,), 0.3, dtype=torch.float64)
SCALE = torch.linspace(0.6, 1.6, D, dtype=torch.float64).sqrt()


def _draw(g: torch.Generator) -> dict[str, torch.Tensor]:
    """A teacher X, a student Y (another Gaussian) and X again under other seeds (the floor)."""
    x = torch.randn(K, D, generator=g, dtype=torch.float64)
    y = MU + SCALE * torch.randn(K, D, generator=g, dtype=torch.float64)
    z = torch.randn(K, D, generator=g, dtype=torch.float64)
    return {"x": x, "y": y, "z": z}


def _fd(a, b) -> float:
    return frechet_distance(*statistics(a), *statistics(b))


def _binomial_band(p: float, n: int, sigmas: float = 3.5) -> tuple[float, float]:
    sd = math.sqrt(p * (1 - p) / n)
    return p - sigmas * sd, p + sigmas * sd


def test_fd_and_floor_and_ratio_intervals_cover_their_value_at_the_nominal_rate():
    """90% intervals over 150 independent draws cover the known value 85-95% of the time.

    The known value is what the figure averages at K images (the protocol's
    target; the floor's population value is 0, it exists only at finite K),
    found here by simulating 3000 independent evaluations.
    """
    g = torch.Generator().manual_seed(0)
    sims = [_draw(g) for _ in range(3000)]
    fd_true = sum(_fd(s["y"], s["x"]) for s in sims) / len(sims)
    floor_true = sum(_fd(s["z"], s["x"]) for s in sims) / len(sims)
    ratio_true = fd_true / floor_true
    # The population FD differs from what K images give on average: the bias is real.
    pop = float(MU.pow(2).sum() + (1 - SCALE).pow(2).sum())
    assert fd_true > pop * 1.1
    trials, hits = 150, {"fd": 0, "floor": 0, "ratio": 0}
    for _ in range(trials):
        s = _draw(g)
        counts = resample_counts(K, 200, g)
        m = {k: Moments.of(v, counts) for k, v in s.items()}
        fd, floor = _fd(s["y"], s["x"]), _fd(s["z"], s["x"])
        r_fd, r_floor = frechet_replicates(m["y"], m["x"]), frechet_replicates(m["z"], m["x"])
        # As scores.score_repeat and derive do: replicates centred, ratios log-linear.
        r_fd, r_floor = centre(r_fd, torch.tensor(fd)), centre(r_floor, torch.tensor(floor))
        for key, est, reps, truth in (
            ("fd", fd, r_fd, fd_true),
            ("floor", floor, r_floor, floor_true),
            ("ratio", fd / floor, ratio(r_fd, r_floor), ratio_true),
        ):
            lo, hi = interval(est, reps, 0.9)
            assert lo <= est <= hi
            hits[key] += lo <= truth <= hi
    low, high = _binomial_band(0.9, trials)
    rates = {key: h / trials for key, h in hits.items()}
    assert low <= rates["fd"] <= high and low <= rates["ratio"] <= high, rates
    # The floor compares a distribution with itself: there resampling inflates
    # the spread (the bootstrap sets differ by the estimate's own bias), so its
    # interval is conservative, never too narrow.
    assert rates["floor"] >= low, rates


def test_replicates_match_the_point_estimate_when_every_item_is_drawn_once():
    g = torch.Generator().manual_seed(1)
    s = _draw(g)
    ones = torch.ones(3, K, dtype=torch.float64)
    reps = frechet_replicates(Moments.of(s["y"], ones), Moments.of(s["x"], ones))
    assert torch.allclose(reps, torch.full((3,), _fd(s["y"], s["x"]), dtype=torch.float64))
    counts = resample_counts(K, 7, g)
    assert counts.shape == (7, K) and torch.all(counts.sum(1) == K)


def test_interval_width_shrinks_like_one_over_sqrt_k_and_predicts_the_images_needed():
    g = torch.Generator().manual_seed(2)

    def width(k: int) -> float:
        x = torch.randn(k, D, generator=g, dtype=torch.float64)
        y = MU + SCALE * torch.randn(k, D, generator=g, dtype=torch.float64)
        c = resample_counts(k, 300, g)
        lo, hi = interval(_fd(y, x), frechet_replicates(Moments.of(y, c), Moments.of(x, c)), 0.9)
        return (hi - lo) / 2

    w_small = sum(width(100) for _ in range(6)) / 6
    w_big = sum(width(400) for _ in range(6)) / 6
    assert w_big / w_small == pytest.approx(0.5, rel=0.3)
    assert images_needed(100, w_small, w_small / 2) == 400
    with pytest.raises(DmmError, match="positive"):
        images_needed(100, 0.1, 0.0)


def test_wilson_interval_keeps_a_width_at_perfect_accuracy_and_covers():
    lo, hi = wilson_interval(128, 128, 0.9)
    assert hi == 1.0 and 0.97 < lo < 1.0
    g = torch.Generator().manual_seed(3)
    hits = 0
    for _ in range(400):
        k = int((torch.rand(128, generator=g) < 0.8).sum())
        lo, hi = wilson_interval(k, 128, 0.9)
        hits += lo <= 0.8 <= hi
    low, high = _binomial_band(0.9, 400)
    assert low <= hits / 400 <= high


def test_too_few_bootstrap_replicates_for_the_confidence_name_how_many():
    assert min_replicates(0.9) == 100
    check_bootstrap(100, 0.9)
    with pytest.raises(DmmError, match=r"too few for a 95% interval \(need at least 200\)"):
        check_bootstrap(150, 0.95)


def test_an_interval_target_the_images_cannot_reach_names_the_images_needed():
    from dmm.evaluation.config import EvaluateConfig
    from dmm.evaluation.protocol import _check_target

    cfg = EvaluateConfig(teachers=[{"name": "a", "path": "x"}], images_per_style=128,
                         repeats=2, interval_target=0.1)  # fmt: skip
    results = {"uncertainty": {"independent_ratio_half_width": 0.3}}
    with pytest.raises(DmmError, match=r"\+/-0.1 needs about 1152 images per style per repeat"):
        _check_target(cfg, results)
    _check_target(cfg, {"uncertainty": {"independent_ratio_half_width": 0.05}})


@pytest.mark.parametrize(
    "override, expect",
    [("repeats=0", "repeats"), ("confidence=1.5", "confidence"), ("bootstrap=0", "bootstrap")],
)
def test_bad_uncertainty_settings_are_one_line_errors(tmp_path, override, expect):
    from typer.testing import CliRunner

    from dmm.cli import app

    cfg = tmp_path / "e.yaml"
    cfg.write_text("evaluate:\n  teachers: [{name: a, path: x}]\n")
    r = CliRunner().invoke(app, ["evaluate", "--config", str(cfg), "--set", override])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 2 and len(lines) == 1 and expect in lines[0], r.output
