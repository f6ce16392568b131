"""The FID_t protocol: Frechet distance maths, bad input, and sanity on real zoo models."""

from __future__ import annotations

import json

import pytest
import torch

from dmm.atomic import DmmError
from dmm.evaluation.config import EvaluateConfig
from dmm.evaluation.frechet import frechet_between, frechet_distance, min_samples, statistics


def test_frechet_of_identical_sets_is_zero_and_mean_shift_adds_its_square():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    assert frechet_between(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = torch.zeros(8, dtype=torch.float64)
    shift[0] = 3.0
    assert frechet_between(a, a + shift) == pytest.approx(9.0, abs=1e-6)


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    s1 = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64))
    s2 = torch.diag(torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64))
    # sum (sqrt(a) - sqrt(b))^2 + |mu1 - mu2|^2 = 1 + 1 + 4 + 3
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(9.0)


def test_too_few_images_nan_features_and_invalid_results_are_refused():
    with pytest.raises(
        DmmError, match=r"too few for a stable 8-dim covariance \(need at least 16\)"
    ):
        statistics(torch.randn(10, 8))
    assert min_samples(64) == 128
    bad = torch.randn(100, 4)
    bad[3, 1] = float("nan")
    with pytest.raises(DmmError, match="NaN"):
        statistics(bad)
    not_psd = torch.tensor([[1.0, 0.0], [0.0, -5.0]], dtype=torch.float64)
    ok = torch.eye(2, dtype=torch.float64)
    with pytest.raises(DmmError, match="ill-defined|invalid"):
        frechet_distance(torch.zeros(2), not_psd, torch.zeros(2), ok)


def _student_from_base(base_dir, names, out):
    from diffusers import UNet2DConditionModel

    from dmm.student.model import StyleStudent

    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    StyleStudent.from_base(unet, names).save_pipeline(out, base_dir)
    return out


def _cfg(zoo, student, teachers, tmp_path, **kw):
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps({"prompt": p})
            for p in ["a small red circle in the center", "a large blue square at the top left"]
        )
    )
    base = dict(
        student=student, teachers=[{"name": n, "path": p} for n, p in teachers.items()],
        prompts=prompts, classifier=zoo / "classifier", output_dir=tmp_path / "eval",
        images_per_style=128, steps=3, batch_size=128,
    )  # fmt: skip
    base.update(kw)
    return EvaluateConfig(**base)


def test_student_identical_to_its_teacher_scores_at_the_floor(mini_zoo, tmp_path):
    from dmm.evaluation.protocol import evaluate

    zoo, _ = mini_zoo
    student = _student_from_base(zoo / "base", ["base"], tmp_path / "student")
    r = evaluate(_cfg(zoo, student, {"base": zoo / "base"}, tmp_path), progress=False)
    # Same seeds and an identical model: the diagonal is exactly zero, below the
    # floor set by other seeds.
    assert r["M"][0][0] == pytest.approx(0.0, abs=1e-6)
    assert r["fid_t"] <= r["fid_t_ref"]
    # Against the teacher's other-seed images the identical student IS the floor.
    assert r["fid_t_independent_ratio"] == pytest.approx(1.0, rel=1e-3)
    out = tmp_path / "eval"
    saved = json.loads((out / "evaluation.json").read_text())
    for key in ("feature_extractor", "styles", "M", "M_ref", "fid_t", "fid_t_ref", "fid_t_ratio",
                "style_accuracy", "teacher_accuracy", "baselines"):  # fmt: skip
        assert key in saved
    assert saved["feature_extractor"] == "dmm-stylenet"
    # Every figure has an interval that contains it, and the floor its own spread.
    iv = saved["intervals"]
    for key in ("fid_t_ratio", "fid_t_independent_ratio", "fid_t_ref"):
        assert iv[key][0] <= saved[key] <= iv[key][1], key
    assert iv["M_ref"][0][0] <= saved["M_ref"][0] <= iv["M_ref"][0][1]
    assert iv["M_ref"][0][1] > iv["M_ref"][0][0]
    assert saved["uncertainty"]["per_style"]["base"]["floor_std"] > 0
    page = (out / "report.html").read_text()
    assert page.count("<img") >= 2
    head = page[: page.index("<h2>")]
    assert "1.0 is the floor" in head and "lower is better" in head and "date:" in head
    assert "<details><summary>Raw results" in page
    assert "e+0" not in page[: page.index("<details>")]


