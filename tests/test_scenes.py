import numpy as np
import pytest

from dmm.zoo import scenes as S


def test_caption_grammar():
    s = S.Scene("triangle", "red", "top left", "large")
    assert s.caption == "a large red triangle at the top left"
    assert (
        S.Scene("circle", "blue", "center", "small").caption == "a small blue circle in the center"
    )


def test_split_holds_out_unseen_combos_with_full_vocabulary():
    train, test = S.split_combos(seed=3, held_out=12)
    assert len(test) == 12 and not set(train) & set(test)
    assert set(train) | set(test) == set(S.all_combos())
    for k in range(3):
        assert {c[k] for c in train} == {c[k] for c in S.all_combos()}
    assert S.split_combos(seed=3) == S.split_combos(seed=3)
    assert S.split_combos(seed=3) != S.split_combos(seed=4)


def test_render_is_deterministic_and_in_range():
    rng = np.random.default_rng(0)
    scenes = S.sample_scenes(S.all_combos(), 4, rng)
    a = S.render_batch(scenes, "neon")
    b = S.render_batch(scenes, "neon")
    assert a.shape == (4, S.IMAGE_SIZE, S.IMAGE_SIZE, 3) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


@pytest.mark.parametrize("shape", S.SHAPES)
def test_shape_is_drawn_where_the_caption_says(shape):
    for pos, (fx, fy) in S.POSITIONS.items():
        img = S.render(S.Scene(shape, "red", pos, "large"), "base")
        red = (img[..., 0] > 0.6) & (img[..., 1] < 0.4)
        ys, xs = np.nonzero(red)
        assert red.sum() > 30
        cx, cy = xs.mean() / S.IMAGE_SIZE, ys.mean() / S.IMAGE_SIZE
        assert abs(cx - fx) < 0.1 and abs(cy - fy) < 0.12, (pos, cx, cy)


def test_styles_are_far_apart():
    rng = np.random.default_rng(1)
    scenes = S.sample_scenes(S.all_combos(), 16, rng)
    means = {s: S.render_batch(scenes, s).mean(axis=(0, 1, 2)) for s in S.STYLES}
    names = list(means)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = np.abs(S.render_batch(scenes, a) - S.render_batch(scenes, b)).mean()
            # Teachers must be far apart; the base only needs to differ.
            assert diff > (0.05 if "base" in (a, b) else 0.1), (a, b, diff)


def test_unknown_style_is_rejected():
    with pytest.raises(ValueError, match="unknown style 'gothic'"):
        S.render(S.Scene("circle", "red", "center", "small"), "gothic")
