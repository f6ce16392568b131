"""Build the toy teacher zoo: base pipeline, style teachers, style classifier.

Everything is built in a temporary directory and renamed into place at the
end, so an interrupted or failed build never leaves a half-written zoo. A
fingerprint of the config and of this package's source makes a second build
with unchanged inputs a no-op.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from dmm.atomic import DmmError, atomic_dir
from dmm.zoo import scenes as S
from dmm.zoo.classifier import ImageHeads, train_heads
from dmm.zoo.config import ZooConfig
from dmm.zoo.models import (
    MAX_TOKENS,
    make_autoencoder,
    make_sample_scheduler,
    make_text_encoder,
    make_train_scheduler,
    make_unet,
)
from dmm.zoo.tokenizer import BOS, EOS, build_tokenizer
from dmm.zoo.training import tokenize, train_denoiser

log = logging.getLogger(__name__)

MANIFEST = "zoo.json"


def fingerprint(cfg: ZooConfig) -> str:
    """Hash of the config and of the zoo's source code."""
    h = hashlib.sha256(cfg.model_dump_json().encode())
    for src in sorted(Path(__file__).parent.glob("*.py")):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def read_manifest(zoo_dir: Path) -> dict | None:
    try:
        return json.loads((Path(zoo_dir) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_built(zoo_dir: Path, cfg: ZooConfig) -> bool:
    m = read_manifest(zoo_dir)
    return bool(m) and m.get("fingerprint") == fingerprint(cfg)


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """NxHxWx3 in [0, 1] -> Nx3xHxW in [-1, 1], the diffusers convention."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous() * 2 - 1


def vocabulary() -> list[str]:
    words = {"a", "at", "the", "in", *S.SIZES, *S.COLOURS}
    words |= {w for p in S.POSITIONS for w in p.split()}
    words |= set(S.SHAPES)
    return sorted(words)


def make_pipeline(unet, text_encoder, tokenizer, vae) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def sample_images(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    batch: int = 256,
) -> torch.Tensor:
    """Generate one image per (prompt, seed); returns Nx3xHxW in [-1, 1]."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        imgs = pipe(
            prompts[i : i + batch],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=gens,
            output_type="pt",
        ).images
        out.append(imgs * 2 - 1)
    return torch.cat(out).clamp(-1, 1)


def _labels(scenes: list[S.Scene]) -> dict[str, torch.Tensor]:
    return {
        "shape": torch.tensor([S.SHAPES.index(s.shape) for s in scenes]),
        "colour": torch.tensor([list(S.COLOURS).index(s.colour) for s in scenes]),
        "position": torch.tensor([list(S.POSITIONS).index(s.position) for s in scenes]),
    }


def _probe_accuracy(probe: ImageHeads, images: torch.Tensor, scenes: list[S.Scene]) -> dict:
    labels = _labels(scenes)
    acc = {}
    for head in ("shape", "colour", "position"):
        pred = probe.predict(images, head).argmax(-1)
        acc[head] = float((pred == labels[head]).float().mean())
    acc["all"] = float(
        torch.stack(
            [
                probe.predict(images, h).argmax(-1) == labels[h]
                for h in ("shape", "colour", "position")
            ]
        )
        .all(0)
        .float()
        .mean()
    )
    return acc


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def save_grid(images: torch.Tensor, rows: int, path: Path, scale: int = 3) -> None:
    """Save Nx3xHxW images in [-1, 1] as a grid with ``rows`` rows."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = n // rows
    arr = ((images[: rows * cols].clamp(-1, 1) + 1) * 127.5).round().byte()
    arr = arr.reshape(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    img = Image.fromarray(arr.numpy())
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def build_zoo(out_dir: Path | str, cfg: ZooConfig, force: bool = False) -> dict:
    """Build the zoo into ``out_dir`` (or reuse it) and return its manifest."""
    out_dir = Path(out_dir)
    if not force and is_built(out_dir, cfg):
        log.info("zoo at %s is up to date (fingerprint %s)", out_dir, fingerprint(cfg))
        return read_manifest(out_dir)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        timings[name] = round(time.perf_counter() - t0, 2)
        log.info("%s: %.1fs", name, timings[name])
        return time.perf_counter()

    with atomic_dir(out_dir) as tmp:
        t0 = time.perf_counter()
        rng = np.random.default_rng(cfg.seed)
        train_combos, held_combos = S.split_combos(cfg.seed, cfg.held_out_combos)
        train_scenes = S.sample_scenes(train_combos, cfg.train_images, rng)
        captions = [s.caption for s in train_scenes]
        renders = {
            style: to_model_space(S.render_batch(train_scenes, style, supersample=2))
            for style in ["base", *cfg.styles]
        }
        t0 = lap("render", t0)

        tokenizer = build_tokenizer(vocabulary(), tmp / "_tokenizer", MAX_TOKENS)
        vocab = tokenizer.get_vocab()
        vae = make_autoencoder()
        # A PCA needs far fewer patches than the training set holds.
        fit_n = min(1000, cfg.train_images)
        recon_rmse = vae.fit(torch.cat([v[:fit_n] for v in renders.values()]))
        latents = {
            k: vae.encode(v).latent_dist.mode() * vae.config.scaling_factor
            for k, v in renders.items()
        }
        token_ids = tokenize(tokenizer, captions)
        empty_ids = tokenize(tokenizer, [""])[0]
        t0 = lap("autoencoder", t0)

        sample_size = latents["base"].shape[-1]
        unet = make_unet(sample_size)
        text_encoder = make_text_encoder(len(vocab), vocab[BOS], vocab[EOS])
        train_sched = make_train_scheduler()
        base_losses = train_denoiser(
            unet, text_encoder, latents["base"], token_ids, empty_ids, train_sched,
            steps=cfg.base_steps, batch_size=cfg.batch_size, lr=cfg.base_lr,
            train_text_encoder=True, seed=cfg.seed, desc="base",
        )  # fmt: skip
        make_pipeline(unet, text_encoder, tokenizer, vae).save_pretrained(tmp / "base")
        t0 = lap("base", t0)

        teachers = {}
        for k, style in enumerate(cfg.styles):
            t_unet = copy.deepcopy(unet)
            t_text = copy.deepcopy(text_encoder)
            train_te = style in cfg.text_encoder_styles
            losses = train_denoiser(
                t_unet, t_text, latents[style], token_ids, empty_ids, train_sched,
                steps=cfg.teacher_steps, batch_size=cfg.batch_size, lr=cfg.teacher_lr,
                train_text_encoder=train_te, text_encoder_lr=cfg.teacher_text_encoder_lr, seed=cfg.seed + 1 + k, desc=style,
            )  # fmt: skip
            make_pipeline(t_unet, t_text, tokenizer, vae).save_pretrained(tmp / "teachers" / style)
            teachers[style] = {
                "path": f"teachers/{style}",
                "trained_text_encoder": train_te,
                "final_loss": float(np.mean(losses[-10:])),
            }
            t0 = lap(f"teacher:{style}", t0)
        (tmp / "_tokenizer").exists() and _rmtree(tmp / "_tokenizer")

        metrics = _measure(tmp, cfg, train_combos, held_combos, teachers)
        t0 = lap("classifier+probe", t0)

        sizes = {p.name: _dir_size(p) for p in [tmp / "base", tmp / "classifier", tmp / "probe"]}
        sizes.update({f"teachers/{s}": _dir_size(tmp / "teachers" / s) for s in cfg.styles})
        timings["total"] = round(time.perf_counter() - t_start, 2)
        manifest = {
            "fingerprint": fingerprint(cfg),
            "config": cfg.model_dump(),
            "base": "base",
            "teachers": teachers,
            "classifier": "classifier",
            "probe": "probe",
            "held_out_combos": [list(c) for c in held_combos],
            "autoencoder_rmse": recon_rmse,
            "base_final_loss": float(np.mean(base_losses[-20:])),
            "metrics": metrics,
            "sizes_bytes": sizes,
            "total_bytes": _dir_size(tmp),
            "timings_s": timings,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def _measure(tmp: Path, cfg: ZooConfig, train_combos, held_combos, teachers: dict) -> dict:
    """Train the style classifier on teacher samples and measure the zoo's quality."""
    rng = np.random.default_rng(cfg.seed + 1000)
    styles = cfg.styles
    k = cfg.classifier_samples
    scenes = S.sample_scenes(train_combos + held_combos, k, rng)
    prompts = [s.caption for s in scenes]
    seeds = [cfg.seed * 100_003 + i for i in range(k)]
    samples = {}
    for style in styles:
        pipe = StableDiffusionPipeline.from_pretrained(
            tmp / "teachers" / style, local_files_only=True
        )
        pipe.set_progress_bar_config(disable=True)
        samples[style] = sample_images(pipe, prompts, seeds, cfg.sample_steps, cfg.guidance_scale)
    n_test = max(1, k // 3)
    x_train = torch.cat([samples[s][n_test:] for s in styles])
    y_train = torch.cat([torch.full((k - n_test,), i) for i, _ in enumerate(styles)])
    x_test = torch.cat([samples[s][:n_test] for s in styles])
    y_test = torch.cat([torch.full((n_test,), i) for i, _ in enumerate(styles)])
    clf = ImageHeads(heads={"style": list(styles)})
    train_heads(
        clf,
        x_train,
        {"style": y_train},
        steps=cfg.classifier_steps,
        seed=cfg.seed,
        desc="classifier",
    )
    pred = clf.predict(x_test, "style").argmax(-1)
    per_style = {s: float((pred[y_test == i] == i).float().mean()) for i, s in enumerate(styles)}
    clf.save_pretrained(tmp / "classifier")

    # Caption probe: trained on clean renders of every combo (including held-out
    # ones; it is a measuring device, not a model under test) in every style.
    probe_scenes = S.sample_scenes(S.all_combos(), cfg.probe_images, rng)
    probe_x, probe_scene_list = [], []
    for style in ["base", *styles]:
        probe_x.append(to_model_space(S.render_batch(probe_scenes, style, supersample=2)))
        probe_scene_list += probe_scenes
    probe = ImageHeads(
        heads={"shape": list(S.SHAPES), "colour": list(S.COLOURS), "position": list(S.POSITIONS)}
    )
    train_heads(
        probe, torch.cat(probe_x), _labels(probe_scene_list),
        steps=cfg.probe_steps, seed=cfg.seed, desc="probe",
    )  # fmt: skip
    probe.save_pretrained(tmp / "probe")
    check_scenes = S.sample_scenes(S.all_combos(), 200, rng)
    probe_sanity = _probe_accuracy(
        probe, to_model_space(S.render_batch(check_scenes, "base", supersample=2)), check_scenes
    )

    base = StableDiffusionPipeline.from_pretrained(tmp / "base", local_files_only=True)
    base.set_progress_bar_config(disable=True)
    caption = {}
    for split, combos in (("train_captions", train_combos), ("held_out_captions", held_combos)):
        sc = S.sample_scenes(combos, cfg.caption_samples, rng)
        seeds_c = [cfg.seed * 7 + i for i in range(len(sc))]
        imgs = sample_images(
            base, [s.caption for s in sc], seeds_c, cfg.sample_steps, cfg.guidance_scale
        )
        caption[split] = {"base": _probe_accuracy(probe, imgs, sc)}
    # Teachers on the classifier's held-out prompts (same prompts for all).
    for style in styles:
        caption.setdefault("teachers", {})[style] = _probe_accuracy(
            probe, samples[style][:n_test], scenes[:n_test]
        )

    grid_prompts = [s.caption for s in scenes[:8]]
    grid = [sample_images(base, grid_prompts, seeds[:8], cfg.sample_steps, cfg.guidance_scale)]
    grid += [samples[s][:8] for s in styles]
    save_grid(torch.cat(grid), rows=len(grid), path=tmp / "samples.png")
    return {
        "classifier_accuracy": float((pred == y_test).float().mean()),
        "classifier_accuracy_per_style": per_style,
        "classifier_test_samples": int(len(y_test)),
        "caption_following": caption,
        "probe_accuracy_on_clean_renders": probe_sanity,
        "grid_rows": ["base", *styles],
        "grid_prompts": grid_prompts,
    }


def check_output_dir(out_dir: Path) -> None:
    """Fail early, in one line, if the zoo cannot be written where asked."""
    import os

    probe = out_dir if out_dir.exists() else out_dir.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise DmmError(f"output directory {out_dir} is not writable: {probe} is not a directory")
    if not os.access(probe, os.W_OK):
        raise DmmError(f"output directory {out_dir} is not writable")
