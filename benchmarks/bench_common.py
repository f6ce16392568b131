"""Shared pieces of the benchmarks: provenance, statistics, memory probes, tiny fixtures.

Every fixture is random-init and built in seconds in a temp dir, so a benchmark
never depends on `make demo` having run. The tiny models follow the zoo's
component choices (dmm/zoo/models.py) so that the code paths are the real ones.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent

# The SD1.5 UNet's block structure with much smaller channels: 4 levels, two
# resnets per level, cross-attention in the first three down / last three up
# blocks, as in runwayml/stable-diffusion-v1-5 (only the widths differ).
SD15_TINY_UNET: dict[str, Any] = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 128, 128),
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=32,
)

# The real SD1.5 UNet (for the GPU benchmark; 860M parameters).
SD15_UNET: dict[str, Any] = dict(
    SD15_TINY_UNET,
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
)


# --- provenance ----------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        mem_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        info["ram_gb"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    from importlib import metadata

    import diffusers

    import dmm

    out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "dmm": dmm.__version__}
    for pkg in ("accelerate", "transformers", "sd-mecha", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance() -> dict[str, Any]:
    return {"machine": machine_info(), "versions": versions(), "date": now_iso()}


# --- statistics ------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def summary(xs: Sequence[float]) -> dict[str, Any]:
    """Median plus the spread, so a reader can tell a noisy figure from a firm one."""
    xs = list(xs)
    return {
        "median": round(median(xs), 6),
        "min": round(min(xs), 6),
        "max": round(max(xs), 6),
        "n": len(xs),
    }


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of per-round ratios: each round's pair ran back to back, so slow
    phases of the shared machine hit both sides of a ratio alike."""
    return median([a / b for a, b in zip(num, den, strict=True)])


def timeit(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# --- memory ------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """Peak RSS of this process since its exec (VmHWM).

    Not ru_maxrss: Linux carries the parent's high-water mark into a child
    across fork + exec, so a child started by a 1 GB parent reports >= 1 GB.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def module_bytes(module: torch.nn.Module, device: torch.device | None = None) -> int:
    """Bytes of a module's parameters and buffers (only those on ``device`` if given)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if device is not None and t.device != device:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def run_child(args: list[str], timeout: float = 1800) -> dict[str, Any]:
    """Run ``python <args>`` in a fresh process; its last stdout line is a JSON result."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise RuntimeError(f"child {args[:3]} failed ({proc.returncode}):\n" + "\n".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- tiny fixtures -----------------------------------------------------------------


def make_unet(kind: str):
    from diffusers import UNet2DConditionModel

    if kind == "zoo":
        from dmm.zoo.models import make_unet as zoo_unet

        return zoo_unet(16)
    if kind == "sd15-tiny":
        return UNet2DConditionModel(**SD15_TINY_UNET)
    if kind == "sd15":
        return UNet2DConditionModel(**SD15_UNET)
    raise ValueError(f"unknown model kind {kind!r}")


def build_base_pipeline(out: Path, kind: str, seed: int = 0) -> Path:
    """A complete random-init StableDiffusionPipeline folder (zoo components)."""
    from dmm.zoo.build import make_pipeline, vocabulary
    from dmm.zoo.models import MAX_TOKENS, make_autoencoder, make_text_encoder
    from dmm.zoo.tokenizer import BOS, EOS, build_tokenizer

    torch.manual_seed(seed)
    tok_dir = out.parent / f"_tok_{out.name}"
    tokenizer = build_tokenizer(vocabulary(), tok_dir, MAX_TOKENS)
    vocab = tokenizer.get_vocab()
    unet = make_unet(kind)
    text_encoder = make_text_encoder(len(vocab), vocab[BOS], vocab[EOS])
    if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
        raise ValueError("text width must equal the UNet's cross_attention_dim")
    make_pipeline(unet, text_encoder, tokenizer, make_autoencoder()).save_pretrained(out)
    shutil.rmtree(tok_dir, ignore_errors=True)
    return out


def build_teacher(base: Path, out: Path, seed: int, scale: float = 0.01) -> Path:
    """A teacher = the base pipeline with a perturbed UNet (a fine-tune stand-in)."""
    from safetensors.torch import load_file, save_file

    from dmm.distill.teachers import unet_weights_file

    shutil.copytree(base, out, dirs_exist_ok=True)
    weights = unet_weights_file(out)
    state = load_file(weights)
    g = torch.Generator().manual_seed(seed)
    state = {
        k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype)
        if v.is_floating_point()
        else v
        for k, v in state.items()
    }
    save_file(state, weights, metadata={"format": "pt"})
    return out


