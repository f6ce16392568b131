"""LoRA teachers: the base plus a LoRA, fused at materialization.

The LoRAs are made offline from the miniature zoo the way kohya's extraction
tools make them: a truncated SVD of (teacher weight - base weight) per Linear
and Conv2d module, written in the kohya and the diffusers/PEFT conventions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dmm.atomic import DmmError
from dmm.student.export import unet_ldm_key_map
from dmm.teachers import TeacherEntry, load_manifest, materialize_teacher
from dmm.teachers.sources import TEACHER_JSON

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
TEXT_FILE = "text_encoder/model.safetensors"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def extract(base: dict, teacher: dict, rank: int, alpha: float | None = None) -> dict:
    """{weight key: (down, up, alpha)}: a rank-``rank`` LoRA of teacher - base, as
    kohya's extraction does; with ``alpha``, ``up`` is rescaled so the product
    ``(alpha / r) * up @ down`` stays the truncated delta."""
    out = {}
    for key, b in base.items():
        if not key.endswith(".weight") or b.ndim not in (2, 4) or "embedding" in key:
            continue
        delta = (teacher[key].float() - b.float()).flatten(1)
        if not bool(delta.any()):
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        up = u[:, :r] * s[:r].sqrt()
        down = (s[:r].sqrt()[:, None] * vh[:r]).reshape(r, *b.shape[1:])
        if b.ndim == 4:
            up = up[:, :, None, None]
        a = float(r) if alpha is None else alpha
        out[key] = (down.contiguous(), (up * (r / a)).contiguous(), a)
    return out


def _module(key: str) -> str:
    return key.removesuffix(".weight")


def write_peft(
    path: Path,
    unet: dict,
    text: dict | None = None,
    alpha: float | None = None,
    linear_1x1: bool = False,
) -> Path:
    """diffusers/PEFT keys; alpha (one for all modules) in diffusers' metadata;
    ``linear_1x1`` writes the pairs of 1x1 convolutions as Linear pairs."""
    state = {}
    for prefix, pairs in (("unet.", unet), ("text_encoder.", text or {})):
        for key, (down, up, _) in pairs.items():
            name = _module(key)
            if prefix == "text_encoder." and not name.startswith("text_model."):
                name = "text_model." + name  # the spelling of SD1.5's text encoder files
            if linear_1x1 and down.ndim == 4 and down.shape[2:] == (1, 1):
                down, up = down.flatten(1), up.flatten(1)
            state[f"{prefix}{name}.lora_A.weight"] = down
            state[f"{prefix}{name}.lora_B.weight"] = up
    meta = {"format": "pt"}
    if alpha is not None:
        info = {"unet.lora_alpha": alpha, "unet.r": 0, "text_encoder.lora_alpha": alpha}
        meta["lora_adapter_metadata"] = json.dumps(info)
    save_file(state, str(path), metadata=meta)
    return path


def write_kohya(path: Path, unet: dict, text: dict | None = None, names: dict | None = None):
    """kohya keys (``_`` for ``.``) with an ``alpha`` per module; ``names`` maps a
    UNet key to the name to write (for LDM-named files)."""
    state = {}
    for prefix, pairs in (("lora_unet_", unet), ("lora_te_", text or {})):
        for key, (down, up, alpha) in pairs.items():
            name = (names or {}).get(key, _module(key))
            stem = prefix + name.replace(".", "_")
            state[f"{stem}.lora_down.weight"] = down
            state[f"{stem}.lora_up.weight"] = up
            state[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def zoo(mini_zoo):
    return mini_zoo[0]


@pytest.fixture(scope="module")
def states(zoo):
    def read(folder: Path) -> tuple[dict, dict]:
        return load_file(str(folder / UNET_FILE)), load_file(str(folder / TEXT_FILE))

    return {name: read(zoo / "teachers" / name) for name in ("pastel", "neon", "sepia")} | {
        "base": read(zoo / "base")
    }


def _materialize(zoo: Path, out: Path, lora: Path, **kw) -> dict:
    entry = TeacherEntry(name=out.name, lora=str(lora), **kw)
    return materialize_teacher(entry, zoo / "base", out, zoo_dir=zoo)


def _fused_equals_base_plus_delta(fused: dict, base: dict, lora: dict, scale: float = 1.0):
    for key, b in base.items():
        if key in lora:
            down, up, alpha = lora[key]
            want = b.float() + scale * (alpha / down.shape[0]) * (
                up.flatten(1) @ down.flatten(1)
            ).reshape(b.shape)
            torch.testing.assert_close(fused[key], want.to(b.dtype), rtol=0, atol=1e-6)
        else:
            assert torch.equal(fused[key], b), key


def _unet_error(zoo: Path, folder: Path, teacher: Path) -> float:
    from diffusers import UNet2DConditionModel

    g = torch.Generator().manual_seed(0)
    ref = UNet2DConditionModel.from_pretrained(teacher / "unet")
    cfg = ref.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    cond = torch.randn(2, 6, cfg.cross_attention_dim, generator=g)
    t = torch.tensor([100, 700])
    with torch.no_grad():
        want = ref(x, t, cond).sample
        got = UNet2DConditionModel.from_pretrained(folder / "unet")(x, t, cond).sample
    return float((got - want).pow(2).mean() / want.pow(2).mean())


@pytest.mark.parametrize("fmt", ["peft", "kohya", "kohya_ldm"])
def test_fused_teacher_is_base_plus_the_lora_and_approximates_the_teacher(
    zoo, states, tmp_path, fmt
):
    base_unet, _ = states["base"]
    lora = extract(base_unet, states["pastel"][0], rank=16, alpha=4.0)
    path = tmp_path / f"pastel-{fmt}.safetensors"
    if fmt == "peft":
        write_peft(path, lora, alpha=4.0, linear_1x1=True)
    else:
        cfg = json.loads((zoo / "base/unet/config.json").read_text())
        ldm = {
            k: v.removesuffix(".weight").split(".", 2)[-1]
            for k, v in unet_ldm_key_map(list(lora), cfg).items()
        }
        write_kohya(path, lora, names=ldm if fmt == "kohya_ldm" else None)
    out = tmp_path / "teachers" / "pastel"
    meta = _materialize(zoo, out, path)
    assert meta["kind"] == "lora" and not meta["trained_text_encoder"]
    _fused_equals_base_plus_delta(load_file(str(out / UNET_FILE)), base_unet, lora)
    assert (out / TEXT_FILE).read_bytes() == (zoo / "base" / TEXT_FILE).read_bytes()
    # Norms and biases are not in a LoRA: the teacher is approximated, not equalled.
    lora_err = _unet_error(zoo, out, zoo / "teachers/pastel")
    base_err = _unet_error(zoo, zoo / "base", zoo / "teachers/pastel")
    assert lora_err < 0.5 * base_err, (lora_err, base_err)


def test_scale_and_rank_change_the_teacher_and_its_hash(zoo, states, tmp_path):
    base_unet, _ = states["base"]
    lora = extract(base_unet, states["pastel"][0], rank=4)
    path = write_kohya(tmp_path / "p.safetensors", lora)
    half = _materialize(zoo, tmp_path / "t" / "half", path, scale=0.5)
    fused = load_file(str(tmp_path / "t/half" / UNET_FILE))
    _fused_equals_base_plus_delta(fused, base_unet, lora, 0.5)
    full = _materialize(zoo, tmp_path / "t" / "full", path)
    again = _materialize(zoo, tmp_path / "t2" / "full", path)
    assert full["source_sha256"] == again["source_sha256"] != half["source_sha256"]
    write_kohya(path, extract(base_unet, states["pastel"][0], rank=2))
    other = _materialize(zoo, tmp_path / "t3" / "full", path)
    assert other["source_sha256"] != full["source_sha256"]
    assert json.loads((tmp_path / "t/half" / TEACHER_JSON).read_text())["lora_scale"] == 0.5
    # The same LoRA on another base is another teacher.
    from dmm.teachers.lora import lora_teacher_digest

    on = [
        lora_teacher_digest("ab" * 32, [zoo / d / UNET_FILE], 1.0)
        for d in ("base", "teachers/neon")
    ]
    assert on[0] != on[1]


def test_text_encoder_lora_makes_the_teacher_carry_its_own_text_encoder(zoo, states, tmp_path):
    base_unet, base_text = states["base"]
    neon_unet, neon_text = states["neon"]
    unet_lora = extract(base_unet, neon_unet, rank=16)
    text_lora = extract(base_text, neon_text, rank=16)
    assert text_lora, "the neon teacher tunes its text encoder"
    path = write_peft(tmp_path / "neon.safetensors", unet_lora, text_lora)
    out = tmp_path / "teachers" / "neon"
    meta = _materialize(zoo, out, path)
    assert meta["trained_text_encoder"]
    _fused_equals_base_plus_delta(load_file(str(out / TEXT_FILE)), base_text, text_lora)
    _fused_equals_base_plus_delta(load_file(str(out / UNET_FILE)), base_unet, unet_lora)


def test_diffusers_own_fuse_agrees(zoo, states, tmp_path):
    """An independent implementation: diffusers' load_lora_weights + fuse_lora."""
    from diffusers import StableDiffusionPipeline

    base_unet, base_text = states["base"]
    unet_lora = extract(base_unet, states["neon"][0], rank=4)
    text_lora = extract(base_text, states["neon"][1], rank=4)
    path = write_peft(tmp_path / "neon.safetensors", unet_lora, text_lora)
    out = tmp_path / "teachers" / "neon"
    _materialize(zoo, out, path)
    pipe = StableDiffusionPipeline.from_pretrained(zoo / "base", local_files_only=True)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    ours = load_file(str(out / UNET_FILE))
    for key, value in pipe.unet.state_dict().items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-5, msg=key)
    ours_text = load_file(str(out / TEXT_FILE))
    for key, value in pipe.text_encoder.state_dict().items():
        if key in ours_text:
            torch.testing.assert_close(ours_text[key], value, rtol=0, atol=1e-5, msg=key)


