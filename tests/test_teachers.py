"""Teacher manifest, sources and validation, with a bad-input suite.

The zoo used here is built in the test from the zoo's component factories
(untrained, well under a second): the code paths are those of a real zoo, and
one test runs ``dmm teachers check`` on the conftest ``mini_zoo`` too. Every
bad input must fail with ONE line that names the file and the problem, and
leave nothing in the output directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dmm.atomic import DmmError
from dmm.student.export import export_single_file
from dmm.teachers import (
    TeacherEntry,
    TeacherManifest,
    load_manifest,
    manifest_sha256,
    materialize_teacher,
    source_kind,
    validate_teacher,
)
from dmm.teachers.cli import teachers_app
from dmm.teachers.manifest import TEACHER_NAME_RE
from dmm.teachers.sources import TEACHER_JSON, resolve_base

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
TEXT_FILE = "text_encoder/model.safetensors"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from threads on a shared 2-core box.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """zoo/base and zoo/teachers/{pastel, neon}; neon also tunes its text encoder."""
    import copy

    from dmm.zoo.build import make_pipeline, vocabulary
    from dmm.zoo.models import MAX_TOKENS, make_autoencoder, make_text_encoder, make_unet
    from dmm.zoo.tokenizer import BOS, EOS, build_tokenizer

    root = tmp_path_factory.mktemp("tzoo") / "zoo"
    torch.manual_seed(0)
    tokenizer = build_tokenizer(vocabulary(), root / "_tok", MAX_TOKENS)
    vocab = tokenizer.get_vocab()
    text_encoder = make_text_encoder(len(vocab), vocab[BOS], vocab[EOS])
    unet, vae = make_unet(8), make_autoencoder()
    make_pipeline(unet, text_encoder, tokenizer, vae).save_pretrained(root / "base")
    for seed, (style, tune_text) in enumerate((("pastel", False), ("neon", True)), start=1):
        t_unet, t_text = copy.deepcopy(unet), copy.deepcopy(text_encoder)
        _perturb(t_unet, seed)
        if tune_text:
            _perturb(t_text, seed + 10)
        make_pipeline(t_unet, t_text, tokenizer, vae).save_pretrained(root / "teachers" / style)
    shutil.rmtree(root / "_tok")
    return root


@pytest.fixture(scope="module")
def neon_file(zoo, tmp_path_factory) -> Path:
    """The neon teacher as one LDM-layout file (UNet, text encoder, patch VAE)."""
    out = tmp_path_factory.mktemp("files") / "neon.safetensors"
    export_single_file(zoo / "teachers" / "neon", out)
    return out


def _copy_teacher(zoo: Path, dst: Path, style: str = "pastel") -> Path:
    shutil.copytree(zoo / "teachers" / style, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _fails(
    entry: TeacherEntry,
    zoo: Path,
    out_root: Path,
    *needles: str,
    repo_root: Path | None = None,
) -> str:
    """Materializing fails with one line holding every needle, and leaves nothing behind."""
    with pytest.raises(DmmError) as info:
        materialize_teacher(
            entry, zoo / "base", out_root / entry.name, zoo_dir=zoo, repo_root=repo_root
        )
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    left = list(out_root.iterdir()) if out_root.exists() else []
    assert left == [], f"left behind: {left}"
    return msg


# --- manifest --------------------------------------------------------------------------------


def test_manifest_parses_every_source_kind(tmp_path):
    text = """
base: zoo:base
teachers:
  - {name: pastel, source: "zoo:pastel"}
  - {name: anime-v2, source: models/anime}
  - {name: real.ish, source: models/realish.safetensors, sha256: %s}
  - {name: old_one, source: models/old.ckpt, allow_pickle: true}
  - {name: hubby, source: "hub:someone/sd15-finetune@0123abc"}
