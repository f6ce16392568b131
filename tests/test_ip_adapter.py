"""IP-Adapter on a student: a tiny CLIP image encoder and adapter, built offline.

The adapter goes through diffusers' own ``load_ip_adapter`` (the file layout of
the released IP-Adapter weights: ``image_proj.*`` and ``ip_adapter.<n>.to_k_ip``),
so this is the path a user takes with a real adapter.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

PROMPT = "a red circle"


def build_adapter(unet, folder, projection_dim: int = 16, seed: int = 0):
    """An IP-Adapter folder for ``unet``: image_encoder/ + ip_adapter.safetensors."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=224, patch_size=32, projection_dim=projection_dim,
    )  # fmt: skip
    CLIPVisionModelWithProjection(cfg).save_pretrained(folder / "image_encoder")
    cross = unet.config.cross_attention_dim
    state = {
        "image_proj.proj.weight": 0.5 * torch.randn(4 * cross, projection_dim, generator=g),
        "image_proj.proj.bias": torch.zeros(4 * cross),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    # One to_k_ip/to_v_ip pair per cross-attention, numbered 1, 3, 5, ... in
    # attn_processors order, shaped like that attention's own to_k/to_v.
    cross_attn = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    for i, name in enumerate(cross_attn):
        attn = unet.get_submodule(name[: -len(".processor")])
        for proj in ("to_k", "to_v"):
            shape = getattr(attn, proj).weight.shape
            state[f"ip_adapter.{2 * i + 1}.{proj}_ip.weight"] = torch.randn(shape, generator=g)
    save_file(state, folder / "ip_adapter.safetensors")
    return folder


@pytest.fixture(scope="module")
def pipe(mini_zoo):
    from dmm.distill.teachers import load_unet
    from dmm.student.model import StyleStudent
    from dmm.student.pipeline import build_student_pipeline

    zoo, _ = mini_zoo
    base_unet = load_unet(zoo / "base")
    student = StyleStudent.from_base(base_unet, ["ink", "neon"], seed=0)
    with torch.no_grad():  # styles that visibly differ, as after distillation
        torch.manual_seed(1)
        student.unet.class_embedding.linear_2.weight.normal_(0, 0.5)
    p = build_student_pipeline(student, zoo / "base")
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, style, **kw):
    gen = torch.Generator().manual_seed(0)
    kw = {"num_inference_steps": 4, "guidance_scale": 3.0, "output_type": "pt", **kw}
    return pipe(PROMPT, style=style, generator=gen, **kw).images


def test_ip_adapter_loads_changes_the_output_and_style_still_counts(pipe, tmp_path):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from PIL import Image

    before = _run(pipe, "ink")
    build_adapter(pipe.unet, tmp_path)
    pipe.load_ip_adapter(
        str(tmp_path), subfolder="", weight_name="ip_adapter.safetensors",
        image_encoder_folder="image_encoder", local_files_only=True,
    )  # fmt: skip
    pipe.set_ip_adapter_scale(1.0)
    procs = pipe.unet.attn_processors
    ip_procs = [p for n, p in procs.items() if isinstance(p, IPAdapterAttnProcessor2_0)]
    assert pipe.image_encoder is not None and pipe.unet.encoder_hid_proj is not None
    assert len(ip_procs) == sum(n.endswith("attn2.processor") for n in procs) > 0
    rng = torch.Generator().manual_seed(2)
    pixels = (torch.rand(64, 64, 3, generator=rng) * 255).byte().numpy()
    image = Image.fromarray(pixels)
    ink = _run(pipe, "ink", ip_adapter_image=image)
    neon = _run(pipe, "neon", ip_adapter_image=image)
    pipe.set_ip_adapter_scale(0.0)
    ink_off = _run(pipe, "ink", ip_adapter_image=image)
    adapter_effect = (ink - before).abs().max().item()
    style_effect = (neon - ink).abs().max().item()
    off_effect = (ink_off - before).abs().max().item()
    means = [(a - b).abs().mean().item() for a, b in ((ink, before), (neon, ink))]
    print(
        f"IP-Adapter max|mean abs pixel change: adapter {adapter_effect:.4f}|{means[0]:.4f}, "
        f"style {style_effect:.4f}|{means[1]:.4f}, scale 0 vs no adapter {off_effect:.2e}"
    )
    assert adapter_effect > 1e-2  # the adapter changes the image
    assert style_effect > 1e-2  # style= still changes it with the adapter on
    assert off_effect < 1e-5  # scale 0 is the plain student: the adapter path is additive