def test_manifest_lora_entries(tmp_path):
    path = tmp_path / "teachers.yaml"
    path.write_text(
        "teachers:\n  - {name: ink, lora: loras/ink.safetensors, scale: 0.8}\n"
        "  - {name: pastel, source: 'zoo:pastel'}\n"
    )
    m = load_manifest(path)
    assert [t.kind for t in m.teachers] == ["lora", "zoo"]
    assert m.teachers[0].scale == 0.8 and m.teachers[0].origin == "loras/ink.safetensors"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "entry, needle",
    [
        ("{name: a, lora: x.safetensors, source: 'zoo:pastel'}", "exactly one of 'source'"),
        ("{name: a}", "exactly one of 'source'"),
        ("{name: a, source: 'zoo:pastel', scale: 0.5}", "'scale' applies to a 'lora'"),
        ("{name: a, lora: x.safetensors, scale: 0}", "finite non-zero"),
        ("{name: a, lora: 'zoo:pastel'}", "must be a local .safetensors"),
        ("{name: a, lora: ../x.safetensors}", "outside the project"),
    ],
)
def test_bad_lora_entries(tmp_path, entry, needle):
    path = tmp_path / "teachers.yaml"
    path.write_text(f"teachers:\n  - {entry}\n")
    with pytest.raises(DmmError) as info:
        load_manifest(path, repo_root=tmp_path)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def _refused(zoo: Path, tmp_path: Path, lora: Path, *needles: str, **kw) -> str:
    out_root = tmp_path / "out"
    with pytest.raises(DmmError) as info:
        _materialize(zoo, out_root / "t", lora, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in (str(lora), *needles):
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert not out_root.exists(), list(out_root.iterdir())
    return msg


@pytest.mark.bad_input
def test_lora_matching_no_module_of_the_base(zoo, states, tmp_path):
    base_unet, _ = states["base"]
    lora = extract(base_unet, states["pastel"][0], rank=2)
    renamed = {k.replace("down_blocks", "input_stack"): v for k, v in lora.items()}
    path = write_peft(tmp_path / "x.safetensors", renamed)
    _refused(zoo, tmp_path, path, "match no module of the base", "input_stack")
    only_wrong = {k: v for k, v in renamed.items() if "input_stack" in k}
    write_peft(path, only_wrong)
    _refused(zoo, tmp_path, path, f"none of the LoRA's {len(only_wrong)} modules matches")


@pytest.mark.bad_input
def test_lora_rank_and_shape_mismatch(zoo, states, tmp_path):
    base_unet, _ = states["base"]
    lora = extract(base_unet, states["pastel"][0], rank=4)
    key = next(k for k in lora if k.endswith("attn2.to_k.weight"))
    down, up, alpha = lora[key]
    path = tmp_path / "x.safetensors"
    write_kohya(path, {**lora, key: (down, up[:, :3].contiguous(), alpha)})
    _refused(zoo, tmp_path, path, "rank mismatch", "attn2_to_k")
    write_kohya(path, {**lora, key: (torch.zeros(4, 768), up, alpha)})
    _refused(zoo, tmp_path, path, "shape mismatch", "768)", "the base weight is")


@pytest.mark.bad_input
def test_lora_pickle_refused_unless_allowed(zoo, states, tmp_path):
    base_unet, _ = states["base"]
    lora = extract(base_unet, states["pastel"][0], rank=2)
    write_kohya(tmp_path / "x.safetensors", lora)
    pickled = tmp_path / "x.pt"
    torch.save(load_file(str(tmp_path / "x.safetensors")), pickled)
    _refused(zoo, tmp_path, pickled, "refusing to unpickle", "allow_pickle: true")
    meta = _materialize(zoo, tmp_path / "ok" / "t", pickled, allow_pickle=True)
    assert meta["kind"] == "lora"


@pytest.mark.bad_input
def test_lora_for_sdxl_against_an_sd15_base(zoo, states, tmp_path):
    base_unet, _ = states["base"]
    lora = extract(base_unet, states["pastel"][0], rank=2)
    path = write_kohya(tmp_path / "x.safetensors", lora)
    state = load_file(str(path))
    stem = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    state[f"{stem}.lora_down.weight"] = torch.zeros(2, 8)
    state[f"{stem}.lora_up.weight"] = torch.zeros(8, 2)
    save_file(state, str(path))
    _refused(zoo, tmp_path, path, "LoRA for SDXL offered against an SD1.5 base", "lora_te2_")


@pytest.mark.bad_input
def test_not_a_lora_and_a_broken_pair(zoo, states, tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(2)}, str(path))
    _refused(zoo, tmp_path, path, "not LoRA keys")
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, str(path))
    _refused(zoo, tmp_path, path, "incomplete LoRA pairs", "has no up")
    save_file({"unet.conv_in.lora_magnitude_vector": torch.zeros(2)}, str(path))
    _refused(zoo, tmp_path, path, "DoRA weights are not supported")
    ints = torch.zeros(2, 4, dtype=torch.int32)
    save_file({"lora_unet_conv_in.lora_down.weight": ints}, str(path))
    _refused(zoo, tmp_path, path, "is torch.int32, not floating point")


