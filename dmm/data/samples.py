"""Teacher samples: x0 latents and cached text embeddings, sharded as safetensors.

Distillation only needs (x0, caption) pairs in each teacher's latent space plus
the caption's embedding under the teacher's and the base's text encoder. Making
them once here means the trainer never runs a VAE or a text encoder per step.

Layout of one teacher's directory (a contract the trainer relies on)::

    index.json             what, how and from which weights (see sample_teacher)
    shard-00000.safetensors
        latents        (n, C, H, W)  teacher x0, already times vae scaling_factor
        prompt_ids     (n,) int64    indices into the prompt list
        teacher_embeds (n, L, D_t)   the teacher's own text encoder, last hidden state
        base_embeds    (n, L, D_b)   the base text encoder, same prompts
    uncond.safetensors
        teacher_embeds (1, L, D_t), base_embeds (1, L, D_b) for the empty prompt ""

Samples are stored prompt-major: sample k is prompt k // samples_per_prompt,
draw k % samples_per_prompt, and its noise comes from a torch.Generator seeded
by :func:`sample_seed`, so any sample can be regenerated on its own.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dmm.atomic import DmmError, atomic_dir, write_text_atomic
from dmm.data.config import SampleConfig
from dmm.data.prompts import read_prompts, sha256_prompts
from dmm.device import resolve_device
from dmm.hashing import weights_sha256

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX = "index.json"
UNCOND = "uncond.safetensors"
SAMPLE_KEYS = ("latents", "prompt_ids", "teacher_embeds", "base_embeds")
SEED_RULE = "np.random.SeedSequence([seed, prompt_id, draw]).generate_state(2) -> 63-bit int"

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def sample_seed(seed: int, prompt_id: int, draw: int) -> int:
    """The generator seed of one (prompt, draw) pair.

    SeedSequence mixes the three numbers, so seeds neither collide across
    prompts nor change when samples_per_prompt or the batch size changes.
    """
    lo, hi = np.random.SeedSequence([seed, prompt_id, draw]).generate_state(2, dtype=np.uint32)
    return (int(hi) << 32 | int(lo)) & (2**63 - 1)


def _model_index(pipe_dir: Path) -> dict:
    try:
        return json.loads((pipe_dir / "model_index.json").read_text())
    except FileNotFoundError:
        if not pipe_dir.is_dir():
            raise DmmError(f"pipeline folder not found: {pipe_dir}") from None
        raise DmmError(f"{pipe_dir} is not a diffusers pipeline (no model_index.json)") from None
    except json.JSONDecodeError as exc:
        raise DmmError(f"{pipe_dir}/model_index.json is not valid JSON: {exc.msg}") from None


def _is_dmm(library: str) -> bool:
    return library == "dmm" or library.startswith("dmm.")


def _check_library(pipe_dir: Path, name: str, library: str) -> None:
    # As diffusers does, never import a module just because a folder names it;
    # dmm's own classes (the zoo's VAE) are the one trusted exception.
    if library not in ("diffusers", "transformers") and not _is_dmm(library):
        raise DmmError(f"{pipe_dir}: {name} comes from untrusted library {library!r}")


def import_dmm_components(pipe_dir: Path) -> None:
    """Import the dmm modules a pipeline folder names, so diffusers can load it."""
    for entry in _model_index(pipe_dir).values():
        if isinstance(entry, list) and entry and isinstance(entry[0], str) and _is_dmm(entry[0]):
            importlib.import_module(entry[0])


def load_component(pipe_dir: Path | str, name: str) -> Any:
    """Load one component (text_encoder, tokenizer, vae, ...) of a pipeline folder.

    Only that component is read, so e.g. the base text encoder of an SD-sized
    pipeline loads without its 3 GB UNet. The class comes from model_index.json,
    as diffusers itself resolves it (the zoo's VAE is a dmm class).
    """
    pipe_dir = Path(pipe_dir)
    entry = _model_index(pipe_dir).get(name)
    if not entry or entry[0] is None:
        raise DmmError(f"{pipe_dir} has no {name} component")
    library, class_name = entry
    _check_library(pipe_dir, name, library)
    try:
        cls = getattr(importlib.import_module(library), class_name)
        return cls.from_pretrained(pipe_dir / name, local_files_only=True)
    except (OSError, ValueError, AttributeError, ImportError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DmmError(f"cannot load {name} from {pipe_dir}: {first}") from exc


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Last hidden state for ``prompts``, exactly as StableDiffusionPipeline.encode_prompt.

    Mirrors its default path (max-length padding, truncation, attention mask
    only when the encoder's config asks), so that cached embeddings are the
    ones the teacher's own pipeline conditions on.
    """
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = ids.attention_mask.to(device)
    return text_encoder(ids.input_ids.to(device), attention_mask=mask)[0]


class ShardWriter:
    """Buffers samples and writes them as fixed-size safetensors shards."""

    def __init__(self, out_dir: Path, shard_size: int, dtype: torch.dtype, name: str):
        self.out_dir, self.shard_size, self.dtype, self.name = out_dir, shard_size, dtype, name
        self.buffer: dict[str, list[torch.Tensor]] = {k: [] for k in SAMPLE_KEYS}
        self.buffered = 0
        self.shards: list[str] = []
        self.sizes: list[int] = []

    def add(
        self,
        latents: torch.Tensor,
        prompt_ids: torch.Tensor,
        teacher_embeds: torch.Tensor,
        base_embeds: torch.Tensor,
    ) -> None:
        parts = dict(
            zip(SAMPLE_KEYS, (latents, prompt_ids, teacher_embeds, base_embeds), strict=True)
        )
        for key, value in parts.items():
            value = value.detach().cpu()
            value = value.to(torch.int64) if key == "prompt_ids" else value.to(self.dtype)
            self.buffer[key].append(value)
        self.buffered += len(prompt_ids)
        while self.buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        joined = {k: torch.cat(v) for k, v in self.buffer.items()}
        # clone: own storage per tensor (see write_uncond).
        shard = {k: v[:n].clone() for k, v in joined.items()}
        self.buffer = {k: [v[n:]] for k, v in joined.items()}
        self.buffered -= n
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file(shard, self.out_dir / name, metadata={"source": self.name})
        self.shards.append(name)
        self.sizes.append(n)

    def finish(self) -> tuple[list[str], list[int]]:
        if self.buffered:
            self._flush(self.buffered)
        return self.shards, self.sizes


def write_uncond(
    out_dir: Path, teacher_embeds: torch.Tensor, base_embeds: torch.Tensor, dtype: torch.dtype
) -> None:
    # clone: the image folder passes one tensor for both, and safetensors
    # refuses tensors that share storage.
    tensors = {
        "teacher_embeds": teacher_embeds.detach().cpu().to(dtype).clone(),
        "base_embeds": base_embeds.detach().cpu().to(dtype).clone(),
    }
    save_file(tensors, out_dir / UNCOND)


def read_index(out_dir: Path | str) -> dict | None:
    try:
        return json.loads((Path(out_dir) / INDEX).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def is_reusable(out_dir: Path, expect: dict) -> dict | None:
    index = read_index(out_dir)
    if index is None or index.get("format_version") != FORMAT_VERSION:
        return None
    if any(index.get(k) != v for k, v in expect.items()):
        return None
    files = [*index.get("shards", []), UNCOND]
    return index if all((out_dir / f).is_file() for f in files) else None


def _compute_dtype(cfg: SampleConfig, device: torch.device) -> torch.dtype:
    # float16 on CPU is slow and poorly supported by the diffusers kernels.
    return torch.float16 if cfg.dtype == "float16" and device.type == "cuda" else torch.float32


def sample_teacher(
    teacher_dir: Path,
    base_dir: Path,
    prompts: list[str],
    out_dir: Path,
    cfg: SampleConfig,
    name: str,
    *,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> dict:
    """Generate ``samples_per_prompt`` x0 latents per prompt with one teacher.

    Writes ``out_dir`` atomically (see the module docstring for the layout)
    and returns its index. If ``out_dir`` already holds samples of the same
    prompts, teacher weights and config, nothing is done.
    """
    from diffusers import StableDiffusionPipeline

    teacher_dir, base_dir, out_dir = Path(teacher_dir), Path(base_dir), Path(out_dir)
    if not prompts:
        raise DmmError(f"no prompts to sample teacher {name!r} with")
    _model_index(teacher_dir)
    _model_index(base_dir)
    expect = {
        "teacher": name,
        "prompts_sha256": sha256_prompts(prompts),
        "teacher_sha256": weights_sha256(teacher_dir / "unet"),
        "text_encoder_sha256": weights_sha256(teacher_dir / "text_encoder"),
        "base_text_encoder_sha256": weights_sha256(base_dir / "text_encoder"),
        "config": cfg.model_dump(),
    }
    if (index := is_reusable(out_dir, expect)) is not None:
        log.info("samples of %s at %s are up to date", name, out_dir)
        return index

    device = resolve_device(device)
    dtype = _compute_dtype(cfg, device)
    import_dmm_components(teacher_dir)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            teacher_dir,
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DmmError(f"cannot load teacher {name!r} from {teacher_dir}: {first}") from exc
    pipe.to(device)
    if dtype != torch.float32:
        # After loading, not via from_pretrained: its dtype keyword was renamed
        # across the diffusers versions we support.
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    base_tok = load_component(base_dir, "tokenizer")
    base_te = load_component(base_dir, "text_encoder").to(device, dtype).eval()

    spp = cfg.samples_per_prompt
    pairs = [(p, d) for p in range(len(prompts)) for d in range(spp)]
    store = STORE_DTYPES[cfg.dtype]
    with atomic_dir(out_dir) as tmp:
        uncond_t = encode_text(pipe.tokenizer, pipe.text_encoder, [""], device)
        uncond_b = encode_text(base_tok, base_te, [""], device)
        write_uncond(tmp, uncond_t, uncond_b, store)
        writer = ShardWriter(tmp, cfg.shard_size, store, name)
        bar = tqdm(total=len(pairs), desc=f"sample {name}", unit="img", disable=not progress)
        for start in range(0, len(pairs), cfg.batch_size):
            chunk = pairs[start : start + cfg.batch_size]
            texts = [prompts[p] for p, _ in chunk]
            t_emb = encode_text(pipe.tokenizer, pipe.text_encoder, texts, device)
            b_emb = encode_text(base_tok, base_te, texts, device)
            gens = [torch.Generator().manual_seed(sample_seed(cfg.seed, p, d)) for p, d in chunk]
            # Passing the cached embeddings guarantees they are exactly what
            # the teacher conditioned on.
            with torch.no_grad():
                latents = pipe(
                    prompt_embeds=t_emb,
                    negative_prompt_embeds=uncond_t.expand(len(chunk), -1, -1),
                    num_inference_steps=cfg.steps,
                    guidance_scale=cfg.guidance_scale,
                    generator=gens,
                    output_type="latent",
                ).images
            ids = torch.tensor([p for p, _ in chunk], dtype=torch.int64)
            writer.add(latents, ids, t_emb, b_emb)
            bar.update(len(chunk))
        bar.close()
        shards, sizes = writer.finish()
        index = {
            "format_version": FORMAT_VERSION,
            "source": "teacher",
            **expect,
            "num_samples": len(pairs),
            "num_prompts": len(prompts),
            "samples_per_prompt": spp,
            "shards": shards,
            "shard_sizes": sizes,
            "latent_shape": list(latents.shape[1:]),
            "embed_shape": list(t_emb.shape[1:]),
            "base_embed_shape": list(b_emb.shape[1:]),
            "dtype": cfg.dtype,
            "compute_dtype": str(dtype).removeprefix("torch."),
            "scaling_factor": float(pipe.vae.config.scaling_factor),
            "order": "prompt-major: sample k = prompt k // samples_per_prompt",
            "seed_rule": SEED_RULE,
            "teacher_dir": str(teacher_dir),
            "base_dir": str(base_dir),
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=2, ensure_ascii=False))
    log.info("sampled %d latents from %s -> %s", len(pairs), name, out_dir)
    return index


def _torn(out_dir: Path, shard: str, why: str) -> DmmError:
    return DmmError(f"{out_dir}: shard {shard} is torn or unreadable ({why}); re-run dmm sample")


def _read_shard(out_dir: Path, shard: str) -> dict[str, torch.Tensor]:
    path = out_dir / shard
    if not path.is_file():
        raise DmmError(f"{out_dir}: shard {shard} is missing; re-run dmm sample")
    try:
        with safe_open(path, framework="pt") as fh:
            missing = [k for k in SAMPLE_KEYS if k not in fh.keys()]
            if missing:
                raise _torn(out_dir, shard, f"no {', '.join(missing)}")
            return {k: fh.get_tensor(k) for k in SAMPLE_KEYS}
    except DmmError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _torn(out_dir, shard, first) from exc


def _load_index(out_dir: Path) -> dict:
    if not (out_dir / INDEX).is_file():
        raise DmmError(f"no samples at {out_dir} (index.json missing); run dmm sample first")
    index = read_index(out_dir)
    if index is None:
        raise DmmError(f"{out_dir}/index.json is not valid JSON")
    return index


def load_samples(out_dir: Path | str) -> dict[str, torch.Tensor]:
    """All shards of one sample directory, concatenated and checked against index.json.

    Returns latents, prompt_ids, teacher_embeds and base_embeds (see module doc).
    """
    out_dir = Path(out_dir)
    index = _load_index(out_dir)
    expected = {
        "latents": tuple(index["latent_shape"]),
        "teacher_embeds": tuple(index["embed_shape"]),
        "base_embeds": tuple(index["base_embed_shape"]),
        "prompt_ids": (),
    }
    sizes = index.get("shard_sizes") or [None] * len(index["shards"])
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in SAMPLE_KEYS}
    for shard, size in zip(index["shards"], sizes, strict=True):
        tensors = _read_shard(out_dir, shard)
        n = tensors["prompt_ids"].shape[0]
        for key, tensor in tensors.items():
            if tuple(tensor.shape) != (n, *expected[key]) or (size is not None and n != size):
                raise _torn(out_dir, shard, f"{key} has shape {list(tensor.shape)}")
            parts[key].append(tensor)
        if tensors["prompt_ids"].dtype != torch.int64:
            raise _torn(out_dir, shard, "prompt_ids are not int64")
    if not parts["latents"]:
        raise DmmError(f"{out_dir}: index.json lists no shards")
    out = {k: torch.cat(v) for k, v in parts.items()}
    n = out["latents"].shape[0]
    if n != index["num_samples"]:
        raise DmmError(
            f"{out_dir}: shards hold {n} samples, index.json says {index['num_samples']}"
        )
    ids = out["prompt_ids"]
    n_prompts = index.get("num_prompts")
    if n_prompts is not None and ids.numel() and (ids.min() < 0 or ids.max() >= n_prompts):
        raise DmmError(f"{out_dir}: prompt_ids fall outside 0..{n_prompts - 1}")
    return out


def load_uncond(out_dir: Path | str) -> dict[str, torch.Tensor]:
    """Embeddings of the empty prompt: teacher_embeds and base_embeds, each (1, L, D)."""
    out_dir = Path(out_dir)
    path = out_dir / UNCOND
    if not path.is_file():
        raise DmmError(f"{out_dir}: {UNCOND} is missing; re-run dmm sample")
    try:
        with safe_open(path, framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in ("teacher_embeds", "base_embeds")}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise DmmError(f"{out_dir}: {UNCOND} is torn or unreadable") from exc


def teachers_from_zoo(zoo_dir: Path | str) -> dict[str, Path]:
    """Teacher name -> pipeline folder, from a zoo's manifest."""
    from dmm.zoo.build import read_manifest

    zoo_dir = Path(zoo_dir)
    manifest = read_manifest(zoo_dir)
    if manifest is None:
        raise DmmError(f"{zoo_dir} is not a built zoo (no readable zoo.json)")
    return {name: zoo_dir / t["path"] for name, t in manifest["teachers"].items()}


def sample_all(
    zoo_or_teacher_dirs: dict[str, Path],
    base_dir: Path,
    prompts_file: Path,
    out_root: Path,
    cfg: SampleConfig,
    *,
    device: str | torch.device = "auto",
    progress: bool = True,
    summary: bool = True,
) -> dict[str, dict]:
    """Sample every teacher into ``out_root/<name>`` and write ``out_root/samples.json``.

    ``summary=False`` skips the summary file: a DVC stage per teacher owns only
    its own folder under ``out_root``.

    Teachers whose samples are up to date are skipped, so an interrupted run
    resumes at the first teacher it had not finished.
    """
    device = resolve_device(device)  # a bad name fails before any teacher loads
    if not zoo_or_teacher_dirs:
        raise DmmError("no teachers to sample")
    prompts = read_prompts(prompts_file)
    out_root = Path(out_root)
    indexes = {
        name: sample_teacher(
            Path(tdir),
            base_dir,
            prompts,
            out_root / name,
            cfg,
            name,
            device=device,
            progress=progress,
        )  # fmt: skip
        for name, tdir in zoo_or_teacher_dirs.items()
    }
    if not summary:
        return indexes
    overview = {
        "prompts_file": str(prompts_file),
        "prompts_sha256": sha256_prompts(prompts),
        "config": cfg.model_dump(),
        "teachers": {
            name: {k: idx[k] for k in ("num_samples", "teacher_sha256", "latent_shape")}
            for name, idx in indexes.items()
        },
    }
    write_text_atomic(out_root / "samples.json", json.dumps(overview, indent=2))
    return indexes
