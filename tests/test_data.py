"""Prompt sets, teacher samples and image-folder encoding on the miniature zoo."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from dmm.atomic import DmmError
from dmm.data.config import ImageFolderConfig, PromptsConfig, SampleConfig
from dmm.data.prompts import build_prompts, read_prompts, sha256_file, zoo_captions
from dmm.zoo import scenes as S

# ---------------------------------------------------------------- prompts


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _caption_combos() -> dict[str, tuple]:
    return {S.Scene(*c, size=s).caption: c for c in S.all_combos() for s in S.SIZES}


def test_zoo_prompts_split_held_out_and_disjoint(tmp_path):
    meta = build_prompts(PromptsConfig(n_train=40, n_eval=10, seed=3), tmp_path / "p")
    train, evals = _lines(tmp_path / "p/train.jsonl"), _lines(tmp_path / "p/eval.jsonl")
    assert [r["id"] for r in train] == list(range(40))
    assert [r["id"] for r in evals] == list(range(10))
    tp, ep = [r["prompt"] for r in train], [r["prompt"] for r in evals]
    assert len(set(tp)) == 40 and len(set(ep)) == 10 and not set(tp) & set(ep)
    _, held = S.split_combos(0, 12)
    combo_of = _caption_combos()
    assert all(combo_of[p] in held for p in ep)
    assert not any(combo_of[p] in held for p in tp)
    assert meta["counts"] == {"train": 40, "eval": 10}
    for name in ("train.jsonl", "eval.jsonl"):
        assert meta["sha256"][name] == sha256_file(tmp_path / "p" / name)
    assert json.loads((tmp_path / "p/prompts.json").read_text()) == meta


def test_zoo_prompts_deterministic_by_seed(tmp_path):
    for d, seed in (("a", 1), ("b", 1), ("c", 2)):
        build_prompts(PromptsConfig(n_train=20, n_eval=5, seed=seed), tmp_path / d)
    a, b, c = ((tmp_path / d / "train.jsonl").read_bytes() for d in "abc")
    assert a == b and a != c
    assert read_prompts(tmp_path / "a/train.jsonl") == [
        r["prompt"] for r in _lines(tmp_path / "a/train.jsonl")
    ]


def test_zoo_prompts_capped_with_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dmm.data.prompts"):
        meta = build_prompts(PromptsConfig(n_train=10_000, n_eval=1_000), tmp_path / "p")
    train_combos, held = S.split_combos(0, 12)
    assert meta["counts"] == {"train": len(zoo_captions(train_combos)), "eval": len(held) * 2}
    assert sum("distinct" in r.message for r in caplog.records) == 2


def test_zoo_prompts_checked_against_manifest(tmp_path, mini_zoo):
    _, manifest = mini_zoo
    build_prompts(PromptsConfig(n_train=4, n_eval=2), tmp_path / "ok", zoo_manifest=manifest)
    with pytest.raises(DmmError, match="held-out combos"):
        build_prompts(PromptsConfig(zoo_seed=5), tmp_path / "bad", zoo_manifest=manifest)
    assert not (tmp_path / "bad").exists()


def test_txt_prompts_normalised_and_deduplicated(tmp_path):
    src = tmp_path / "p.txt"
    lines = [
        "  a red  circle ",
        "",
        "A RED circle",
        "b\tsquare",
        "   ",
        *[f"p{i}" for i in range(8)],
    ]
    src.write_text("\n".join(lines) + "\n")
    assert read_prompts(src) == ["a red circle", "b square", *[f"p{i}" for i in range(8)]]
    cfg = PromptsConfig(source=str(src), n_train=100, n_eval=2, eval_fraction=0.5, seed=7)
    meta = build_prompts(cfg, tmp_path / "out")
    train = read_prompts(tmp_path / "out/train.jsonl")
    evals = read_prompts(tmp_path / "out/eval.jsonl")
    assert len(evals) == 2 and len(train) == 8 and not set(train) & set(evals)
    assert set(train) | set(evals) == set(read_prompts(src))
    assert meta["duplicates_or_empty_dropped"] == 3
    assert meta["source_sha256"] == sha256_file(src)
    build_prompts(cfg, tmp_path / "again")
    assert (tmp_path / "again/eval.jsonl").read_bytes() == (
        tmp_path / "out/eval.jsonl"
    ).read_bytes()


def test_jsonl_prompts_and_line_numbered_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "one"}\n\n{"caption": " two  words"}\n{"prompt": "ONE"}\n')
    assert read_prompts(good) == ["one", "two words"]
    cases = {
        '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n': "line 3: not valid JSON",
        '{"prompt": "a"}\n{"text": "b"}\n': 'line 2: no "prompt" or "caption" key',
        '["a"]\n': "line 1: not a JSON object",
        '{"prompt": 3}\n': 'line 1: "prompt" is not a string',
    }
    for i, (text, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.jsonl"
        bad.write_text(text)
        with pytest.raises(DmmError, match=message):
            read_prompts(bad)
        with pytest.raises(DmmError, match=message):
            build_prompts(PromptsConfig(source=str(bad)), tmp_path / f"o{i}")


def test_prompt_file_errors(tmp_path):
    with pytest.raises(DmmError, match="not found"):
        build_prompts(PromptsConfig(source=str(tmp_path / "nope.txt")), tmp_path / "o")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DmmError, match="holds no prompts"):
        build_prompts(PromptsConfig(source=str(empty)), tmp_path / "o")
    one = tmp_path / "one.txt"
    one.write_text("only\nONLY\n")
    with pytest.raises(DmmError, match="1 unique prompt.*at least 2"):
        build_prompts(PromptsConfig(source=str(one)), tmp_path / "o")
    meta = build_prompts(PromptsConfig(source=str(one), n_eval=0), tmp_path / "o")
    assert meta["counts"] == {"train": 1, "eval": 0}
    with pytest.raises(ValidationError):
        PromptsConfig(source="prompts.csv")


# ---------------------------------------------------------------- teacher samples

STEPS = 2
CFG = SampleConfig(steps=STEPS, samples_per_prompt=2, batch_size=4, shard_size=4)


@pytest.fixture(scope="module")
def sampled(mini_zoo, tmp_path_factory):
    """Samples of a teacher with its own text encoder (neon) and one without (pastel)."""
    from dmm.data.samples import sample_all, teachers_from_zoo

    zoo_dir, manifest = mini_zoo
    assert manifest["teachers"]["neon"]["trained_text_encoder"]
    assert not manifest["teachers"]["pastel"]["trained_text_encoder"]
    root = tmp_path_factory.mktemp("samples")
    build_prompts(PromptsConfig(n_train=3, n_eval=1, seed=1), root / "prompts")
    teachers = {k: v for k, v in teachers_from_zoo(zoo_dir).items() if k in ("neon", "pastel")}
    indexes = sample_all(
        teachers, zoo_dir / "base", root / "prompts/train.jsonl", root / "out", CFG, progress=False
    )
    prompts = read_prompts(root / "prompts/train.jsonl")
    return zoo_dir, root, prompts, indexes


def test_shards_contents_and_index(sampled):
    from dmm.data.samples import load_samples, load_uncond

    zoo_dir, root, prompts, indexes = sampled
    index = json.loads((root / "out/neon/index.json").read_text())
    assert index == indexes["neon"]
    assert index["teacher"] == "neon" and index["num_samples"] == 6
    assert index["shards"] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert index["latent_shape"] == [4, 16, 16]
    assert index["embed_shape"] == index["base_embed_shape"] == [16, 64]
    assert index["teacher_sha256"] == sha256_file(
        zoo_dir / "teachers/neon/unet/diffusion_pytorch_model.safetensors"
    )
    vae_cfg = json.loads((zoo_dir / "teachers/neon/vae/config.json").read_text())
    assert index["scaling_factor"] == pytest.approx(vae_cfg["scaling_factor"])
    assert index["config"] == CFG.model_dump()
    data = load_samples(root / "out/neon")
    assert set(data) == {"latents", "prompt_ids", "teacher_embeds", "base_embeds"}
    assert data["latents"].shape == (6, 4, 16, 16) and data["latents"].dtype == torch.float32
    assert data["teacher_embeds"].shape == data["base_embeds"].shape == (6, 16, 64)
    assert data["prompt_ids"].dtype == torch.int64
    assert data["prompt_ids"].tolist() == [0, 0, 1, 1, 2, 2]
    # Two draws of one prompt differ (own seeds); their embeddings do not.
    assert not torch.equal(data["latents"][0], data["latents"][1])
    assert torch.equal(data["teacher_embeds"][0], data["teacher_embeds"][1])
    uncond = load_uncond(root / "out/neon")
    assert uncond["teacher_embeds"].shape == uncond["base_embeds"].shape == (1, 16, 64)
    summary = json.loads((root / "out/samples.json").read_text())
    assert set(summary["teachers"]) == {"neon", "pastel"}


def test_teacher_embeds_follow_own_text_encoder(sampled):
    from diffusers import StableDiffusionPipeline

    from dmm.data.samples import load_samples, load_uncond

    zoo_dir, root, prompts, _ = sampled
    neon, pastel = load_samples(root / "out/neon"), load_samples(root / "out/pastel")
    assert not torch.allclose(neon["teacher_embeds"], neon["base_embeds"])
    assert torch.equal(pastel["teacher_embeds"], pastel["base_embeds"])
    assert torch.equal(neon["base_embeds"], pastel["base_embeds"])
    assert torch.equal(
        load_uncond(root / "out/pastel")["teacher_embeds"],
        load_uncond(root / "out/pastel")["base_embeds"],
    )
    # The cached embeddings are what the teacher's pipeline itself conditions on.
    pipe = StableDiffusionPipeline.from_pretrained(zoo_dir / "teachers/neon", local_files_only=True)
    own = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    assert torch.equal(neon["teacher_embeds"][::2], own)


def test_latents_decode_to_pipeline_images(sampled):
    from diffusers import StableDiffusionPipeline

    from dmm.data.samples import load_samples, sample_seed

    zoo_dir, root, prompts, index = sampled
    data = load_samples(root / "out/neon")
    pipe = StableDiffusionPipeline.from_pretrained(zoo_dir / "teachers/neon", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pairs = [(p, d) for p in range(len(prompts)) for d in range(CFG.samples_per_prompt)]
    # Same batches as the sampler, so that batched kernels see the same shapes.
    for start in range(0, len(pairs), CFG.batch_size):
        chunk = pairs[start : start + CFG.batch_size]
        gens = [torch.Generator().manual_seed(sample_seed(CFG.seed, p, d)) for p, d in chunk]
        images = pipe(
            [prompts[p] for p, _ in chunk],
            num_inference_steps=STEPS,
            guidance_scale=CFG.guidance_scale,
            generator=gens,
            output_type="pt",
        ).images
        latents = data["latents"][start : start + len(chunk)]
        with torch.no_grad():
            decoded = pipe.vae.decode(latents / index["neon"]["scaling_factor"]).sample
        torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), images, atol=1e-5, rtol=0)


def test_sampling_is_deterministic(sampled, tmp_path):
    from dmm.data.samples import load_samples, sample_teacher

    zoo_dir, root, prompts, _ = sampled
    sample_teacher(
        zoo_dir / "teachers/neon",
        zoo_dir / "base",
        prompts,
        tmp_path / "again",
        CFG,
        "neon",
        progress=False,
    )
    a, b = load_samples(root / "out/neon"), load_samples(tmp_path / "again")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_reuse_skips_work_and_config_change_resamples(sampled, tmp_path):
    from dmm.data.samples import load_samples, sample_teacher

    zoo_dir, root, prompts, _ = sampled
    out = tmp_path / "pastel"
    shutil.copytree(root / "out/pastel", out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    args = (zoo_dir / "teachers/pastel", zoo_dir / "base")
    sample_teacher(*args, prompts, out, CFG, "pastel", progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    half = CFG.model_copy(update={"dtype": "float16", "samples_per_prompt": 1})
    index = sample_teacher(*args, prompts[:1], out, half, "pastel", progress=False)
    assert index["num_samples"] == 1 and index["shards"] == ["shard-00000.safetensors"]
    data = load_samples(out)
    assert data["latents"].dtype == data["teacher_embeds"].dtype == torch.float16
    full = load_samples(root / "out/pastel")
    torch.testing.assert_close(data["latents"][0].float(), full["latents"][0], atol=1e-2, rtol=1e-2)


def test_torn_or_missing_shards_are_detected(sampled, tmp_path):
    from dmm.data.samples import load_samples

    _, root, _, _ = sampled
    out = tmp_path / "neon"
    shutil.copytree(root / "out/neon", out)
    shard = out / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DmmError, match="shard-00001.safetensors is torn"):
        load_samples(out)
    shard.unlink()
    with pytest.raises(DmmError, match="shard-00001.safetensors is missing"):
        load_samples(out)
    with pytest.raises(DmmError, match="index.json missing"):
        load_samples(tmp_path / "nowhere")


def test_sample_errors(mini_zoo, tmp_path):
    from dmm.data.samples import sample_teacher

    zoo_dir, _ = mini_zoo
    with pytest.raises(DmmError, match="not found"):
        sample_teacher(tmp_path / "x", zoo_dir / "base", ["a"], tmp_path / "o", CFG, "x")
    with pytest.raises(DmmError, match="no prompts"):
        sample_teacher(zoo_dir / "teachers/neon", zoo_dir / "base", [], tmp_path / "o", CFG, "n")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- image folders


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray((image * 255).round().astype(np.uint8)).save(path)


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    scenes = S.sample_scenes(S.all_combos(), 3, rng)
    imgs = S.render_batch(scenes, "base")
    _save_png(folder / "a.png", imgs[0])  # already 32x32: no resampling
    _save_png(folder / "b.png", np.repeat(imgs[1], 2, axis=1))  # 32x64, cropped
    _save_png(folder / "sub/c.png", imgs[2])
    (folder / "a.txt").write_text(f"  {scenes[0].caption}\n")
    (folder / "b.txt").write_text("ignored: captions.jsonl wins")
    rows = [{"file": "b.png", "caption": scenes[1].caption}, {"file": "sub/c.png", "caption": "c"}]
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_encode_image_folder(mini_zoo, image_folder, tmp_path):
    from PIL import Image

    from dmm.data.imagefolder import encode_image_folder
    from dmm.data.samples import load_component, load_samples, load_uncond

    zoo_dir, _ = mini_zoo
    cfg = ImageFolderConfig(batch_size=2, shard_size=2)
    index = encode_image_folder(
        image_folder, zoo_dir / "base", tmp_path / "enc", cfg, progress=False
    )
    assert index["files"] == ["a.png", "b.png", "sub/c.png"]
    assert index["prompts"][1:] == [
        json.loads(r)["caption"] for r in (image_folder / "captions.jsonl").read_text().splitlines()
    ]
    assert index["resolution"] == 32 and len(index["shards"]) == 2
    data = load_samples(tmp_path / "enc")
    assert data["latents"].shape == (3, 4, 16, 16)
    assert data["prompt_ids"].tolist() == [0, 1, 2]
    assert torch.equal(data["teacher_embeds"], data["base_embeds"])
    assert torch.equal(
        load_uncond(tmp_path / "enc")["teacher_embeds"][0],
        load_uncond(tmp_path / "enc")["base_embeds"][0],
    )
    vae = load_component(zoo_dir / "base", "vae")
    pixels = np.asarray(Image.open(image_folder / "a.png"), np.float32) / 127.5 - 1
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
    torch.testing.assert_close(data["latents"][:1], expected, atol=1e-6, rtol=0)
    mtime = (tmp_path / "enc/index.json").stat().st_mtime_ns
    encode_image_folder(image_folder, zoo_dir / "base", tmp_path / "enc", cfg, progress=False)
    assert (tmp_path / "enc/index.json").stat().st_mtime_ns == mtime


def test_image_folder_errors(mini_zoo, image_folder, tmp_path):
    from dmm.data.imagefolder import collect_images, encode_image_folder

    zoo_dir, _ = mini_zoo
    base = zoo_dir / "base"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DmmError, match="no images"):
        encode_image_folder(tmp_path / "empty", base, tmp_path / "o", progress=False)
    with pytest.raises(DmmError, match="image folder not found"):
        collect_images(tmp_path / "missing")
    (image_folder / "a.txt").unlink()
    with pytest.raises(DmmError, match="image a.png .*has no caption"):
        collect_images(image_folder)
    (image_folder / "a.txt").write_text("a caption")
    (image_folder / "broken.png").write_bytes(b"not a png at all")
    (image_folder / "broken.txt").write_text("broken")
    with pytest.raises(DmmError, match="cannot read image .*broken.png"):
        encode_image_folder(image_folder, base, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    (image_folder / "captions.jsonl").write_text('{"file": "b.png", "caption": "x"}\n{bad\n')
    with pytest.raises(DmmError, match="line 2: not valid JSON"):
        collect_images(image_folder)
    (image_folder / "captions.jsonl").write_text('{"file": "zz.png", "caption": "x"}\n')
    with pytest.raises(DmmError, match="line 1: image zz.png not found"):
        collect_images(image_folder)