@pytest.mark.bad_input
def test_lora_pin_mismatch(zoo, states, tmp_path):
    base_unet, _ = states["base"]
    path = write_kohya(tmp_path / "x.safetensors", extract(base_unet, states["pastel"][0], 2))
    _refused(zoo, tmp_path, path, "sha256 mismatch", sha256="ab" * 32)


def test_three_lora_teachers_are_checked_materialized_and_distilled(
    mini_zoo, zoo, states, tmp_path
):
    """Three LoRA teachers: a diffusers-format one, a kohya one, and one that also
    adapts the text encoder; checked, written as ordinary teacher folders, then
    sampled and distilled into one student like any teachers."""
    import typer

    from dmm.teachers.cli import teachers_app

    base_unet, base_text = states["base"]
    (tmp_path / "loras").mkdir()
    write_peft(tmp_path / "loras/pastel.safetensors", extract(base_unet, states["pastel"][0], 8))
    write_kohya(tmp_path / "loras/sepia.safetensors", extract(base_unet, states["sepia"][0], 8))
    write_peft(
        tmp_path / "loras/neon.safetensors",
        extract(base_unet, states["neon"][0], 8),
        extract(base_text, states["neon"][1], 8),
    )
    manifest = tmp_path / "teachers.yaml"
    lines = [f"  - {{name: {n}, lora: loras/{n}.safetensors}}" for n in ("pastel", "sepia", "neon")]
    manifest.write_text("teachers:\n" + "\n".join(lines) + "\n")
    app = typer.Typer()
    app.add_typer(teachers_app, name="teachers")
    common = ["--manifest", str(manifest), "--zoo", str(zoo), "--root", str(tmp_path)]
    checked = CliRunner().invoke(app, ["teachers", "check", *common])
    assert checked.exit_code == 0, checked.output
    rows = {line.split()[0]: line.split() for line in checked.stdout.splitlines()[2:]}
    assert {n: rows[n][1:4] for n in rows} == {
        "pastel": ["lora", "ok", "no"],
        "sepia": ["lora", "ok", "no"],
        "neon": ["lora", "ok", "yes"],
    }
    out = tmp_path / "data" / "teachers"
    made = CliRunner().invoke(app, ["teachers", "materialize", *common, "--out", str(out)])
    assert made.exit_code == 0, made.output
    for name in ("pastel", "sepia", "neon"):
        meta = json.loads((out / name / TEACHER_JSON).read_text())
        assert meta["kind"] == "lora" and meta["trained_text_encoder"] == (name == "neon")
    _distill_briefly(mini_zoo, {n: out / n for n in ("pastel", "sepia", "neon")}, tmp_path)


