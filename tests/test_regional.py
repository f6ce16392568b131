"""Regional multi-style generation: each region denoised under its own style."""

from __future__ import annotations

import pytest
import torch

from dmm.atomic import DmmError
from dmm.student.regional import region_weights

H, W = 64, 128  # two 64x64 halves; the zoo's classifier sees 32x32 patches
LEFT, RIGHT = (0, 0, 64, 64), (64, 0, 128, 64)
STYLES = ["pastel", "neon"]


def test_weights_are_smooth_normalised_and_local():
    w = region_weights([(LEFT, "a"), (RIGHT, "b")], H, W, scale=4, feather=1)
    assert w.shape == (2, 16, 32)
    torch.testing.assert_close(w.sum(0), torch.ones(16, 32))
    assert torch.equal(w[0, :, :15], torch.ones(16, 15))  # far from the border: pure
    assert torch.equal(w[0, :, 17:], torch.zeros(16, 15))
    row = w[0, 0, 14:18]
    assert row.tolist() == sorted(row.tolist(), reverse=True) and 0 < row[1] < 1
    heavy = region_weights([(LEFT, "a"), ((0, 0, 128, 64), "b", 3.0)], H, W, scale=4)
    torch.testing.assert_close(heavy[0, 0, 0], torch.tensor(0.25))


@pytest.mark.parametrize(
    "regions, message",
    [
        ([(torch.ones(32, 32), "a")], "region 0: mask is 32x32 (WxH), but the image is 128x64"),
        ([(LEFT, "a"), (LEFT, "b", -1.0), (RIGHT, "a")], "weights sum to zero at"),
        ([(LEFT, "a")], "weights sum to zero at 240 of 512 latent pixels"),
        ([((0, 0, 200, 64), "a")], "is not inside the 128x64 image"),
        ([], "style_regions is empty"),
        ([(LEFT,)], "expected (mask_or_box, style)"),
    ],
)
def test_bad_regions_are_one_line_errors(regions, message):
    with pytest.raises(DmmError) as info:
        region_weights(regions, H, W, scale=4)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def student_dir(distill_data, tmp_path_factory):
    """A two-style student distilled briefly from the mini zoo."""
    from dmm.distill.trainer import distill
    from tests.test_distill import make_cfg

    out = tmp_path_factory.mktemp("regional") / "run"
    return distill(make_cfg(distill_data, out, STYLES, steps=30, checkpoint_every=30))


@pytest.fixture(scope="module")
def student(student_dir):
    from dmm.student.generate import load_student_pipeline

    return load_student_pipeline(student_dir)


def _render(pipe, **kw):
    gen = torch.Generator().manual_seed(0)
    kw = {"num_inference_steps": 6, "guidance_scale": 3.0, "output_type": "pt", **kw}
    return pipe("a red circle", height=H, width=W, generator=gen, **kw).images[0]


def test_regions_reduce_to_plain_style_and_reject_bad_styles(student):
    plain = _render(student, style="neon")
    whole = _render(student, style_regions=[((0, 0, W, H), "neon")])
    split = _render(student, style_regions=[(LEFT, "neon"), (RIGHT, "neon")])
    assert (whole - plain).abs().max() < 1e-5 and (split - plain).abs().max() < 1e-5
    with pytest.raises(DmmError, match="region 1: unknown style 'gothic'"):
        _render(student, style_regions=[(LEFT, "neon"), (RIGHT, "gothic")])
    with pytest.raises(ValueError, match="not both"):
        _render(student, style="neon", style_regions=[(LEFT, "neon")])


def patch_shares(clf, image, names, stride=8, size=32):
    """Per region: the share of size x size patches inside it classified as its style."""
    from dmm.evaluation.classify import style_probabilities

    classes = list(clf.config.heads["style"])
    shares = {}
    for (x0, y0, x1, y1), name in zip((LEFT, RIGHT), names, strict=True):
        patches = [
            image[:, y : y + size, x : x + size]
            for y in range(y0, y1 - size + 1, stride)
            for x in range(x0, x1 - size + 1, stride)
        ]
        pred = style_probabilities(clf, torch.stack(patches)).argmax(-1)
        shares[name] = float((pred == classes.index(name)).float().mean())
    return shares


def test_two_region_image_takes_each_style_in_its_region(student, mini_zoo):
    from dmm.evaluation.classify import load_classifier

    zoo, manifest = mini_zoo
    clf = load_classifier(zoo / manifest["classifier"])
    mixed = _render(student, style_regions=[(LEFT, STYLES[0]), (RIGHT, STYLES[1])])
    pure = {s: _render(student, style=s) for s in STYLES}
    # Each half is much closer to its own style's image than to the other's.
    for (x0, _, x1, _), own, other in ((LEFT, *STYLES), (RIGHT, *STYLES[::-1])):
        d_own = (mixed[:, :, x0 + 8 : x1 - 8] - pure[own][:, :, x0 + 8 : x1 - 8]).abs().mean()
        d_other = (mixed[:, :, x0 + 8 : x1 - 8] - pure[other][:, :, x0 + 8 : x1 - 8]).abs().mean()
        assert d_own < 0.5 * d_other, (own, float(d_own), float(d_other))
    shares = patch_shares(clf, mixed, STYLES)
    reference = {s: patch_shares(clf, pure[s], [s, s])[s] for s in STYLES}
    print(f"regional patch accuracy {shares}; single-style images {reference}")
    assert set(shares) == set(STYLES) and all(0 <= v <= 1 for v in shares.values())


def test_cli_region_flag(student_dir, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from dmm.cli import app

    def run(*regions, out=tmp_path / "gen"):
        args = ["generate", "--student", str(student_dir), "--out", str(out), "--steps", "2"]
        args += ["--size", f"{W}x{H}", *sum((["--region", r] for r in regions), [])]
        return CliRunner().invoke(app, [*args, "a red circle"])

    r = run("0,0,64,64=pastel", "64,0,128,64=neon")
    assert r.exit_code == 0, r.output
    (png,) = (tmp_path / "gen").glob("*.png")
    assert Image.open(png).size == (W, H)
    for regions, message in [
        (["0,0,64,64=pastel", "64,0,128,64=gothic"], "region 1: unknown style 'gothic'"),
        (["0,0,64,64=pastel"], "weights sum to zero"),
        (["0,0,64=pastel"], "--region must look like X0,Y0,X1,Y1=STYLE"),
    ]:
        r = run(*regions, out=tmp_path / "bad")
        assert r.exit_code == 2 and message in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
