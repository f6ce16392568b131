"""The miniature SDXL-shaped zoo: built in seconds, loads and samples as plain diffusers SDXL."""

from __future__ import annotations

import json
import time

import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection
from typer.testing import CliRunner

from dmm.cli import app
from dmm.teachers.validate import folder_family


def test_sdxl_miniature_builds_in_seconds_and_generates_with_diffusers(tmp_path):
    out = tmp_path / "zoo"
    start = time.perf_counter()
    args = ["zoo", "build", "--family", "sdxl", "--miniature", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - start < 30
    manifest = json.loads((out / "zoo.json").read_text())
    assert manifest["family"] == "sdxl" and len(manifest["teachers"]) == 2
    images = []
    for folder in [out / "base", *(out / t["path"] for t in manifest["teachers"].values())]:
        assert folder_family(folder) == "sdxl"
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
        assert type(pipe.text_encoder) is CLIPTextModel
        assert type(pipe.text_encoder_2) is CLIPTextModelWithProjection
        cfg = pipe.unet.config
        assert cfg.addition_embed_type == "text_time"
        widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        assert cfg.cross_attention_dim == widths
        pipe.set_progress_bar_config(disable=True)
        image = pipe(
            "a small red circle in the center", num_inference_steps=2, height=16, width=16,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).images  # fmt: skip
        assert image.shape == (1, 16, 16, 3) and float(image.std()) > 0
        images.append(image)
    # The teachers are other weights, so other images from the same seed.
    assert not (images[0] == images[1]).all()


def test_sdxl_zoo_bad_options_are_one_line(tmp_path):
    for args, needle in (
        (["--family", "sdxl"], "only as --miniature"),
        (["--family", "sd3", "--miniature"], "unknown zoo family 'sd3'"),
    ):
        result = CliRunner().invoke(app, ["zoo", "build", *args, "--out", str(tmp_path / "z")])
        assert result.exit_code == 2, result.output
        assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "z").exists()