""" % ("AB" * 32)
    path = tmp_path / "teachers.yaml"
    path.write_text(text)
    m = load_manifest(path)
    assert isinstance(m, TeacherManifest)
    assert m.names == ["pastel", "anime-v2", "real.ish", "old_one", "hubby"]
    assert [t.kind for t in m.teachers] == ["zoo", "diffusers", "single_file", "pickle", "hub"]
    assert m.teachers[2].sha256 == "ab" * 32  # normalised to lower case
    assert m.teachers[3].allow_pickle and not m.teachers[0].allow_pickle
    assert manifest_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert TeacherManifest(teachers=[]).base == "zoo:base"


@pytest.mark.parametrize(
    "source, kind",
    [
        ("zoo:neon", "zoo"),
        ("zoo:base", "zoo"),
        ("data/teachers/anime", "diffusers"),
        ("/abs/models/sd-v1.5", "diffusers"),
        ("x/model.safetensors", "single_file"),
        ("x/model.SAFETENSORS", "single_file"),
        ("x/model.ckpt", "pickle"),
        ("x/model.pt", "pickle"),
        ("hub:runwayml/stable-diffusion-v1-5@main", "hub"),
    ],
)
def test_source_kind(source, kind):
    assert source_kind(source) == kind


@pytest.mark.parametrize("source", ["s3://bucket/model", "https://x.org/m", "m.onnx", "m.gguf"])
def test_unknown_source_kind(source):
    with pytest.raises(DmmError, match="unknown source kind"):
        source_kind(source)


def test_name_rule_is_the_style_name_rule():
    from dmm.student.codebook import STYLE_NAME_RE

    assert TEACHER_NAME_RE.pattern == STYLE_NAME_RE.pattern


@pytest.mark.parametrize(
    "text, needle",
    [
        (None, "teacher manifest not found"),
        ("teachers:\n  - name: a\n   source: zoo:a\n", "invalid YAML at line 3"),
        ("teachers: [a, b", "invalid YAML at line"),
        ("- name: a\n", "expected a mapping"),
        ("", "got an empty file"),
        (
            "teachers:\n  - {name: a, source: 'zoo:a'}\n  - {name: b, source: 'zoo:b'}\n"
            "  - {name: a, source: 'zoo:c'}\n  - {name: B, source: 'zoo:d'}\n",
            "duplicate teacher names: a, b/B",
        ),
        ("teachers:\n  - {name: 'bad name', source: 'zoo:a'}\n", "teachers[0].name: invalid"),
        ("teachers:\n  - {name: ../up, source: 'zoo:a'}\n", "invalid teacher name '../up'"),
        ("teachers:\n  - {name: a, source: 's3://b/m'}\n", "unknown source kind 's3://b/m'"),
        ("teachers:\n  - {name: a, source: m.onnx}\n", "teachers[0].source: unknown source kind"),
        ("teachers:\n  - {name: a, source: 'hub:repo'}\n", "write hub:<repo_id>@<revision>"),
        ("teachers:\n  - {name: a, source: 'zoo:a', sha256: xyz}\n", "64 hex digits"),
        ("teachers:\n  - {name: a, source: 'zoo:a', colour: red}\n", "teachers[0].colour"),
        ("base: zoo:base\n", "teachers: Field required"),
    ],
)
def test_manifest_errors_are_one_line_naming_the_file(tmp_path, text, needle):
    path = tmp_path / "teachers.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DmmError) as info:
        load_manifest(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert needle in msg


def test_manifest_paths_must_stay_in_the_project(tmp_path):
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.safetensors").write_bytes(b"")
    (project / "models" / "link.safetensors").symlink_to(outside / "x.safetensors")
    (project / "models" / "ok.safetensors").write_bytes(b"")
    cases = {
        "../elsewhere/x.safetensors": "outside the project",
        str(outside / "x.safetensors"): "outside the project",
        "models/link.safetensors": "outside the project",  # a symlink escaping
        "models/../../elsewhere/x.safetensors": "outside the project",
    }
    for source, needle in cases.items():
        path = project / "teachers.yaml"
        path.write_text(f"teachers:\n  - {{name: a, source: '{source}'}}\n")
        with pytest.raises(DmmError) as info:
            load_manifest(path, repo_root=project)
        assert needle in str(info.value) and str(path) in str(info.value)
        assert "\n" not in str(info.value)
        load_manifest(path)  # without a project root, no containment rule
    path.write_text("base: ../base\nteachers:\n  - {name: a, source: models/ok.safetensors}\n")
    with pytest.raises(DmmError, match="base '../base' resolves to"):
        load_manifest(path, repo_root=project)
    path.write_text("teachers:\n  - {name: a, source: models/ok.safetensors}\n")
    assert load_manifest(path, repo_root=project).names == ["a"]


# --- good sources ----------------------------------------------------------------------------


def test_validate_teacher_records_text_encoder_tuning(zoo):
    pastel = validate_teacher(zoo / "teachers" / "pastel", zoo / "base", "pastel")
    neon = validate_teacher(zoo / "teachers" / "neon", zoo / "base", "neon")
    assert pastel["status"] == neon["status"] == "ok"
    assert pastel["trained_text_encoder"] is False
    assert neon["trained_text_encoder"] is True
    assert pastel["unet_changed_tensors"] > 0
    digest = hashlib.sha256((zoo / "teachers" / "pastel" / UNET_FILE).read_bytes()).hexdigest()
    assert pastel["unet_sha256"] == digest
    base = validate_teacher(zoo / "base", zoo / "base", "base")
    assert "identical to the base" in base["detail"]


def test_materialize_zoo_teacher(zoo, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "teachers" / "neon"
    meta = materialize_teacher(
        TeacherEntry(name="neon", source="zoo:neon"), zoo / "base", out, zoo_dir=zoo
    )
    assert meta["name"] == "neon" and meta["kind"] == "zoo" and meta["source"] == "zoo:neon"
    assert meta["trained_text_encoder"] is True and meta["path"] == str(out)
    assert meta["sha256"] == hashlib.sha256((out / UNET_FILE).read_bytes()).hexdigest()
    assert json.loads((out / TEACHER_JSON).read_text()) == meta
    assert (out / UNET_FILE).read_bytes() == (zoo / "teachers/neon" / UNET_FILE).read_bytes()
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == 64
    assert sorted(p.name for p in out.parent.iterdir()) == ["neon"]  # no temp leftovers


def test_materialize_diffusers_folder_copies_only_what_is_needed(zoo, tmp_path):
    project = tmp_path / "project"
    src = _copy_teacher(zoo, project / "models" / "anime")
    (src / "unet" / "custom_code.py").write_text("raise SystemExit('never run')\n")
    torch.save({"x": torch.zeros(1)}, src / "unet" / "diffusion_pytorch_model.bin")
    (src / "v1-5-pruned.ckpt").write_bytes(b"big root checkpoint nobody needs")
    out = project / "data" / "teachers" / "anime"
    entry = TeacherEntry(name="anime", source="models/anime")
    meta = materialize_teacher(entry, zoo / "base", out, zoo_dir=zoo, repo_root=project)
    assert meta["kind"] == "diffusers" and meta["trained_text_encoder"] is False
    assert sorted(p.name for p in (out / "unet").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    assert not (out / "v1-5-pruned.ckpt").exists()


def test_materialize_single_file_is_exact(zoo, neon_file, tmp_path):
    out = tmp_path / "neon"
    meta = materialize_teacher(
        TeacherEntry(name="neon", source=str(neon_file)), zoo / "base", out, zoo_dir=zoo
    )
    assert meta["kind"] == "single_file" and meta["trained_text_encoder"] is True
    assert meta["source_sha256"] == hashlib.sha256(neon_file.read_bytes()).hexdigest()
    for rel in (UNET_FILE, TEXT_FILE, "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(zoo / "teachers/neon" / rel), load_file(out / rel)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), rel


def test_single_file_without_text_encoder_uses_the_base_one(zoo, neon_file, tmp_path):
    state = load_file(neon_file)
    unet_only = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    path = tmp_path / "unet_only.safetensors"
    save_file(unet_only, path)
    out = tmp_path / "out" / "u"
    meta = materialize_teacher(
        TeacherEntry(name="u", source=str(path)), zoo / "base", out, zoo_dir=zoo
    )
    assert meta["trained_text_encoder"] is False
    assert (out / TEXT_FILE).read_bytes() == (zoo / "base" / TEXT_FILE).read_bytes()


def test_pickle_with_opt_in_loads_weights_only(zoo, neon_file, tmp_path):
    ckpt = tmp_path / "neon.ckpt"
    torch.save({"state_dict": load_file(neon_file), "global_step": 7}, ckpt)
    out = tmp_path / "out" / "neon"
    entry = TeacherEntry(name="neon", source=str(ckpt), allow_pickle=True)
    meta = materialize_teacher(entry, zoo / "base", out, zoo_dir=zoo)
    assert meta["kind"] == "pickle"
    assert (out / UNET_FILE).is_file()


def test_hub_source_downloads_pinned_revision_when_online(zoo, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, **kwargs):
        calls.append((repo_id, revision, kwargs))
        snap = tmp_path / "snapshot"
        if not snap.exists():
            _copy_teacher(zoo, snap)
        return str(snap)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    entry = TeacherEntry(name="hubby", source="hub:someone/sd15-ft@0123abc")
    meta = materialize_teacher(entry, zoo / "base", tmp_path / "out" / "hubby", zoo_dir=zoo)
    assert meta["kind"] == "hub"
    (repo, rev, kwargs) = calls[0]
    assert (repo, rev) == ("someone/sd15-ft", "0123abc")
    assert "*.bin" in kwargs["ignore_patterns"] and "*.py" in kwargs["ignore_patterns"]
    assert "trust_remote_code" not in kwargs


def test_failed_rematerialize_keeps_the_previous_folder(zoo, tmp_path):
    out = tmp_path / "teachers" / "pastel"
    materialize_teacher(
        TeacherEntry(name="pastel", source="zoo:pastel"), zoo / "base", out, zoo_dir=zoo
    )
    before = (out / UNET_FILE).read_bytes()
    with pytest.raises(DmmError, match="sha256 mismatch"):
        materialize_teacher(
            TeacherEntry(name="pastel", source="zoo:pastel", sha256="0" * 64),
            zoo / "base",
            out,
            zoo_dir=zoo,
        )
    assert (out / UNET_FILE).read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["pastel"]


def test_resolve_base(zoo, tmp_path):
    assert resolve_base("zoo:base", zoo_dir=zoo) == zoo / "base"
    assert resolve_base(str(zoo / "base"), zoo_dir=zoo) == zoo / "base"
    with pytest.raises(DmmError, match="zoo model 'nope' not found"):
        resolve_base("zoo:nope", zoo_dir=zoo)
    single = tmp_path / "base.safetensors"
    single.write_bytes(b"\0" * 16)
    with pytest.raises(DmmError, match="cannot convert the single-file base"):
        resolve_base(str(single), zoo_dir=zoo, work_dir=tmp_path / "w")


# --- bad inputs ------------------------------------------------------------------------------


@pytest.mark.bad_input
def test_truncated_safetensors(zoo, neon_file, tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(neon_file.read_bytes()[: neon_file.stat().st_size // 2])
    entry = TeacherEntry(name="cut", source=str(bad))
    _fails(entry, zoo, tmp_path / "out", str(bad), "truncated or corrupt")


@pytest.mark.bad_input
def test_empty_file(zoo, tmp_path):
    for name in ("empty.safetensors", "empty.ckpt"):
        bad = tmp_path / name
        bad.write_bytes(b"")
        entry = TeacherEntry(name="empty", source=str(bad), allow_pickle=True)
        _fails(entry, zoo, tmp_path / "out", str(bad), "empty file")


@pytest.mark.bad_input
def test_wrong_dtype(zoo, neon_file, tmp_path):
    state = load_file(neon_file)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = (state[key] * 100).to(torch.int32)
    bad = tmp_path / "ints.safetensors"
    save_file(state, bad)
    entry = TeacherEntry(name="ints", source=str(bad))
    _fails(entry, zoo, tmp_path / "out", str(bad), "wrong dtype", f"{key} is torch.int32")


@pytest.mark.bad_input
def test_wrong_dtype_in_a_folder(zoo, tmp_path):
    src = _copy_teacher(zoo, tmp_path / "src")
    state = load_file(src / UNET_FILE)
    state["conv_in.bias"] = state["conv_in.bias"].to(torch.int64)
    save_file(state, src / UNET_FILE)
    entry = TeacherEntry(name="ints", source=str(src))
    _fails(entry, zoo, tmp_path / "out", str(src), "UNet wrong dtype", "conv_in.bias is I64")


@pytest.mark.bad_input
def test_sdxl_checkpoint_against_sd15_base(zoo, tmp_path):
    # Only SDXL's distinguishing keys and shapes: a second text encoder under
    # conditioner.embedders, the 2816-wide label_emb, 2048-wide cross-attention.
    sdxl = {
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (
            torch.zeros(77, 768)
        ),
        "conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 1280),
        "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (
            torch.zeros(640, 2048)
        ),
    }
    bad = tmp_path / "sdxl.safetensors"
    save_file(sdxl, bad)
    entry = TeacherEntry(name="xl", source=str(bad))
    _fails(entry, zoo, tmp_path / "out", str(bad), "SDXL checkpoint offered against an SD1.5 base")
    # A diffusers SDXL folder names its pipeline class in model_index.json.
    folder = _copy_teacher(zoo, tmp_path / "xl_folder")
    _edit_json(folder / "model_index.json", _class_name="StableDiffusionXLPipeline")
    entry = TeacherEntry(name="xl", source=str(folder))
    _fails(entry, zoo, tmp_path / "out", str(folder), "SDXL checkpoint offered against an SD1.5")


@pytest.mark.bad_input
def test_pickle_without_opt_in(zoo, neon_file, tmp_path):
    ckpt = tmp_path / "neon.ckpt"
    torch.save(load_file(neon_file), ckpt)
    entry = TeacherEntry(name="neon", source=str(ckpt))
    _fails(entry, zoo, tmp_path / "out", str(ckpt), "refusing to unpickle", "allow_pickle: true")


class _Evil:
    """A pickle payload that would create a file when unpickled without weights_only."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.bad_input
