"""SD1.5-sized distillation throughput on one GPU (run by benchmarks/gpu.sh).

Times the product's own optimizer step: it writes, at random init, an
SD1.5-shaped base UNet and two perturbed copies as teachers, with sample
caches of 64x64 latents (512 px), builds the real training state from a
DistillConfig (``trainer.setup``: StyleStudent with its style MLP and
codebook, TeacherBank with every teacher on the device in bf16, AdamW with
its learning-rate groups, an Accelerator with bf16 autocast) and calls
``trainer.train_step``, the very step ``dmm distill`` runs, per-source loss
weights included. Reports samples/s (student samples, each with one teacher
forward) and torch.cuda.max_memory_allocated. The paper's anchor is 11.6
samples/s per A100 (batch 320 on 16 A100s, 100k iterations in ~32 GPU-days);
the goal here is >= 35 per H100.

``--dry-run`` runs the same code on the CPU with the tiny SD1.5-like UNet for
two steps, so the script can be checked where there is no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from bench_common import SD15_TINY_UNET, SD15_UNET, build_unet_fixture, provenance  # noqa: E402

PAPER_SAMPLES_PER_S_A100 = 11.6
GOAL_SAMPLES_PER_S_H100 = 35.0


@contextlib.contextmanager
def fused_adamw(enabled: bool) -> Iterator[None]:
    """While setup() builds its optimizer, make torch.optim.AdamW the fused kernel."""
    if not enabled:
        yield
        return
    original = torch.optim.AdamW

    class Fused(original):  # type: ignore[misc, valid-type]
        def __init__(self, params: Any, **kwargs: Any) -> None:
            super().__init__(params, fused=True, **kwargs)

    torch.optim.AdamW = Fused  # type: ignore[misc]
    try:
        yield
    finally:
        torch.optim.AdamW = original  # type: ignore[misc]


def build(args: argparse.Namespace, device: torch.device, work: Path):
    """The trainer's real state for an SD1.5-shaped merge of ``args.teachers`` teachers."""
    from dmm.distill.config import DistillConfig
    from dmm.distill.trainer import setup

    unet_cfg = SD15_TINY_UNET if args.tiny else SD15_UNET
    fixture = build_unet_fixture(work, unet_cfg, args.teachers, max(4 * args.batch, 64))
    cfg = DistillConfig(
        base=fixture["base"],
        teachers=fixture["teachers"],
        output_dir=work / "run",
        steps=args.warmup + args.steps,
        batch_size=args.batch,
        lr=1e-5,  # the paper's SD1.5 rate
        warmup_steps=0,
        mixed_precision="bf16" if device.type == "cuda" else "no",
        gradient_checkpointing=args.gradient_checkpointing,
        teacher_placement="device",
        checkpoint_every=10**6,
        progress=False,
    )
    with fused_adamw(args.fused_adamw):
        return setup(cfg), unet_cfg


def train(args: argparse.Namespace, state, device: torch.device) -> dict:
    """Time ``trainer.train_step`` on the real state (it syncs every micro-batch, as in training)."""
    from dmm.distill.trainer import train_step

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        train_step(state)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    losses = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(train_step(state)["loss/total"])
        sync()
        times.append(time.perf_counter() - t0)
        if args.deadline and time.perf_counter() > args.deadline:
            break
    times.sort()
    med = times[len(times) // 2]
    samples_per_step = len(state.sources) * args.batch
    out = {
        "steps_timed": len(times),
        "step_s_median": round(med, 4),
        "samples_per_step": samples_per_step,
        "samples_per_s": round(samples_per_step / med, 2),
        "last_loss": losses[-1],
    }
    if device.type == "cuda":
        out["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["max_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16, help="samples per teacher per step")
    ap.add_argument("--teachers", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny SD1.5-like UNet (32x32 latents)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny, 2 steps: a syntax check")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop timing after this")
    ap.add_argument("--out", type=Path, default=BENCH / "out" / "gpu.json")
    ap.add_argument("--work", type=Path, help="where to write the random-init fixture (temp)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.tiny, args.steps, args.warmup, args.batch = True, 2, 1, 2
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.tiny:
        print("no CUDA device: use --dry-run (or --tiny) on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:  # the trainer's Accelerator picks CUDA whenever it sees one
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    args.deadline = t0 + args.budget_s
    with tempfile.TemporaryDirectory(prefix="dmm-bench-gpu-", dir=args.work) as work:
        state, unet_cfg = build(args, device, Path(work))
        built_s = time.perf_counter() - t0
        result = train(args, state, device)
        n_params = sum(p.numel() for p in state.student.parameters())
    report = {
        **provenance(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "config": {
            "unet": "sd15-tiny" if args.tiny else "sd15",
            "latent": [4, unet_cfg["sample_size"], unet_cfg["sample_size"]],
            "teachers": args.teachers,
            "batch_per_teacher": args.batch,
            "precision": "bf16 autocast, bf16 teachers" if cuda else "fp32",
            "attention": "diffusers default (SDPA on torch 2)",
            "step": "dmm.distill.trainer.train_step",
            "gradient_checkpointing": args.gradient_checkpointing,
            "fused_adamw": args.fused_adamw,
            "student_params": n_params,
        },
        "build_s": round(built_s, 1),
        **result,
        "paper_anchor_samples_per_s_a100": PAPER_SAMPLES_PER_S_A100,
        "goal_samples_per_s_h100": GOAL_SAMPLES_PER_S_H100,
        "dry_run": args.dry_run,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