def test_teacher_images_are_cached_across_evaluations_and_score_alike(mini_zoo, tmp_path):
    from dmm.evaluation import protocol

    zoo, _ = mini_zoo
    student = _student_from_base(zoo / "base", ["pastel"], tmp_path / "student")
    teachers = {"pastel": zoo / "teachers/pastel"}
    cfg = _cfg(zoo, student, teachers, tmp_path, cache_dir=tmp_path / "cache")
    first = protocol.evaluate(cfg, progress=False)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # teacher + reference seeds

    sampled = []
    real_sample = protocol.sample

    def counting(pipe, *args, **kw):
        sampled.append(type(pipe).__name__)
        return real_sample(pipe, *args, **kw)

    protocol.sample = counting
    try:
        second = protocol.evaluate(cfg, progress=False)
    finally:
        protocol.sample = real_sample
    assert sampled == ["DMMStudentPipeline"]  # the teacher came from the cache
    assert second["M"] == first["M"] and second["M_ref"] == first["M_ref"]
    assert second["intervals"] == first["intervals"]  # the bootstrap is seeded
    # Another sampler is another key: nothing stale is reused.
    protocol.evaluate(cfg.model_copy(update={"steps": 2}), progress=False)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4


def test_bad_inputs_are_clear(mini_zoo, tmp_path):
    from dmm.evaluation.protocol import evaluate

    zoo, manifest = mini_zoo
    student = _student_from_base(zoo / "base", ["base"], tmp_path / "student")
    teachers = {"pastel": zoo / "teachers/pastel", "neon": zoo / "teachers/neon"}
    with pytest.raises(DmmError, match="style count/names differ: student has 1"):
        evaluate(_cfg(zoo, student, teachers, tmp_path), progress=False)
    with pytest.raises(DmmError, match="too few for a stable 64-dim covariance"):
        evaluate(
            _cfg(zoo, student, {"base": zoo / "base"}, tmp_path, images_per_style=50),
            progress=False,
        )
    with pytest.raises(DmmError, match="student pipeline folder not found"):
        evaluate(_cfg(zoo, tmp_path / "nope", {"base": zoo / "base"}, tmp_path), progress=False)
    with pytest.raises(DmmError, match="teacher 'x': pipeline folder not found"):
        evaluate(_cfg(zoo, student, {"x": tmp_path / "nope"}, tmp_path), progress=False)
    with pytest.raises(DmmError, match="Inception weights file not found: .*missing.pth"):
        evaluate(
            _cfg(zoo, student, {"base": zoo / "base"}, tmp_path, feature_extractor="inception",
                 inception_weights=tmp_path / "missing.pth"),
            progress=False,
        )  # fmt: skip
    assert not (tmp_path / "eval").exists()


def test_inception_without_torch_fidelity_says_what_to_install(tmp_path, monkeypatch):
    import torchmetrics.image.fid

    from dmm.evaluation.features import make_extractor

    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"\0")
    monkeypatch.setattr(torchmetrics.image.fid, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(DmmError, match=r"torch-fidelity and torchvision: install both by hand"):
        make_extractor("inception", weights=weights)


@pytest.mark.slow
def test_wrong_model_scores_clearly_worse_than_the_floor(full_zoo, tmp_path):
    """The base alone, asked for every style, is far from the teachers."""
    from dmm.evaluation.protocol import evaluate

    zoo, manifest = full_zoo
    names = ["pastel", "neon", "sepia"]
    student = _student_from_base(zoo / "base", names, tmp_path / "student")
    teachers = {n: zoo / manifest["teachers"][n]["path"] for n in names}
    r = evaluate(_cfg(zoo, student, teachers, tmp_path, steps=10), progress=False)
    assert r["fid_t_ratio"] > 5.0, r["fid_t_ratio"]
    assert min(r["teacher_accuracy"].values()) > 0.8


def test_evaluation_device_resolves_and_unknown_devices_are_refused():
    cfg = EvaluateConfig(teachers=[{"name": "a", "path": "x"}])
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert cfg.torch_device().type == want
    assert cfg.model_copy(update={"device": "cpu"}).torch_device().type == "cpu"
    with pytest.raises(ValueError, match="device"):
        EvaluateConfig(teachers=[{"name": "a", "path": "x"}], device="warp-drive")
