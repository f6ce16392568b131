"""``dmm export --style``: a style (or mix) folded into a plain SD1.5 model.

The base here is a tiny model with SD1.5's *layout* (four UNet levels, two
layers per level, cross-attention in the first three; an AutoencoderKL), so its
single-file keys can be compared name for name with real SD1.5's, and
``StableDiffusionPipeline.from_single_file`` reads it as an SD1.5 checkpoint.
Tolerances stated here, about 10x what was measured on this model (see
benchmarks/RESULTS.md): folded fp32 UNet vs student UNet within 1e-5 absolute
(measured 7e-7, output mean magnitude 0.2); images in [0, 1] within 1e-5 from
fp32 weights (measured 6e-7) and 5e-3 from fp16 weights (measured 4e-4).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel
from typer.testing import CliRunner

from dmm import DMMStudentPipeline, StyleStudent
from dmm.atomic import DmmError
from dmm.student.export import (
    LDM_TEXT,
    LDM_VAE,
    ldm_to_unet_state,
    text_encoder_ldm_name,
    unet_ldm_key_map,
    vae_ldm_name,
)
from dmm.student.fold import export_style, fold_style
from dmm.zoo.build import make_pipeline, vocabulary
from dmm.zoo.models import MAX_TOKENS, TEXT_WIDTH, make_autoencoder, make_text_encoder
from dmm.zoo.tokenizer import BOS, EOS, build_tokenizer

STYLES = ["pastel", "neon", "sepia"]
MIX = {"pastel": 0.25, "sepia": 0.75}
GEN = dict(height=32, width=32, num_inference_steps=3, guidance_scale=3.0, output_type="pt")
PROMPT = "a red circle"
UNET_TOL = 1e-5
IMAGE_TOL = {"fp32": 1e-5, "fp16": 5e-3}

SD15_UNET = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12)
SD15_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_sd15_unet() -> UNet2DConditionModel:
    shape = dict(SD15_UNET, block_out_channels=(16, 32, 32, 32), cross_attention_dim=TEXT_WIDTH)
    return UNet2DConditionModel(**{**shape, "sample_size": 16}, norm_num_groups=8)


def _tiny_kl() -> AutoencoderKL:
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def _base(root: Path, vae) -> Path:
    torch.manual_seed(0)
    tokenizer = build_tokenizer(vocabulary(), root / "_tok", MAX_TOKENS)
    vocab = tokenizer.get_vocab()
    text_encoder = make_text_encoder(len(vocab), vocab[BOS], vocab[EOS])
    make_pipeline(_tiny_sd15_unet(), text_encoder, tokenizer, vae).save_pretrained(root / "base")
    return root / "base"


def _student(base_dir: Path, out: Path) -> Path:
    base = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    student = StyleStudent.from_base(base, STYLES, seed=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a zero style MLP would make every style identical
        for p in student.unet.class_embedding.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    student.save_pipeline(out, base_dir)
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return _base(tmp_path_factory.mktemp("base"), _tiny_kl())


@pytest.fixture(scope="module")
def student_dir(base_dir, tmp_path_factory) -> Path:
    return _student(base_dir, tmp_path_factory.mktemp("student") / "student")


@pytest.fixture(scope="module")
def student(student_dir) -> DMMStudentPipeline:
    pipe = DMMStudentPipeline.from_pretrained(student_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, **kw) -> torch.Tensor:
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **GEN, **kw).images


def _from_single_file(path: Path, base_dir: Path, dtype=torch.float32) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(base_dir),
        local_files_only=True,
        torch_dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd15_keys() -> set[str]:
    """Every key of an original SD1.5 checkpoint (UNet, CLIP ViT-L text encoder, VAE).

    The names come from this project's diffusers -> LDM map, checked here against
    diffusers' own LDM -> diffusers converter on the full-size SD1.5 UNet.
    """
    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
        vae = AutoencoderKL(**SD15_VAE)
    unet_keys = list(unet.state_dict())
    ldm = unet_ldm_key_map(unet_keys, unet.config)
    fake = {v: torch.zeros(1) for v in ldm.values()}
    assert set(ldm_to_unet_state(fake, unet.config)) == set(unet_keys)
    keys = set(ldm.values())
    keys |= {text_encoder_ldm_name(k) for k in text.state_dict()}
    keys |= {LDM_VAE + vae_ldm_name(k, vae.config) for k in vae.state_dict()}
    return keys


def _unet_out(unet, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 5, TEXT_WIDTH, generator=g)
    dtype = unet.dtype
    out = unet(x.to(dtype), torch.tensor([10, 700]), text.to(dtype), return_dict=False, **kw)
    return out[0].float()


@pytest.mark.parametrize("style", ["neon", 2, MIX])
def test_folded_unet_equals_the_student_unet(student, style):
    folded = fold_style(student.unet, student.style_codebook, style)
    assert folded.config.class_embed_type is None and folded.class_embedding is None
    labels = student.style_codebook.embed(style, 2)
    with torch.no_grad():
        want = _unet_out(student.unet, class_labels=labels)
        got = _unet_out(folded)
        other = _unet_out(student.unet, class_labels=student.style_codebook.embed("pastel", 2))
    assert float((want - got).abs().max()) < UNET_TOL
    assert float((want - other).abs().max()) > 100 * UNET_TOL  # styles differ: the test can fail


@pytest.mark.parametrize("style", ["neon", MIX])
def test_single_file_loads_in_diffusers_and_matches_the_student(
    student, student_dir, base_dir, tmp_path, style
):
    out = tmp_path / "style.safetensors"
    export_style(student_dir, out, style, fmt="single-file")
    with safe_open(str(out), framework="pt") as fh:
        keys = set(fh.keys())
    assert keys <= _sd15_keys(), sorted(keys - _sd15_keys())[:5]
    assert any(k.startswith(LDM_TEXT) for k in keys) and any(k.startswith(LDM_VAE) for k in keys)
    plain = _from_single_file(out, base_dir)
    assert plain.unet.config.class_embed_type is None
    want, got = _images(student, style=style), _images(plain)
    assert float((want - got).abs().max()) < IMAGE_TOL["fp32"]
    assert float((want - _images(student, style="pastel")).abs().max()) > 10 * IMAGE_TOL["fp32"]


def test_fp16_diffusers_folder(student, student_dir, tmp_path):
    out = tmp_path / "neon-fp16"
    export_style(student_dir, out, "neon", dtype="fp16")
    with safe_open(str(out / "unet/diffusion_pytorch_model.safetensors"), framework="pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}
    assert not (out / "style_codebook").exists()
    # fp16 weights, fp32 arithmetic (CPU half kernels are partial).
    plain = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    got = _images(plain.to(torch.float32))
    assert float((_images(student, style="neon") - got).abs().max()) < IMAGE_TOL["fp16"]


def test_fp16_single_file(student, student_dir, base_dir, tmp_path):
    out = tmp_path / "neon16.safetensors"
    export_style(student_dir, out, "neon", fmt="single-file", dtype="fp16")
    with safe_open(str(out), framework="pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}
    plain = _from_single_file(out, base_dir).to(torch.float32)
    got = _images(plain.to(torch.float32))
    assert float((_images(student, style="neon") - got).abs().max()) < IMAGE_TOL["fp16"]


@pytest.mark.parametrize(
    ("style", "fmt", "message"),
    [
        ("nope", "diffusers", "unknown style 'nope'"),
        ({"pastel": -1, "neon": 2}, "diffusers", "non-negative"),
        ({"pastel": 0, "neon": 0}, "diffusers", "positive sum"),
        ({"pastel": 0.5, "retired": 0.5}, "single-file", "unknown style 'retired'"),
        ("neon", "ckpt", "unknown format"),
    ],
)
def test_bad_styles_are_one_line_errors_and_write_nothing(
    student_dir, tmp_path, style, fmt, message
):
    out = tmp_path / ("x.safetensors" if fmt == "single-file" else "x")
    with pytest.raises(DmmError, match=message) as err:
        export_style(student_dir, out, style, fmt=fmt)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_single_file_refuses_a_non_sd15_student(tmp_path_factory, tmp_path):
    # The zoo's own layout: three levels, one layer each, and a PatchAutoencoder.
    from dmm.zoo.models import make_unet

    root = tmp_path_factory.mktemp("zoo-base")
    torch.manual_seed(0)
    tokenizer = build_tokenizer(vocabulary(), root / "_tok", MAX_TOKENS)
    vocab = tokenizer.get_vocab()
    text_encoder = make_text_encoder(len(vocab), vocab[BOS], vocab[EOS])
    make_pipeline(make_unet(16), text_encoder, tokenizer, make_autoencoder()).save_pretrained(
        root / "base"
    )
    student_dir = _student(root / "base", root / "student")
    out = tmp_path / "x.safetensors"
    with pytest.raises(DmmError, match="needs an AutoencoderKL|SD1.5-shaped"):
        export_style(student_dir, out, "neon", fmt="single-file")
    assert not out.exists()
    # An SDXL-style UNet (added conditioning) is refused by name.
    from dmm.student.fold import check_sd15_layout

    with pytest.raises(DmmError, match="addition_embed_type='text_time'"):
        check_sd15_layout({**SD15_UNET, "addition_embed_type": "text_time"}, "AutoencoderKL")


def test_export_style_cli(student_dir, tmp_path):
    from dmm.cli import app

    runner = CliRunner()
    out = tmp_path / "mix.safetensors"
    args = ["export", "--student", str(student_dir), "--out", str(out)]
    res = runner.invoke(
        app, [*args, "--style", '{"pastel": 1, "sepia": 3}', "--format", "single-file"]
    )
    assert res.exit_code == 0, res.output
    assert "folded in" in res.output and out.is_file()
    bad = runner.invoke(app, [*args[:-1], str(tmp_path / "y"), "--style", "nope"])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "unknown style" in bad.output
    assert not (tmp_path / "y").exists()
