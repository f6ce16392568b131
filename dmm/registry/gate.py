"""The evaluation gate: may a student become ``champion``?

One pydantic model holds the thresholds, so params.yaml, the Dagster asset check
and any script agree on what "passed" means.

Every figure of an evaluation carries a confidence interval (evaluation.json's
``intervals``), and every criterion here fails only when the evidence is
outside it: a bar fails when the figure's whole interval lies beyond the bar,
and an old style regresses only when its FD exceeds the parent's by more than
a tolerance counted in the style's reference floors *and* by more than the two
evaluations' combined noise. So re-evaluating the same student under other
sample seeds does not flip the verdict, while a broken style still fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from dmm.names import DIAG_METRIC

# MLflow metric names of the per-style figures the gate reads back from a
# parent champion's run (written by tracking.evaluation_metrics).
DIAG_LO_METRIC = "eval/M_diag_lo/"
DIAG_HI_METRIC = "eval/M_diag_hi/"
FLOOR_METRIC = "eval/M_ref/"
# A scalar figure's interval ends are logged as <name>_lo and <name>_hi.
LO_SUFFIX, HI_SUFFIX = "_lo", "_hi"


class GateThresholds(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_fid_t_ratio: float = Field(
        10.0, gt=0, description="shared-seed FD_t / reference floor; fails when its interval "
        "lies wholly above",
    )  # fmt: skip
    max_independent_ratio: float = Field(
        10.0, gt=0, description="independent-seed FD_t / reference floor (1.0 = the floor); "
        "fails when its interval lies wholly above",
    )  # fmt: skip
    min_relative_style_accuracy: float = Field(
        0.9,
        ge=0,
        description="per style: student style accuracy >= this x the teacher's accuracy "
        "(fails when the student's whole interval is below)",
    )
    baseline_ratio_factor: float = Field(
        0.1,
        gt=0,
        description="student FD_t ratio <= this x the best static baseline's ratio (1.0: beat it)",
    )
    old_style_tolerance: float = Field(
        0.5,
        ge=0,
        description="incremental merges: an old style regresses when its diagonal FD exceeds "
        "the parent champion's by more than this many reference floors and by more than "
        "the combined interval",
    )


@dataclass
class StyleScore:
    """One style's diagonal FD with its interval and floor (a parent champion's record)."""

    fd: float
    lo: float | None = None
    hi: float | None = None
    floor: float | None = None


@dataclass
class GateCriterion:
    name: str
    value: float
    threshold: float
    passed: bool
    detail: str
    interval: tuple[float, float] | None = None


@dataclass
class GateResult:
    passed: bool
    criteria: list[GateCriterion] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [c.detail for c in self.criteria if not c.passed]

    def summary(self) -> str:
        if self.passed:
            return f"all {len(self.criteria)} criteria passed"
        return "; ".join(self.failures)


def _iv(results: dict, key: str, point: float) -> tuple[float, float]:
    """The figure's interval; an evaluation.json written before intervals has none."""
    got = (results.get("intervals") or {}).get(key)
    return (float(got[0]), float(got[1])) if got else (point, point)


def _fmt_iv(iv: tuple[float, float]) -> str:
    return f"[{iv[0]:.3g}, {iv[1]:.3g}]"


def parent_from_results(results: dict) -> dict[str, StyleScore]:
    """Each style's StyleScore from an evaluation.json (the parent's own evaluation)."""
    ivs = (results.get("intervals") or {}).get("M")
    out = {}
    for i, name in enumerate(results["styles"]):
        lo, hi = ivs[i][i] if ivs else (None, None)
        out[name] = StyleScore(results["M"][i][i], lo, hi, results["M_ref"][i])
    return out


def parent_from_metrics(metrics: Mapping[str, float]) -> dict[str, StyleScore]:
    """Each style's StyleScore from a parent run's MLflow metrics (evaluation_metrics' names)."""
    out = {}
    for key, value in metrics.items():
        if key.startswith(DIAG_METRIC):
            name = key.removeprefix(DIAG_METRIC)
            out[name] = StyleScore(
                float(value),
                metrics.get(DIAG_LO_METRIC + name),
                metrics.get(DIAG_HI_METRIC + name),
                metrics.get(FLOOR_METRIC + name),
            )
    return out


def _bar(name: str, label: str, value: float, iv, limit: float) -> GateCriterion:
    passed = iv[0] <= limit
    return GateCriterion(
        name, value, limit, passed,
        f"{label} {value:.3f} {_fmt_iv(iv)} (max {limit:g}"
        f"{'' if passed else ', whole interval above'})",
        iv,
    )  # fmt: skip