def write_samples(out: Path, name: str, base: Path, n: int, seed: int) -> Path:
    """A sample cache in dmm.data.samples' layout with random latents and embeddings."""
    from safetensors.torch import save_file

    from dmm.data.samples import FORMAT_VERSION, INDEX, UNCOND

    unet_cfg = json.loads((base / "unet" / "config.json").read_text())
    c, s = unet_cfg["in_channels"], unet_cfg["sample_size"]
    te_file = base / "text_encoder" / "config.json"
    if te_file.is_file():
        te_cfg = json.loads(te_file.read_text())
        length, width = te_cfg["max_position_embeddings"], te_cfg["hidden_size"]
    else:  # a UNet-only fixture: CLIP's 77 tokens at the UNet's cross-attention width
        length, width = 77, unet_cfg["cross_attention_dim"]
    g = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    shard = {
        "latents": torch.randn(n, c, s, s, generator=g),
        "prompt_ids": torch.arange(n, dtype=torch.int64),
        "teacher_embeds": torch.randn(n, length, width, generator=g),
        "base_embeds": torch.randn(n, length, width, generator=g),
    }
    save_file(shard, out / "shard-00000.safetensors", metadata={"source": name})
    save_file(
        {
            "teacher_embeds": torch.randn(1, length, width, generator=g),
            "base_embeds": torch.randn(1, length, width, generator=g),
        },
        out / UNCOND,
    )
    index = {
        "format_version": FORMAT_VERSION,
        "source": "benchmark",
        "teacher": name,
        "num_samples": n,
        "num_prompts": n,
        "samples_per_prompt": 1,
        "shards": ["shard-00000.safetensors"],
        "shard_sizes": [n],
        "latent_shape": [c, s, s],
        "embed_shape": [length, width],
        "base_embed_shape": [length, width],
        "dtype": "float32",
    }
    (out / INDEX).write_text(json.dumps(index, indent=2))
    return out


def build_distill_fixture(
    root: Path, kind: str, n_teachers: int, n_samples: int = 64
) -> dict[str, Any]:
    """Base pipeline + ``n_teachers`` teachers + their sample caches under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    base = build_base_pipeline(root / "base", kind)
    teachers = []
    for i in range(n_teachers):
        name = f"t{i:02d}"
        path = build_teacher(base, root / "teachers" / name, seed=1000 + i)
        samples = write_samples(root / "samples" / name, name, base, n_samples, seed=2000 + i)
        teachers.append({"name": name, "path": path, "samples": samples})
    return {"base": base, "teachers": teachers, "root": root}


def build_unet_fixture(
    root: Path, unet_cfg: dict[str, Any], n_teachers: int, n_samples: int
) -> dict[str, Any]:
    """What distillation reads, and no more: a base and teachers holding only a UNet
    (random init) and the noise schedule, plus sample caches. Any UNet size, with
    no text encoder or VAE to build (an SD1.5 UNet takes seconds, not minutes)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from dmm.zoo.models import SCHEDULE

    torch.manual_seed(0)
    base = root / "base"
    UNet2DConditionModel(**unet_cfg).save_pretrained(base / "unet")
    DDPMScheduler(**SCHEDULE).save_pretrained(base / "scheduler")
    teachers = []
    for i in range(n_teachers):
        name = f"t{i:02d}"
        path = build_teacher(base, root / "teachers" / name, seed=1000 + i)
        samples = write_samples(root / "samples" / name, name, base, n_samples, seed=2000 + i)
        teachers.append({"name": name, "path": path, "samples": samples})
    return {"base": base, "teachers": teachers, "root": root}


def distill_config(fixture: dict[str, Any], out: Path, **overrides: Any):
    """A DistillConfig for a fixture: no checkpoints, logs every step, no progress bar."""
    from dmm.distill.config import DistillConfig

    cfg: dict[str, Any] = dict(
        base=fixture["base"],
        teachers=fixture["teachers"],
        output_dir=out,
        steps=8,
        batch_size=8,
        warmup_steps=0,
        # Checkpoints would land inside the timed window of the step that saves;
        # the final step's (forced) checkpoint comes after its log line.
        checkpoint_every=10**6,
        log_every=1,
        progress=False,
        seed=0,
    )
    cfg.update(overrides)
    return DistillConfig(**cfg)


def step_times_from_metrics(metrics_file: Path, skip: int) -> list[float]:
    """Per-step wall times from metrics.jsonl ``elapsed_s`` (one record per step)."""
    recs = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    elapsed = [0.0] + [float(r["elapsed_s"]) for r in recs]
    steps = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
    return steps[skip:]
