"""Single-file (LDM layout) export of students, exact import, and plug-ins on the result.

Untrained tiny models: these tests check layout and exactness (max difference 0
on every weight and on generated images), not image quality.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from typer.testing import CliRunner

from dmm import DMMStudentPipeline, StyleStudent
from dmm.atomic import DmmError
from dmm.student.cli import export_command
from dmm.student.export import (
    CODEBOOK_KEY,
    export_single_file,
    import_single_file,
    vae_ldm_name,
    vae_ldm_shape,
)
from dmm.zoo.build import make_pipeline, vocabulary
from dmm.zoo.models import MAX_TOKENS, make_autoencoder, make_text_encoder, make_unet
from dmm.zoo.tokenizer import BOS, EOS, build_tokenizer

STYLES = ["pastel", "neon", "sepia"]
GEN = dict(height=32, width=32, num_inference_steps=2, output_type="pt")
PROMPT = "a red circle"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from threads on a shared 2-core box.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_kl() -> AutoencoderKL:
    """An SD-shaped AutoencoderKL (two levels, so images are 2x the latents like the zoo's)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def _make_base(root: Path, vae: torch.nn.Module) -> Path:
    torch.manual_seed(0)
    tokenizer = build_tokenizer(vocabulary(), root / "_tok", MAX_TOKENS)
    vocab = tokenizer.get_vocab()
    text_encoder = make_text_encoder(len(vocab), vocab[BOS], vocab[EOS])
    make_pipeline(make_unet(16), text_encoder, tokenizer, vae).save_pretrained(root / "base")
    return root / "base"


def _make_student(base_dir: Path, out: Path) -> Path:
    base = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    student = StyleStudent.from_base(base, STYLES, seed=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a zero style MLP would make every style identical
        for p in student.unet.class_embedding.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    student.save_pipeline(out, base_dir)
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return _make_base(tmp_path_factory.mktemp("base"), make_autoencoder())


@pytest.fixture(scope="module")
def student_dir(base_dir, tmp_path_factory) -> Path:
    return _make_student(base_dir, tmp_path_factory.mktemp("student") / "student")


@pytest.fixture(scope="module")
def exported(student_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("file") / "student.safetensors"
    return out, export_single_file(student_dir, out)


def _load(folder: Path) -> DMMStudentPipeline:
    pipe = DMMStudentPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(pipe, style, seed: int = 0, **kw) -> torch.Tensor:
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), style=style, **GEN, **kw)[0]


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].dtype == sb[k].dtype for k in sa)
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


def _assert_exact(folder_pipe: DMMStudentPipeline, imported: DMMStudentPipeline) -> None:
    for name in ("unet", "text_encoder", "vae", "style_codebook"):
        assert _max_diff(getattr(folder_pipe, name), getattr(imported, name)) == 0.0, name
    assert imported.style_names == folder_pipe.style_names
    assert dict(imported.scheduler.config) == dict(folder_pipe.scheduler.config)
    for style in ("neon", {"pastel": 0.3, "sepia": 0.7}):
        a, b = _gen(folder_pipe, style), _gen(imported, style)
        assert float((a - b).abs().max()) == 0.0


def test_round_trip_is_exact(student_dir, base_dir, exported):
    file, _ = exported
    imported = import_single_file(file, base_dir)
    assert isinstance(imported, DMMStudentPipeline)
    _assert_exact(_load(student_dir), imported)
    assert float((_gen(imported, "neon") - _gen(imported, "pastel")).abs().max()) > 1e-4