def _ratio_criteria(results: dict, thresholds: GateThresholds) -> list[GateCriterion]:
    ratio = float(results["fid_t_ratio"])
    out = []
    if results.get("fid_t_independent_ratio") is not None:
        ind = float(results["fid_t_independent_ratio"])
        out.append(
            _bar(
                "independent_ratio",
                "independent-seed ratio",
                ind,
                _iv(results, "fid_t_independent_ratio", ind),
                thresholds.max_independent_ratio,
            )  # fmt: skip
        )
    out.append(
        _bar(
            "fid_t_ratio",
            "shared-seed FD_t ratio",
            ratio,
            _iv(results, "fid_t_ratio", ratio),
            thresholds.max_fid_t_ratio,
        )  # fmt: skip
    )
    baselines = results.get("baselines") or {}
    if baselines:
        best_name, best = min(baselines.items(), key=lambda kv: kv[1]["fid_t_ratio"])
        limit = thresholds.baseline_ratio_factor * float(best["fid_t_ratio"])
        iv = _iv(results, "fid_t_ratio", ratio)
        out.append(
            GateCriterion(
                "vs_best_baseline",
                ratio,
                limit,
                iv[0] <= limit,
                f"FD_t ratio {ratio:.3f} {_fmt_iv(iv)} vs best static merge {best_name} "
                f"{best['fid_t_ratio']:.4g} (max {limit:.4g} = "
                f"{thresholds.baseline_ratio_factor:g} x)",
                iv,
            )  # fmt: skip
        )
    return out


def _accuracy_criteria(results: dict, thresholds: GateThresholds) -> list[GateCriterion]:
    out = []
    ivs = (results.get("intervals") or {}).get("style_accuracy") or {}
    for name in results["styles"]:
        if results["style_accuracy"][name] is None or results["teacher_accuracy"][name] is None:
            continue  # the style classifier does not know this style: no accuracy bar
        student = float(results["style_accuracy"][name])
        teacher = float(results["teacher_accuracy"][name])
        iv = tuple(ivs[name]) if ivs.get(name) else (student, student)
        need = thresholds.min_relative_style_accuracy * teacher
        out.append(
            GateCriterion(
                f"style_accuracy/{name}",
                student,
                need,
                iv[1] >= need,
                f"style {name}: accuracy {student:.2f} {_fmt_iv(iv)} (needs {need:.2f} = "
                f"{thresholds.min_relative_style_accuracy:g} x teacher {teacher:.2f})",
                iv,
            )  # fmt: skip
        )
    return out


def _old_style(results: dict, i: int, name: str, before: StyleScore, tol: float) -> GateCriterion:
    now = float(results["M"][i][i])
    ivs = (results.get("intervals") or {}).get("M")
    lo, hi = ivs[i][i] if ivs else (now, now)
    floor = before.floor if before.floor is not None else float(results["M_ref"][i])
    # The two evaluations' noise on the difference: this one's lower half-width
    # and the parent's upper one, added in quadrature (independent samples).
    noise = math.hypot(now - lo, (before.hi - before.fd) if before.hi is not None else 0.0)
    margin = max(tol * floor, noise)
    limit = before.fd + margin
    passed = now <= limit
    return GateCriterion(
        f"old_style/{name}", now, limit, passed,
        f"old style {name}: FD {now:.4g} {_fmt_iv((lo, hi))} vs parent champion "
        f"{before.fd:.4g} (max {limit:.4g} = parent + max({tol:g} x floor {floor:.3g}, "
        f"noise {noise:.3g}))",
        (lo, hi),
    )  # fmt: skip


def check_gate(
    results: dict,
    thresholds: GateThresholds,
    previous: Mapping[str, float | StyleScore] | None = None,
) -> GateResult:
    """Judge an ``evaluation.json`` (as written by ``dmm evaluate``) against the thresholds.

    ``previous`` (incremental merges) maps each old style to the parent
    champion's diagonal FD: a bare float, or a StyleScore with its interval and
    floor (``parent_from_metrics``), which lets the parent's own noise count.
    """
    criteria = _ratio_criteria(results, thresholds) + _accuracy_criteria(results, thresholds)
    index = {name: i for i, name in enumerate(results["styles"])}
    for name, before in sorted((previous or {}).items()):
        if name not in index:
            continue  # retired
        if not isinstance(before, StyleScore):
            before = StyleScore(float(before))
        criteria.append(
            _old_style(results, index[name], name, before, thresholds.old_style_tolerance)
        )
    return GateResult(all(c.passed for c in criteria), criteria)
