"""SD1.5 at full size, without downloads.

Fast tests build the SD1.5 UNet, CLIP text encoder and VAE on the meta device
(shapes only) to check parameter counts and every LDM key name. Slow tests
(``-m slow``) allocate them: a single-file round trip through diffusers' own
importer, and one distillation step (benchmarks/sd15_plan.py prints the same
figures at 512 px).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmm.student.export import (
    text_encoder_ldm_name,
    unet_ldm_key_map,
    vae_ldm_name,
    vae_ldm_shape,
)
from dmm.teachers.sd15 import (
    SD15_TEXT_ENCODER_PARAMS,
    SD15_UNET_PARAMS,
    SD15_VAE_PARAMS,
    sd15_text_encoder,
    sd15_unet,
    sd15_vae,
    style_params,
)

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "benchmarks" / "sd15_plan.py"


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def meta_models():
    return sd15_unet(meta=True), sd15_text_encoder(meta=True), sd15_vae(meta=True)


def test_sd15_configs_give_sd15_sizes(meta_models):
    unet, text, vae = meta_models
    assert _count(unet) == SD15_UNET_PARAMS == 859_520_964
    assert _count(text) == SD15_TEXT_ENCODER_PARAMS == 123_060_480
    assert _count(vae) == SD15_VAE_PARAMS == 83_653_863
    assert unet.time_embedding.linear_1.out_features == 1280  # the style vectors' width
    assert style_params(8) == 2 * (1280 * 1280 + 1280) + 8 * 1280


def test_unet_ldm_names_are_sd15s_and_diffusers_maps_them_back(meta_models):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from dmm.student.model import student_unet_config

    unet = meta_models[0]
    state = unet.state_dict()
    names = unet_ldm_key_map(list(state), unet.config)
    assert len(names) == len(state) == 686
    ldm = set(names.values())
    for known in (  # names from SD1.5's original checkpoint
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
        "model.diffusion_model.middle_block.2.out_layers.3.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "model.diffusion_model.time_embed.2.weight",
        "model.diffusion_model.out.2.weight",
    ):
        assert known in ldm, known
    back = convert_ldm_unet_checkpoint({names[k]: v for k, v in state.items()}, unet.config)
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)  # the same tensor, so the same key

    config = student_unet_config(unet.config, 1280)
    with torch.device("meta"):
        from diffusers import UNet2DConditionModel

        student = UNet2DConditionModel.from_config(config)
    s_state = student.state_dict()
    s_names = unet_ldm_key_map(list(s_state), config)
    assert sorted(set(s_names.values()) - ldm) == [
        f"model.diffusion_model.label_emb.0.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")
    ]
    back = convert_ldm_unet_checkpoint({s_names[k]: v for k, v in s_state.items()}, config)
    assert all(back[k] is s_state[k] for k in s_state)


def test_text_encoder_and_vae_ldm_names(meta_models):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    _, text, vae = meta_models
    t_state = text.state_dict()
    t_names = {k: text_encoder_ldm_name(k) for k in t_state}
    assert len(set(t_names.values())) == 196
    assert (
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"
        in t_names.values()
    )
    back = convert_ldm_clip_checkpoint({t_names[k]: v for k, v in t_state.items()})
    back = {k.removeprefix("text_model."): v for k, v in back.items()}
    assert all(back[k] is t_state[k] for k in t_state)

    v_state = vae.state_dict()
    ldm = {
        "first_stage_model." + vae_ldm_name(k, vae.config): v.reshape(vae_ldm_shape(k, v.shape))
        for k, v in v_state.items()
    }
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in ldm
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert back.keys() == v_state.keys()
    assert all(back[k].shape == v_state[k].shape for k in v_state)


def _plan_module():
    spec = importlib.util.spec_from_file_location("sd15_plan", PLAN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_prints_the_8_teacher_gpu_plan(tmp_path, capsys):
    plan_mod = _plan_module()
    assert plan_mod.main(["--no-step", "--json", str(tmp_path / "plan.json")]) == 0
    text = capsys.readouterr().out
    assert "GPU memory plan: 8 SD1.5 teachers" in text
    assert "largest micro-batch that fits" in text
    data = json.loads((tmp_path / "plan.json").read_text())
    student = data["counts"]["student"]
    assert student == SD15_UNET_PARAMS + style_params(8)
    fixed = sum(data["plan"]["fixed"].values())
    assert fixed == pytest.approx(16 * student / 2**30)  # weights + grads + 2 AdamW states
    assert data["plan"]["placements"]["device"] == pytest.approx(8 * 2 * SD15_UNET_PARAMS / 2**30)
    assert data["plan"]["max_batch"]["device/full"] >= 20  # the paper's per-GPU batch fits


@pytest.mark.slow
def test_sd15_single_file_round_trip_is_exact(tmp_path):
    """Random SD1.5 weights -> folder -> our LDM export -> diffusers' own single-file
    loaders: every weight identical. fp16 (what SD1.5 teachers ship) halves the
    memory; the mapping does not depend on the dtype."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from dmm.student.export import export_single_file

    if _mem_available_gib() < 10:
        pytest.skip("needs about 10 GiB of free memory")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    folder = tmp_path / "sd15"
    models = {"unet": sd15_unet(), "text_encoder": sd15_text_encoder(), "vae": sd15_vae()}
    for name, model in models.items():
        model.half().save_pretrained(folder / name)
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "x"]})
    )
    file = tmp_path / "sd15.safetensors"
    info = export_single_file(folder, file)
    assert info["kind"] == "pipeline" and info["vae"] == "autoencoder_kl"

    def same(a: torch.nn.Module, b: torch.nn.Module) -> None:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k

    # diffusers loads single files as float32 unless told otherwise.
    kw = dict(config=str(folder), local_files_only=True, torch_dtype=torch.float16)
    unet = UNet2DConditionModel.from_single_file(str(file), subfolder="unet", **kw)
    same(models["unet"], unet)
    del unet
    vae = AutoencoderKL.from_single_file(str(file), subfolder="vae", **kw)
    same(models["vae"], vae)
    del vae
    text = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, load_file(file), subfolder="text_encoder", **kw
    )
    same(models["text_encoder"], text)
    # pytest keeps recent temp dirs; 4 GB of random weights should not linger.
    shutil.rmtree(folder)
    file.unlink()


@pytest.mark.slow
def test_one_distillation_step_at_sd15_size(tmp_path):
    """The benchmark's step (StyleStudent.from_base, bf16 teacher forward, score +
    feature loss, AdamW) at 32x32 latents to stay within the slow-test budget."""
    if _mem_available_gib() < 18:
        pytest.skip("needs about 17 GiB of free memory (fp32 student + AdamW + teacher)")
    out = subprocess.run(
        [sys.executable, str(PLAN), "--step-only", "--latent", "32", "--batch", "1"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        # About 3 minutes alone on two cores: most of it is building the fp32
        # models and paging 17 GiB in and out, not the step (about 50 s).
        timeout=480,
    )
    step = json.loads(out.stdout.strip().splitlines()[-1])
    assert step["weights_finite_after_step"]
    assert all(v == v and v >= 0 for v in step["losses"].values())
    assert step["losses"]["score"] > 0 and step["grad_norm"] > 0
    assert 0 < step["saved_activation_bytes_checkpointed"] < step["saved_activation_bytes"]
    assert step["rss"]["peak_gib"] < 20
