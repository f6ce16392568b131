"""The DMM student: codebook, style-conditioned UNet, pipeline folder, plug-ins.

Everything runs on untrained tiny models: these tests check plumbing and
exactness, not image quality. The base pipeline folder is built here from the
zoo's component factories (well under a second) rather than from ``mini_zoo``,
whose training would dominate this file's runtime on a small CPU.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from dmm import DMMStudentPipeline, StyleCodebook, StyleStudent
from dmm.student.model import check_same_architecture
from dmm.student.pipeline import build_student_pipeline
from dmm.zoo.build import make_pipeline, vocabulary
from dmm.zoo.models import MAX_TOKENS, make_autoencoder, make_text_encoder, make_unet
from dmm.zoo.tokenizer import BOS, EOS, build_tokenizer

STYLES = ["pastel", "neon", "sepia"]
GEN = dict(height=32, width=32, num_inference_steps=2, output_type="pt")
PROMPTS = ["a red circle", "a big blue square"]


def _inputs(batch: int = 2, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    text = torch.randn(batch, 5, 64, generator=g)
    return x, t, text


def _perturb(student: StyleStudent, seed: int = 1) -> StyleStudent:
    """Make the style MLP non-zero so that different styles give different outputs."""
    g = torch.Generator().manual_seed(seed)
    lin = student.unet.class_embedding.linear_2
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.2)
        lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.2)
    return student


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core box torch's
    spinning worker threads multiply this file's wall time several-fold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return make_unet(8).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny, untrained SD-shaped base pipeline folder (16x16 latents = 32x32 images)."""
    root = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    tokenizer = build_tokenizer(vocabulary(), root / "_tok", MAX_TOKENS)
    vocab = tokenizer.get_vocab()
    text_encoder = make_text_encoder(len(vocab), vocab[BOS], vocab[EOS])
    pipe = make_pipeline(make_unet(16), text_encoder, tokenizer, make_autoencoder())
    pipe.save_pretrained(root / "base")
    return root / "base"


@pytest.fixture(scope="module")
def student_dir(base_dir, tmp_path_factory) -> Path:
    """A saved student pipeline whose styles differ (perturbed style MLP)."""
    base = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    student = _perturb(StyleStudent.from_base(base, STYLES, seed=3))
    out = tmp_path_factory.mktemp("student") / "student"
    assert student.save_pipeline(out, base_dir) == out
    return out


@pytest.fixture()
def pipe(student_dir) -> DMMStudentPipeline:
    p = DMMStudentPipeline.from_pretrained(student_dir, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def _gen(pipe, prompt=PROMPTS[0], seed=0, **kw) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, generator=gen, **GEN, **kw).images


# --- codebook --------------------------------------------------------------------------------


def test_codebook_init_is_deterministic_under_manual_seed():
    torch.manual_seed(5)
    a = StyleCodebook(STYLES, 16)
    torch.manual_seed(5)
    b = StyleCodebook(STYLES, 16)
    assert torch.equal(a.vectors, b.vectors)
    assert a.vectors.shape == (3, 16)
    assert a.style_names == STYLES and a.num_styles == 3 and a.embedding_dim == 16