def test_file_layout_and_metadata(exported):
    file, info = exported
    with safe_open(str(file), framework="pt") as fh:
        keys = list(fh.keys())
        meta = fh.metadata()
        vectors = fh.get_tensor(CODEBOOK_KEY)
    prefixes = (
        "model.diffusion_model.",
        "cond_stage_model.transformer.text_model.",
        "dmm.patch_autoencoder.",
    )
    assert all(k.startswith(prefixes) or k == CODEBOOK_KEY for k in keys)
    assert not any(k.startswith("first_stage_model.") for k in keys)  # not a real SD VAE
    style_mlp = sorted(k for k in keys if ".label_emb." in k)
    assert style_mlp == [
        f"model.diffusion_model.label_emb.0.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")
    ]
    assert vectors.shape == (3, 128)
    assert meta["format"] == "pt"
    dmm_meta = json.loads(meta["dmm"])
    assert dmm_meta == info
    assert dmm_meta["style_names"] == STYLES and dmm_meta["kind"] == "student"
    assert dmm_meta["dmm_version"] == __import__("dmm").__version__
    assert dmm_meta["vae"] == "patch_autoencoder"


def test_diffusers_own_loader_reads_the_unet_with_its_style_mlp(student_dir, exported):
    file, _ = exported
    unet = UNet2DConditionModel.from_single_file(
        str(file), config=str(student_dir), subfolder="unet", local_files_only=True
    )
    reference = UNet2DConditionModel.from_pretrained(student_dir, subfolder="unet")
    assert _max_diff(unet, reference) == 0.0


def test_autoencoder_kl_goes_to_first_stage_model_and_round_trips(tmp_path):
    base_dir = _make_base(tmp_path, _tiny_kl())
    student_dir = _make_student(base_dir, tmp_path / "student")
    file = tmp_path / "kl.safetensors"
    info = export_single_file(student_dir, file)
    assert info["vae"] == "autoencoder_kl"
    with safe_open(str(file), framework="pt") as fh:
        keys = list(fh.keys())
        attn_q = fh.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    assert not any(k.startswith("dmm.patch_autoencoder.") for k in keys)
    assert attn_q.shape == (16, 16, 1, 1)  # LDM's 1x1 conv, not diffusers' Linear
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "first_stage_model.encoder.down.0.downsample.conv.weight" in keys
    imported = import_single_file(file, base_dir)
    assert isinstance(imported.vae, AutoencoderKL)
    _assert_exact(_load(student_dir), imported)