def test_hostile_pickle_with_opt_in_is_refused_by_weights_only(zoo, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil(str(marker))}, ckpt)
    entry = TeacherEntry(name="evil", source=str(ckpt), allow_pickle=True)
    _fails(entry, zoo, tmp_path / "out", str(ckpt), "weights_only=True")
    assert not marker.exists()


@pytest.mark.bad_input
def test_path_outside_the_project(zoo, neon_file, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "link.safetensors").symlink_to(neon_file)
    for source in (str(neon_file), "../" + neon_file.name, "link.safetensors"):
        entry = TeacherEntry(name="far", source=source)
        _fails(entry, zoo, project / "out", "outside the project", repo_root=project)


@pytest.mark.bad_input
def test_sha256_mismatch(zoo, neon_file, tmp_path):
    for source, pinned in (("zoo:pastel", zoo / "teachers/pastel" / UNET_FILE), (neon_file, None)):
        pinned = pinned or neon_file
        actual = hashlib.sha256(Path(pinned).read_bytes()).hexdigest()
        entry = TeacherEntry(name="p", source=str(source), sha256="ab" * 32)
        _fails(entry, zoo, tmp_path / "out", str(pinned), "sha256 mismatch", "ab" * 32, actual)


@pytest.mark.bad_input
def test_hub_source_while_offline(zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = TeacherEntry(name="hubby", source="hub:someone/sd15-ft@main")
    _fails(entry, zoo, tmp_path / "out", "hub:someone/sd15-ft@main", "HF_HUB_OFFLINE=1")


@pytest.mark.bad_input
def test_nan_weights(zoo, neon_file, tmp_path):
    src = _copy_teacher(zoo, tmp_path / "src")
    state = load_file(src / UNET_FILE)
    state["conv_out.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, src / UNET_FILE)
    entry = TeacherEntry(name="nan", source=str(src))
    _fails(entry, zoo, tmp_path / "out", str(src), "NaN/inf", "conv_out.weight")
    ldm = load_file(neon_file)
    ldm["model.diffusion_model.out.2.bias"][0] = float("inf")
    bad = tmp_path / "inf.safetensors"
    save_file(ldm, bad)
    entry = TeacherEntry(name="inf", source=str(bad))
    _fails(entry, zoo, tmp_path / "out", str(bad), "NaN/inf", "model.diffusion_model.out.2.bias")


@pytest.mark.bad_input
def test_different_scheduler_config(zoo, tmp_path):
    src = _copy_teacher(zoo, tmp_path / "src")
    _edit_json(src / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
    entry = TeacherEntry(name="vpred", source=str(src))
    _fails(
        entry,
        zoo,
        tmp_path / "out",
        str(src),
        "scheduler config differs: prediction_type 'v_prediction' vs base 'epsilon'",
    )


@pytest.mark.bad_input
def test_different_vae_config(zoo, tmp_path):
    src = _copy_teacher(zoo, tmp_path / "src")
    _edit_json(src / "vae" / "config.json", scaling_factor=0.5)
    entry = TeacherEntry(name="vae", source=str(src))
    _fails(entry, zoo, tmp_path / "out", str(src), "VAE config differs: scaling_factor 0.5")


@pytest.mark.bad_input
def test_unet_architecture_mismatch(zoo, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from dmm.zoo.build import make_pipeline

    src = _copy_teacher(zoo, tmp_path / "src")
    pipe = StableDiffusionPipeline.from_pretrained(src, local_files_only=True)
    cfg = dict(pipe.unet.config)
    cfg["block_out_channels"] = [32, 64, 96]
    wide = UNet2DConditionModel.from_config(cfg)
    shutil.rmtree(src)
    make_pipeline(wide, pipe.text_encoder, pipe.tokenizer, pipe.vae).save_pretrained(src)
    entry = TeacherEntry(name="wide", source=str(src))
    msg = _fails(entry, zoo, tmp_path / "out", str(src), "UNet architecture differs")
    assert "block_out_channels [32, 64, 96] vs base [32, 64, 64]" in msg
    assert "UNet shape mismatches" in msg


@pytest.mark.bad_input
def test_missing_and_unexpected_keys_in_a_single_file(zoo, neon_file, tmp_path):
    state = load_file(neon_file)
    del state["model.diffusion_model.out.2.weight"]
    state["model.diffusion_model.extra.weight"] = torch.zeros(2)
    bad = tmp_path / "keys.safetensors"
    save_file(state, bad)
    entry = TeacherEntry(name="keys", source=str(bad))
    _fails(
        entry,
        zoo,
        tmp_path / "out",
        str(bad),
        "UNet missing keys: model.diffusion_model.out.2.weight",
        "unexpected keys: model.diffusion_model.extra.weight",
    )


@pytest.mark.bad_input
def test_folder_pickle_weights_are_not_loaded(zoo, tmp_path):
    src = _copy_teacher(zoo, tmp_path / "src")
    (src / UNET_FILE).unlink()
    torch.save({"x": torch.zeros(1)}, src / "unet" / "diffusion_pytorch_model.bin")
    entry = TeacherEntry(name="bin", source=str(src), allow_pickle=True)
    _fails(entry, zoo, tmp_path / "out", str(src), "only a pickle (.bin)")


@pytest.mark.bad_input
def test_not_a_pipeline(zoo, tmp_path):
    (tmp_path / "empty_dir").mkdir()
    entry = TeacherEntry(name="nope", source=str(tmp_path / "empty_dir"))
    _fails(entry, zoo, tmp_path / "out", str(tmp_path / "empty_dir"), "no model_index.json")
    partial = _copy_teacher(zoo, tmp_path / "partial")
    shutil.rmtree(partial / "tokenizer")
    entry = TeacherEntry(name="nope", source=str(partial))
    _fails(entry, zoo, tmp_path / "out", str(partial), "missing folder tokenizer/")
    entry = TeacherEntry(name="nope", source="zoo:nope")
    _fails(entry, zoo, tmp_path / "out", "zoo model 'nope' not found", "known: neon, pastel")


# --- CLI -------------------------------------------------------------------------------------


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(teachers_app, name="teachers")
    return app


def test_cli_check_prints_a_table_and_fails_on_a_bad_teacher(zoo, neon_file, tmp_path):
    bad = tmp_path / "vpred"
    _copy_teacher(zoo, bad)
    _edit_json(bad / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
    shutil.copy(neon_file, tmp_path / "neon.safetensors")
    manifest = tmp_path / "teachers.yaml"
    manifest.write_text(
        "base: zoo:base\nteachers:\n"
        "  - {name: pastel, source: 'zoo:pastel'}\n"
        "  - {name: neon, source: neon.safetensors}\n"
        "  - {name: vpred, source: vpred}\n"
    )
    args = ["teachers", "check", "--manifest", str(manifest), "--zoo", str(zoo)]
    result = CliRunner().invoke(_cli(), [*args, "--root", str(tmp_path)])
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[1].split()[:3] == ["NAME", "SOURCE", "STATUS"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["pastel"][1:4] == ["zoo", "ok", "no"]
    assert rows["neon"][1:4] == ["single_file", "ok", "yes"]
    assert rows["vpred"][1:3] == ["diffusers", "FAIL"]
    assert "prediction_type 'v_prediction'" in result.stdout
    assert "1 of 3 teachers failed: vpred" in result.stderr

    only = CliRunner().invoke(_cli(), [*args, "--root", str(tmp_path), "--only", "pastel"])
    assert only.exit_code == 0, only.output
    manifest.write_text("teachers:\n  - {name: far, source: ../vpred}\n")
    outside = CliRunner().invoke(_cli(), [*args, "--root", str(tmp_path / "sub")])
    assert outside.exit_code == 2 and "outside the project" in outside.stderr


def test_cli_materialize(zoo, tmp_path):
    manifest = tmp_path / "teachers.yaml"
    manifest.write_text("teachers:\n  - {name: pastel, source: 'zoo:pastel'}\n")
    out = tmp_path / "data" / "teachers"
    result = CliRunner().invoke(
        _cli(),
        ["teachers", "materialize", "--manifest", str(manifest), "--zoo", str(zoo)]
        + ["--out", str(out), "--root", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    assert (out / "pastel" / TEACHER_JSON).is_file()
    missing = CliRunner().invoke(
        _cli(), ["teachers", "check", "--manifest", str(tmp_path / "nope.yaml")]
    )
    assert missing.exit_code == 2
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: teacher manifest not found"


def test_cli_check_on_the_mini_zoo(mini_zoo, tmp_path):
    zoo_dir, manifest = mini_zoo
    path = tmp_path / "teachers.yaml"
    lines = [f"  - {{name: {s}, source: 'zoo:{s}'}}" for s in manifest["teachers"]]
    path.write_text("teachers:\n" + "\n".join(lines) + "\n")
    result = CliRunner().invoke(
        _cli(), ["teachers", "check", "--manifest", str(path), "--zoo", str(zoo_dir)]
    )
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:]}
    for style, info in manifest["teachers"].items():
        assert rows[style][2] == "ok"
        assert rows[style][3] == ("yes" if info["trained_text_encoder"] else "no")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


# --- bad inputs found outside the suite (#17) -----------------------------------------------


def _run_cli(*args: str):
    return CliRunner().invoke(_cli(), ["teachers", *args])


@pytest.mark.bad_input
def test_empty_teacher_list_is_one_line_and_writes_nothing(zoo, tmp_path):
    manifest = tmp_path / "teachers.yaml"
    manifest.write_text("base: zoo:base\nteachers: []\n")
    out = tmp_path / "data" / "teachers"
    common = ["--manifest", str(manifest), "--zoo", str(zoo), "--root", str(tmp_path)]
    for result in (_run_cli("check", *common), _run_cli("materialize", *common, "--out", str(out))):
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == f"error: {manifest}: no teachers listed under 'teachers'"
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "data").exists()


@pytest.mark.bad_input
def test_weights_symlinked_outside_the_project(zoo, tmp_path):
    project = tmp_path / "project"
    src = _copy_teacher(zoo, project / "models" / "pastel")
    (src / UNET_FILE).unlink()
    (src / UNET_FILE).symlink_to(zoo / "teachers" / "pastel" / UNET_FILE)
    manifest = project / "teachers.yaml"
    manifest.write_text("teachers:\n  - {name: pastel, source: models/pastel}\n")
    common = ["--manifest", str(manifest), "--zoo", str(zoo), "--root", str(project)]
    checked = _run_cli("check", *common)
    assert checked.exit_code == 1, checked.output
    row = checked.stdout.splitlines()[2]
    assert row.split()[:3] == ["pastel", "diffusers", "FAIL"], row
    assert "diffusion_pytorch_model.safetensors" in row and "outside the project" in row
    out = project / "data" / "teachers"
    made = _run_cli("materialize", *common, "--out", str(out))
    assert made.exit_code == 1, made.output
    assert "outside the project" in made.stderr and len(made.stderr.strip().splitlines()) == 1
    assert not (project / "data").exists()
    entry = TeacherEntry(name="pastel", source="models/pastel")
    _fails(entry, zoo, project / "out", "outside the project", repo_root=project)


@pytest.mark.bad_input
def test_unsafe_pickle_refusal_keeps_its_cause_in_one_line(zoo, tmp_path):
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil(str(tmp_path / "p"))}, ckpt)
    entry = TeacherEntry(name="evil", source=str(ckpt), allow_pickle=True)
    msg = _fails(entry, zoo, tmp_path / "out", str(ckpt), "weights_only=True")
    assert msg.endswith("(it asks for getattr, not an allowed global)"), msg
    assert "\x1b" not in msg and "torch.serialization" not in msg


# --- families (#22.4) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_zoo(tmp_path_factory) -> Path:
    """The miniature SDXL-shaped zoo (two text encoders, text_time; about a second)."""
    from dmm.zoo.sdxl import build_sdxl_miniature

    out = tmp_path_factory.mktemp("xl") / "zoo"
    build_sdxl_miniature(out)
    return out


def _fails_on(base: Path, entry: TeacherEntry, zoo: Path, out_root: Path, *needles: str) -> str:
    with pytest.raises(DmmError) as info:
        materialize_teacher(entry, base, out_root / entry.name, zoo_dir=zoo)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert not out_root.exists()
    return msg


@pytest.mark.bad_input
def test_mixed_families_are_refused_both_ways(zoo, neon_file, sdxl_zoo, tmp_path):
    xl_base, xl_teacher = sdxl_zoo / "base", sdxl_zoo / "teachers" / "xl_pastel"
    needle = "SD1.5 checkpoint offered against an SDXL base"
    for source in ("zoo:pastel", str(neon_file)):
        entry = TeacherEntry(name="sd", source=source)
        _fails_on(xl_base, entry, zoo, tmp_path / "out", needle)
    entry = TeacherEntry(name="xl", source=str(xl_teacher))
    msg = _fails(entry, zoo, tmp_path / "out", str(xl_teacher))
    assert msg.endswith("SDXL checkpoint offered against an SD1.5 base"), msg
    # An SDXL teacher on an SDXL base is recognised, then refused as not supported yet.
    _fails_on(
        xl_base, entry, zoo, tmp_path / "out", "SDXL teachers and bases are not supported yet"
    )


@pytest.mark.bad_input
def test_sdxl_refiner_offered_as_a_teacher(zoo, tmp_path):
    folder = _copy_teacher(zoo, tmp_path / "refiner")
    _edit_json(
        folder / "model_index.json",
        _class_name="StableDiffusionXLImg2ImgPipeline",
        text_encoder=[None, None],
        text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
        requires_aesthetics_score=True,
    )
    entry = TeacherEntry(name="r", source=str(folder))
    _fails(entry, zoo, tmp_path / "out", str(folder), "SDXL refiner offered as a teacher")
    single = {
        "conditioner.embedders.0.model.positional_embedding": torch.zeros(77, 1280),
        "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1280, 2560),
    }
    path = tmp_path / "refiner.safetensors"
    save_file(single, path)
    entry = TeacherEntry(name="r", source=str(path))
    _fails(entry, zoo, tmp_path / "out", str(path), "SDXL refiner offered as a teacher")


@pytest.mark.bad_input
def test_sdxl_single_file_missing_its_second_text_encoder(zoo, tmp_path):
    single = {
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (
            torch.zeros(77, 768)
        ),
        "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1280, 2816),
    }
    path = tmp_path / "xl.safetensors"
    save_file(single, path)
    entry = TeacherEntry(name="xl", source=str(path))
    _fails(entry, zoo, tmp_path / "out", str(path), "without its second text encoder")


def test_family_of_a_dmm_student_file_is_sd15():
    # A dmm student stores its style MLP under label_emb, at the timestep width.
    from dmm.teachers.validate import keys_family

    assert keys_family({"model.diffusion_model.label_emb.0.0.weight": (1280, 1280)}) == "sd15"
    assert keys_family({"model.diffusion_model.label_emb.0.0.weight": (1280, 2816)}) == "sdxl"
