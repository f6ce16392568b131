import numpy as np
import torch
from diffusers import AutoencoderKL  # noqa: F401  (diffusers is importable alongside dmm)

from dmm.zoo import scenes as S
from dmm.zoo.autoencoder import PatchAutoencoder
from dmm.zoo.build import to_model_space


def _images(n=64, seed=0):
    rng = np.random.default_rng(seed)
    scenes = S.sample_scenes(S.all_combos(), n, rng)
    return torch.cat([to_model_space(S.render_batch(scenes, s, 2)) for s in ("base", "neon")])


def test_identity_patches_are_exact():
    ae = PatchAutoencoder(latent_channels=12, patch_size=2)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.allclose(ae(x), x, atol=1e-6)
    assert ae.encode(x).latent_dist.sample().shape == (2, 12, 4, 4)


def test_fit_reconstructs_and_scales_to_unit_variance():
    ae = PatchAutoencoder(latent_channels=4, patch_size=2)
    x = _images()
    rmse = ae.fit(x)
    assert rmse < 0.1
    z = ae.encode(x).latent_dist.mode() * ae.config.scaling_factor
    assert 0.9 < z.std().item() < 1.1
    assert ae.config.block_out_channels == [4, 4]  # diffusers' vae_scale_factor == 2


def test_fit_is_deterministic_and_round_trips(tmp_path):
    x = _images(32)
    a, b = PatchAutoencoder(latent_channels=4), PatchAutoencoder(latent_channels=4)
    a.fit(x)
    b.fit(x)
    assert torch.equal(a.components, b.components)
    a.save_pretrained(tmp_path)
    c = PatchAutoencoder.from_pretrained(tmp_path)
    assert torch.equal(c(x), a(x))
    assert c.config.scaling_factor == a.config.scaling_factor


def test_bad_patch_size():
    import pytest

    with pytest.raises(ValueError, match="power of two"):
        PatchAutoencoder(patch_size=3)