def test_vae_names_are_what_diffusers_converts_back():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = _tiny_kl()
    state = vae.state_dict()
    ldm = {
        "first_stage_model." + vae_ldm_name(k, vae.config): v.reshape(vae_ldm_shape(k, v.shape))
        for k, v in state.items()
    }
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_fp16_export(student_dir, base_dir, tmp_path):
    file = tmp_path / "half.safetensors"
    export_single_file(student_dir, file, dtype="fp16")
    with safe_open(str(file), framework="pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}
    imported = import_single_file(file, base_dir)
    assert imported.unet.dtype == torch.float16
    reference = _load(student_dir)
    ref_sd = reference.unet.state_dict()
    assert all(torch.equal(v, ref_sd[k].half()) for k, v in imported.unet.state_dict().items())


def test_plain_pipeline_exports_but_does_not_import_as_a_student(base_dir, tmp_path):
    file = tmp_path / "base.safetensors"
    info = export_single_file(base_dir, file)
    assert info["kind"] == "pipeline" and info["style_names"] == []
    with safe_open(str(file), framework="pt") as fh:
        assert not any(".label_emb." in k for k in fh.keys())
    with pytest.raises(DmmError, match="not a dmm student file"):
        import_single_file(file, base_dir)


@pytest.mark.bad_input
def test_export_and_import_errors_are_one_line_and_leave_nothing(student_dir, base_dir, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cases = [
        (lambda: export_single_file(student_dir, out_dir / "x.ckpt"), "must be a .safetensors"),
        (lambda: export_single_file(tmp_path / "nope", out_dir / "x.safetensors"), "not found"),
        (
            lambda: export_single_file(student_dir, out_dir / "x.safetensors", dtype="fp8"),
            "unknown dtype",
        ),
    ]
    broken = tmp_path / "broken"
    shutil.copytree(student_dir, broken)
    (broken / "text_encoder" / "model.safetensors").write_bytes(b"\x08\x00\x00")
    cases.append((lambda: export_single_file(broken, out_dir / "x.safetensors"), "not a readable"))
    trunc = out_dir / "t.safetensors"
    export_single_file(student_dir, trunc)
    trunc.write_bytes(trunc.read_bytes()[:1000])
    cases.append((lambda: import_single_file(trunc, base_dir), "truncated or corrupt"))
    for call, needle in cases:
        with pytest.raises(DmmError) as info:
            call()
        assert "\n" not in str(info.value) and needle in str(info.value)
    assert [p.name for p in out_dir.iterdir()] == ["t.safetensors"]


def test_export_cli(student_dir, tmp_path):
    app = typer.Typer()
    app.command("export")(export_command)
    app.callback()(lambda: None)  # keep "export" a sub-command, as in the main CLI
    out = tmp_path / "s.safetensors"
    ok = CliRunner().invoke(app, ["export", "--student", str(student_dir), "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert "styles: pastel, neon, sepia" in ok.stdout and out.is_file()
    bad = CliRunner().invoke(app, ["export", "--student", str(tmp_path), "--out", str(out)])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: ")


# --- plug-ins on the imported student ---------------------------------------------------------


def test_lora_on_the_imported_student(base_dir, exported, tmp_path):
    # tests/test_student.py covers LoRA on a student folder; this is the same
    # check on a student that went through the single file.
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = import_single_file(exported[0], base_dir)
    unet = UNet2DConditionModel.from_config(pipe.unet.config)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, a no-op LoRA
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers)
    plain = _gen(pipe, "neon")
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="toy")
    with_lora = _gen(pipe, "neon")
    assert float((with_lora - plain).abs().max()) > 1e-3
    assert float((with_lora - _gen(pipe, "pastel")).abs().max()) > 1e-4


class StyleControlNetPipeline(StableDiffusionControlNetPipeline):
    """ControlNet with the student's ``style=``: the style embedding goes to the UNet
    and to the ControlNet, whose encoder (copied from the student) has the style MLP."""

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        controlnet,
        scheduler,
        style_codebook,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = False,
    ):
        super().__init__(
            vae,
            text_encoder,
            tokenizer,
            unet,
            controlnet,
            scheduler,
            safety_checker,
            feature_extractor,
            image_encoder,
            requires_safety_checker,
        )
        self.register_modules(style_codebook=style_codebook)

    @torch.no_grad()
    def __call__(self, *args, style, **kwargs):
        emb = self.style_codebook.embed(style, 1)

        def add_style(_module, h_args, h_kwargs):
            sample = h_args[0] if h_args else h_kwargs["sample"]
            h_kwargs["class_labels"] = emb.expand(sample.shape[0], -1).to(sample.dtype)
            return h_args, h_kwargs

        hooks = [
            m.register_forward_pre_hook(add_style, with_kwargs=True)
            for m in (self.unet, self.controlnet)
        ]
        try:
            return super().__call__(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()


def test_controlnet_from_the_imported_student(base_dir, exported):
    student = import_single_file(exported[0], base_dir)
    # One downsampling step in the conditioning embedding: the zoo's VAE
    # shrinks images 2x (SD's shrinks them 8x, matching the default 4 levels).
    controlnet = ControlNetModel.from_unet(
        student.unet, conditioning_channels=3, conditioning_embedding_out_channels=(16, 32)
    )
    parts = {k: v for k, v in student.components.items() if k not in ("image_encoder",)}
    pipe = StyleControlNetPipeline(**parts, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    control = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))

    def run(style):
        return _gen(pipe, style, image=control)

    # A fresh ControlNet's output convolutions are zero: exactly the student.
    for style in ("neon", "pastel"):
        assert float((run(style) - _gen(student, style)).abs().max()) == 0.0
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            block.weight.copy_(torch.randn(block.weight.shape, generator=g) * 0.05)
    controlled = run("neon")
    assert float((controlled - _gen(student, "neon")).abs().max()) > 1e-3
    assert float((controlled - run("pastel")).abs().max()) > 1e-4