def _distill_briefly(mini_zoo, teachers: dict[str, Path], tmp_path: Path) -> None:
    from dmm.data.config import PromptsConfig, SampleConfig
    from dmm.data.prompts import build_prompts
    from dmm.data.samples import sample_all
    from dmm.distill.config import DistillConfig
    from dmm.distill.trainer import distill
    from dmm.student.pipeline import DMMStudentPipeline

    zoo, manifest = mini_zoo
    build_prompts(PromptsConfig(n_train=8, n_eval=4), tmp_path / "prompts", manifest)
    sample_all(
        teachers, zoo / "base", tmp_path / "prompts/train.jsonl", tmp_path / "samples",
        SampleConfig(steps=2, batch_size=8), progress=False,
    )  # fmt: skip
    samples = tmp_path / "samples"
    specs = [{"name": n, "path": p, "samples": samples / n} for n, p in teachers.items()]
    run = tmp_path / "run"
    distill(
        DistillConfig(
            base=zoo / "base",
            teachers=specs,
            output_dir=run,
            steps=3,
            batch_size=3,
            checkpoint_every=5,
            log_every=1,
            warmup_steps=0,
            progress=False,
        )  # fmt: skip
    )
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for name in teachers:
        assert last[f"loss_score/{name}"] > 0
    pipe = DMMStudentPipeline.from_pretrained(run / "student", local_files_only=True)
    assert pipe.style_names == list(teachers)


@pytest.mark.bad_input
def test_sd15_lora_against_an_sdxl_base(zoo, states, tmp_path):
    from dmm.zoo.sdxl import build_sdxl_miniature

    build_sdxl_miniature(tmp_path / "xl")
    base = tmp_path / "xl" / "base"
    base_unet, base_text = states["base"]
    unet_lora = extract(base_unet, states["neon"][0], 2)
    text_lora = extract(base_text, states["neon"][1], 2)
    path = write_kohya(tmp_path / "x.safetensors", unet_lora, text_lora)
    for lora, needle in (
        (path, "LoRA for SD1.5 offered against an SDXL base (lora_te_"),
        (write_peft(tmp_path / "u.safetensors", unet_lora), "not supported yet"),
    ):
        entry = TeacherEntry(name="t", lora=str(lora))
        with pytest.raises(DmmError) as info:
            materialize_teacher(entry, base, tmp_path / "out" / "t", zoo_dir=zoo)
        assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
        assert not (tmp_path / "out").exists()