@pytest.mark.parametrize(
    "names, message",
    [
        ([], "at least one"),
        (["a", "b", "a"], "unique; duplicated: a"),
        ([""], "invalid style name ''"),
        (["has space"], "invalid style name"),
        (["_leading"], "invalid style name"),
        (["x" * 65], "invalid style name"),
        ("abc", "must be a list"),
        ([3], "invalid style name 3"),
    ],
)
def test_codebook_rejects_bad_names(names, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        StyleCodebook(names, 8)


def test_resolve_forms():
    book = StyleCodebook(STYLES, 8)
    onehot = torch.tensor([0.0, 1.0, 0.0])
    assert torch.equal(book.resolve("neon"), onehot)
    assert torch.equal(book.resolve(1), onehot)
    assert torch.equal(book.resolve(torch.tensor(1)), onehot)
    assert torch.equal(book.resolve([0, 1, 0]), onehot)
    assert torch.equal(book.resolve(torch.tensor([0.0, 5.0, 0.0])), onehot)  # normalised
    mix = book.resolve({"pastel": 0.3, "neon": 0.7})
    assert torch.equal(mix, book.resolve([0.3, 0.7, 0.0]))
    assert torch.allclose(mix, book.resolve({"pastel": 3, "neon": 7}), atol=1e-7)
    assert torch.isclose(mix.sum(), torch.tensor(1.0))


@pytest.mark.parametrize(
    "style, message",
    [
        ("mosaic", "unknown style 'mosaic'; known styles: pastel, neon, sepia"),
        ({"mosaic": 1.0}, "unknown style 'mosaic'; known styles: pastel, neon, sepia"),
        (3, "style index 3 out of range for 3 styles"),
        (-1, "style index -1 out of range"),
        ([0.5, 0.5], "has 2 entries but the codebook has 3 styles"),
        ([1.0, -0.5, 0.5], "non-negative"),
        ([float("nan"), 1.0, 0.0], "finite"),
        ([float("inf"), 1.0, 0.0], "finite"),
        ([0.0, 0.0, 0.0], "positive sum"),
        ({}, "style dict is empty"),
        ({"neon": "x"}, "must be a number"),
        (0.5, "single float"),
        (True, "cannot interpret style"),
        (None, "cannot interpret style"),
    ],
)
def test_resolve_rejects_bad_styles(style, message):
    book = StyleCodebook(STYLES, 8)
    with pytest.raises(ValueError, match=re.escape(message)):
        book.resolve(style)


def test_embed_single_per_sample_and_weight_matrix():
    book = StyleCodebook(STYLES, 8)
    e = book.vectors.detach()
    assert torch.equal(book.embed("sepia", 4), e[2].expand(4, -1))
    mix = book.embed({"pastel": 0.3, "neon": 0.7}, 1)[0]
    assert torch.allclose(mix, 0.3 * e[0] + 0.7 * e[1], atol=1e-6)
    per = book.embed(["neon", 0, {"sepia": 1.0}], 3)
    assert torch.equal(per, torch.stack([e[1], e[0], e[2]]))
    w = torch.tensor([[1.0, 0, 0], [0, 0, 2.0]])
    assert torch.equal(book.embed(w, 2), torch.stack([e[0], e[2]]))
    assert book.embed("neon", 2, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="got 3 per-sample styles for a batch of 2"):
        book.embed(["neon", 0, 1], 2)
    with pytest.raises(ValueError, match="batch_size is required"):
        book.embed("neon")


def test_append_and_drop_styles_preserve_vectors():
    book = StyleCodebook(STYLES, 8)
    old = book.vectors.detach().clone()
    torch.manual_seed(9)
    grown = book.append_styles(["mosaic", "ink"])
    torch.manual_seed(9)
    again = book.append_styles(["mosaic", "ink"])
    assert grown is not book and torch.equal(book.vectors, old)  # original untouched
    assert grown.style_names == [*STYLES, "mosaic", "ink"]
    assert torch.equal(grown.vectors[:3], old)
    assert torch.equal(grown.vectors, again.vectors)  # new rows follow torch.manual_seed
    assert not torch.equal(grown.vectors[3], grown.vectors[4])
    assert torch.equal(grown.embed("neon", 1), book.embed("neon", 1))

    shrunk = grown.drop_styles(["neon", "mosaic"])
    assert shrunk.style_names == ["pastel", "sepia", "ink"]
    assert torch.equal(shrunk.vectors, grown.vectors[[0, 2, 4]])
    with pytest.raises(ValueError, match="already in the codebook: neon"):
        book.append_styles(["neon"])
    with pytest.raises(ValueError, match="unknown style 'nope'"):
        book.drop_styles(["nope"])
    with pytest.raises(ValueError, match="cannot drop every style"):
        book.drop_styles(STYLES)


# --- student model ---------------------------------------------------------------------------


@torch.no_grad()
def test_fresh_student_equals_base_exactly(base_unet):
    student = StyleStudent.from_base(base_unet, STYLES).eval()
    x, t, text = _inputs()
    ref = base_unet(x, t, text).sample
    for style in ["pastel", "neon", 2, [0.2, 0.3, 0.5], {"sepia": 1.0}, ["neon", "pastel"]]:
        assert torch.equal(student(x, t, text, style), ref), style
    assert student.unet.config.class_embed_type == "projection"
    assert student.unet.config.projection_class_embeddings_input_dim == 4 * 32
    assert student.style_names == STYLES


def test_from_base_is_seeded_and_leaves_global_rng_alone(base_unet):
    torch.manual_seed(0)
    a = StyleStudent.from_base(base_unet, STYLES, seed=4)
    after_a = torch.rand(1)
    torch.manual_seed(0)
    b = StyleStudent.from_base(base_unet, STYLES, seed=4)
    assert torch.equal(torch.rand(1), after_a)
    assert torch.equal(a.style_codebook.vectors, b.style_codebook.vectors)
    c = StyleStudent.from_base(base_unet, STYLES, seed=5)
    assert not torch.equal(a.style_codebook.vectors, c.style_codebook.vectors)


@torch.no_grad()
def test_style_forms_give_identical_outputs(base_unet):
    student = _perturb(StyleStudent.from_base(base_unet, STYLES)).eval()
    x, t, text = _inputs()
    by_name = student(x, t, text, "neon")
    assert torch.equal(by_name, student(x, t, text, 1))
    assert torch.equal(by_name, student(x, t, text, [0.0, 1.0, 0.0]))
    assert torch.equal(by_name, student(x, t, text, torch.tensor([[0.0, 1.0, 0.0]] * 2)))
    assert not torch.equal(by_name, student(x, t, text, "pastel"))
    mix = student(x, t, text, {"pastel": 0.3, "neon": 0.7})
    assert torch.equal(mix, student(x, t, text, [0.3, 0.7, 0.0]))
    # A mix is a mix of vectors, fed through the MLP: not a mix of outputs.
    e = student.style_codebook.vectors
    labels = (0.3 * e[0] + 0.7 * e[1]).expand(2, -1)
    direct = student.unet(x, t, text, class_labels=labels).sample
    assert torch.allclose(mix, direct, atol=1e-5)
    # Per-sample styles: each row equals the same row run alone.
    both = student(x, t, text, ["neon", "pastel"])
    assert torch.allclose(both[1], student(x, t, text, "pastel")[1], atol=1e-5)
    with pytest.raises(TypeError, match="pass style="):
        student(x, t, text, "neon", class_labels=labels)


def test_style_gets_gradients(base_unet):
    student = _perturb(StyleStudent.from_base(base_unet, STYLES))
    x, t, text = _inputs()
    student(x, t, text, ["neon", "sepia"]).square().mean().backward()
    grad = student.style_codebook.vectors.grad
    assert grad is not None
    assert grad[1].abs().sum() > 0 and grad[2].abs().sum() > 0
    assert torch.equal(grad[0], torch.zeros_like(grad[0]))  # pastel unused


@torch.no_grad()
def test_return_features(base_unet):
    student = _perturb(StyleStudent.from_base(base_unet, STYLES)).eval()
    x, t, text = _inputs()
    eps, feats = student(x, t, text, "sepia", return_features=True)
    unet = student.unet
    assert len(feats) == len(unet.down_blocks) + 1 + len(unet.up_blocks)
    assert all(isinstance(f, torch.Tensor) and f.shape[0] == 2 for f in feats)
    assert [f.shape[1] for f in feats] == [32, 64, 64, 64, 64, 64, 32]
    assert feats[-1].shape[-2:] == x.shape[-2:]
    assert torch.equal(eps, student(x, t, text, "sepia"))
    assert not unet.down_blocks[0]._forward_hooks  # hooks removed after the call


def test_save_pretrained_round_trip(base_unet, tmp_path):
    student = _perturb(StyleStudent.from_base(base_unet, STYLES)).eval()
    student.save_pretrained(tmp_path / "s")
    loaded = StyleStudent.from_pretrained(tmp_path / "s").eval()
    assert loaded.config.style_names == STYLES
    assert loaded.style_names == STYLES
    for (k, v), (k2, v2) in zip(
        student.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2), k
    x, t, text = _inputs()
    with torch.no_grad():
        neon = loaded(x, t, text, "neon")
        assert (student(x, t, text, "neon") - neon).abs().max() == 0
        assert not torch.equal(neon, loaded(x, t, text, "sepia"))  # styles are distinguishable


def test_set_codebook_updates_config(base_unet, tmp_path):
    student = StyleStudent.from_base(base_unet, STYLES)
    student.set_codebook(student.style_codebook.append_styles(["mosaic"]))
    assert student.style_names == [*STYLES, "mosaic"]
    student.save_pretrained(tmp_path / "s")
    assert StyleStudent.from_pretrained(tmp_path / "s").style_names == [*STYLES, "mosaic"]
    with pytest.raises(ValueError, match="codebook width 7"):
        student.set_codebook(StyleCodebook(STYLES, 7))


def _unet(**overrides) -> UNet2DConditionModel:
    # Drop diffusers' private keys: "_use_default_values" would override ``overrides``.
    cfg = {k: v for k, v in make_unet(8).config.items() if not k.startswith("_")}
    cfg.update(overrides)
    return UNet2DConditionModel.from_config(cfg)


def test_check_same_architecture(base_unet):
    check_same_architecture(base_unet, make_unet(8), name="ok")  # same layout: silent
    wide = _unet(cross_attention_dim=32)
    with pytest.raises(ValueError) as err:
        check_same_architecture(base_unet, wide, name="wide")
    msg = str(err.value)
    assert msg.startswith("teacher 'wide' UNet differs from the base: shape mismatches [")
    assert "attn2.to_k.weight: (64, 32) vs base (64, 64)" in msg
    assert "... and" in msg  # long lists are cut

    deep = _unet(layers_per_block=2)
    with pytest.raises(ValueError, match=r"missing keys \[down_blocks\.0\.resnets\.1\."):
        check_same_architecture(deep, base_unet, name="shallow")
    with pytest.raises(ValueError, match=r"unexpected keys \[down_blocks\.0\.resnets\.1\."):
        check_same_architecture(base_unet, deep, name="deep")

    student = StyleStudent.from_base(base_unet, STYLES)
    student.validate_base(base_unet)  # the style MLP alone is not a difference
    with pytest.raises(ValueError, match="student 'base' UNet differs"):
        student.validate_base(wide)
    with pytest.raises(ValueError, match="missing keys"):
        check_same_architecture(student.unet, base_unet)  # without the ignore


def test_from_base_rejects_class_conditioned_base():
    with pytest.raises(ValueError, match="already has class conditioning"):
        StyleStudent.from_base(_unet(num_class_embeds=4), STYLES)


# --- pipeline --------------------------------------------------------------------------------


def test_pipeline_folder_layout(student_dir):
    import json

    index = json.loads((student_dir / "model_index.json").read_text())
    assert index["_class_name"] == "DMMStudentPipeline"
    assert index["style_codebook"] == ["dmm", "StyleCodebook"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    unet_cfg = json.loads((student_dir / "unet" / "config.json").read_text())
    assert unet_cfg["class_embed_type"] == "projection"


def test_pipeline_generates_by_name_index_and_dict(pipe):
    assert pipe.style_names == STYLES
    by_name = _gen(pipe, style="neon")
    assert by_name.shape == (1, 3, 32, 32)
    assert torch.equal(by_name, _gen(pipe, style="neon"))  # same seed, same image
    assert torch.equal(by_name, _gen(pipe, style=1))
    assert torch.equal(by_name, _gen(pipe, style={"neon": 2.0}))
    assert not torch.equal(by_name, _gen(pipe, style="neon", seed=1))
    others = [_gen(pipe, style=s) for s in ("pastel", "sepia", {"pastel": 0.5, "neon": 0.5})]
    for img in others:
        assert (img - by_name).abs().max() > 1e-3
    assert not pipe.unet._forward_pre_hooks  # the style hook is gone after each call


def test_pipeline_cfg_conditions_both_halves(pipe):
    """The UNet gets the style MLP's output for the right style in both CFG halves."""
    seen: list[torch.Tensor] = []

    def record(_module, _args, kwargs, _output):
        seen.append(kwargs["class_labels"].clone())

    mlp = pipe.unet.class_embedding
    handle = pipe.unet.register_forward_hook(record, with_kwargs=True)
    try:
        _gen(pipe, style="sepia", guidance_scale=3.0)
        e = pipe.style_codebook.vectors.detach()
        with torch.no_grad():
            cfg_sepia = mlp(e[2][None].expand(2, -1))
            per_image = torch.stack([e[1], e[1], e[0], e[0]])
            cfg_per_image = mlp(torch.cat([per_image, per_image]))
            pastel = mlp(e[0][None])
        assert len(seen) == GEN["num_inference_steps"]
        for labels in seen:
            assert torch.equal(labels, cfg_sepia)  # [uncond, cond]

        seen.clear()
        _gen(pipe, PROMPTS, style=["neon", "pastel"], guidance_scale=3.0, num_images_per_prompt=2)
        assert torch.equal(seen[0], cfg_per_image)

        seen.clear()
        _gen(pipe, style="pastel", guidance_scale=1.0)  # no CFG: a batch of one
        assert torch.equal(seen[0], pastel)
    finally:
        handle.remove()


def test_style_mlp_runs_once_per_call_and_is_restored(pipe):
    """The style embedding is constant over the steps, so it is computed once per call."""
    mlp = pipe.unet.class_embedding
    calls: list[int] = []
    handle = mlp.register_forward_hook(lambda *_: calls.append(1))
    try:
        _gen(pipe, style="neon", guidance_scale=3.0)
        assert GEN["num_inference_steps"] > 1 and len(calls) == 1

        def boom(*_args):
            assert isinstance(pipe.unet.class_embedding, torch.nn.Identity)
            raise RuntimeError("stopped mid-call")

        with pytest.raises(RuntimeError, match="stopped mid-call"):
            _gen(pipe, style="neon", callback_on_step_end=boom)
    finally:
        handle.remove()
    assert pipe.unet.class_embedding is mlp
    # Outside a call the UNet is the student's own: its style MLP runs per forward.
    x, t, text = _inputs(size=16)
    labels = pipe.style_codebook.embed("neon", 2)
    with torch.no_grad():
        direct = pipe.unet(x, t, text, class_labels=labels).sample
    assert direct.shape == x.shape


def test_pipeline_per_prompt_styles_match_single_calls(pipe):
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    batch = pipe(PROMPTS, style=["neon", "sepia"], generator=gens, **GEN).images
    one = _gen(pipe, PROMPTS[0], seed=11, style="neon")
    two = _gen(pipe, PROMPTS[1], seed=12, style="sepia")
    assert torch.allclose(batch[0], one[0], atol=1e-4)
    assert torch.allclose(batch[1], two[0], atol=1e-4)
    assert (batch[0] - _gen(pipe, PROMPTS[0], seed=11, style="sepia")[0]).abs().max() > 1e-3


def test_pipeline_style_errors(pipe):
    with pytest.raises(ValueError, match=r"style= is required; known styles: pastel, neon, sepia"):
        _gen(pipe)
    with pytest.raises(ValueError, match="unknown style 'mosaic'; known styles: pastel, neon"):
        _gen(pipe, style="mosaic")
    with pytest.raises(ValueError, match=r"got 3 styles for 2 prompt\(s\) x 1 image"):
        _gen(pipe, PROMPTS, style=["neon", "sepia", "pastel"])
    with pytest.raises(ValueError):  # the parent's own check: height not a multiple of 8
        pipe(PROMPTS[0], style="neon", height=30, width=32, num_inference_steps=1)
    assert not pipe.unet._forward_pre_hooks  # removed even when the call fails


def test_build_student_pipeline_shares_modules_and_round_trips(base_dir, student_dir):
    student = StyleStudent.from_pipeline(student_dir)
    assert student.style_names == STYLES
    pipe = build_student_pipeline(student, base_dir)
    assert pipe.unet is student.unet and pipe.style_codebook is student.style_codebook
    assert StyleStudent.from_pipeline(pipe).unet is student.unet
    loaded = DMMStudentPipeline.from_pretrained(student_dir, local_files_only=True)
    for k, v in loaded.unet.state_dict().items():
        assert torch.equal(v, student.unet.state_dict()[k]), k
    x, t, text = _inputs(size=16)
    with torch.no_grad():
        eps = student(x, t, text, "neon")
        labels = loaded.style_codebook.embed("neon", 2)
        assert torch.equal(eps, loaded.unet(x, t, text, class_labels=labels).sample)


def test_pipeline_rejects_mismatched_codebook(base_dir, student_dir):
    base = StableDiffusionPipeline.from_pretrained(base_dir, local_files_only=True)
    with pytest.raises(ValueError, match="class_embed_type='projection'"):
        DMMStudentPipeline(**base.components, style_codebook=StyleCodebook(STYLES, 128))
    unet = UNet2DConditionModel.from_pretrained(student_dir, subfolder="unet")
    parts = {**base.components, "unet": unet}
    with pytest.raises(ValueError, match="codebook width 16"):
        DMMStudentPipeline(**parts, style_codebook=StyleCodebook(STYLES, 16))
    with pytest.raises(ValueError, match="needs a style_codebook"):
        DMMStudentPipeline(**parts, style_codebook=None)


def test_lora_loads_into_student_pipeline(pipe, student_dir, tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(student_dir, subfolder="unet")
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the LoRA would be a no-op
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    assert layers and not any("class_embedding" in k for k in layers)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers)

    plain = _gen(pipe, style="neon")
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="toy")
    assert "toy" in pipe.get_active_adapters()
    with_lora = _gen(pipe, style="neon")
    assert (with_lora - plain).abs().max() > 1e-3
    assert (with_lora - _gen(pipe, style="pastel")).abs().max() > 1e-3  # style still matters
    pipe.unload_lora_weights()
    assert torch.allclose(_gen(pipe, style="neon"), plain, atol=1e-6)


def test_controlnet_from_student_unet(student_dir):
    from diffusers import ControlNetModel

    unet = UNet2DConditionModel.from_pretrained(student_dir, subfolder="unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=3)
    assert torch.equal(
        controlnet.class_embedding.linear_2.weight, unet.class_embedding.linear_2.weight
    )
