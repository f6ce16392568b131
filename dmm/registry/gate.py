"""The evaluation gate: may a student become ``champion``?

One pydantic model holds the thresholds, so params.yaml, the Dagster asset check
and any script agree on what "passed" means.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field


class GateThresholds(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_fid_t_ratio: float = Field(
        10.0, gt=0, description="FD_t / FD_t(reference floor); the paper reaches 1.035"
    )
    min_relative_style_accuracy: float = Field(
        0.9,
        ge=0,
        description="per style: student style accuracy >= this x the teacher's accuracy",
    )
    baseline_ratio_factor: float = Field(
        0.1,
        gt=0,
        description="student FD_t ratio <= this x the best static baseline's ratio (1.0: beat it)",
    )
    max_old_style_regression: float = Field(
        0.10,
        ge=0,
        description="incremental merges: each old style's diagonal FD may exceed the previous "
        "champion's by at most this fraction",
    )


@dataclass
class GateCriterion:
    name: str
    value: float
    threshold: float
    passed: bool
    detail: str


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


def check_gate(
    results: dict, thresholds: GateThresholds, previous_diag: dict[str, float] | None = None
) -> GateResult:
    """Judge an ``evaluation.json`` (as written by ``dmm evaluate``) against the thresholds.

    ``previous_diag`` (incremental merges) maps each old style to the previous
    champion's diagonal FD; an old style that regressed beyond the tolerance fails.
    """
    criteria: list[GateCriterion] = []
    ratio = float(results["fid_t_ratio"])
    criteria.append(
        GateCriterion(
            "fid_t_ratio",
            ratio,
            thresholds.max_fid_t_ratio,
            ratio <= thresholds.max_fid_t_ratio,
            f"FD_t ratio {ratio:.3f} (max {thresholds.max_fid_t_ratio:g})",
        )
    )
    for name in results["styles"]:
        if results["style_accuracy"][name] is None or results["teacher_accuracy"][name] is None:
            continue  # the style classifier does not know this style: no accuracy bar
        student = float(results["style_accuracy"][name])
        teacher = float(results["teacher_accuracy"][name])
        need = thresholds.min_relative_style_accuracy * teacher
        criteria.append(
            GateCriterion(
                f"style_accuracy/{name}",
                student,
                need,
                student >= need,
                f"style {name}: accuracy {student:.2f} (needs {need:.2f} = "
                f"{thresholds.min_relative_style_accuracy:g} x teacher {teacher:.2f})",
            )
        )
    baselines = results.get("baselines") or {}
    if baselines:
        best_name, best = min(baselines.items(), key=lambda kv: kv[1]["fid_t_ratio"])
        limit = thresholds.baseline_ratio_factor * float(best["fid_t_ratio"])
        criteria.append(
            GateCriterion(
                "vs_best_baseline",
                ratio,
                limit,
                ratio <= limit,
                f"FD_t ratio {ratio:.3f} vs best static baseline {best_name} "
                f"{best['fid_t_ratio']:.3f} (max {limit:.3f})",
            )
        )
    index = {name: i for i, name in enumerate(results["styles"])}
    for name, before in sorted((previous_diag or {}).items()):
        if name not in index:
            continue  # retired
        now = float(results["M"][index[name]][index[name]])
        limit = before * (1 + thresholds.max_old_style_regression)
        criteria.append(
            GateCriterion(
                f"old_style/{name}",
                now,
                limit,
                now <= limit,
                f"old style {name}: FD {now:.3f} vs previous champion {before:.3f} "
                f"(max {limit:.3f}, +{thresholds.max_old_style_regression:.0%})",
            )
        )
    return GateResult(all(c.passed for c in criteria), criteria)
