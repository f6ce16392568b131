"""SD1.5-sized distillation throughput on one GPU (run by benchmarks/gpu.sh).

Builds, at random init, an SD1.5-shaped student (the 860M UNet + style MLP +
codebook) and two teachers, 64x64 latents (512 px), and runs the trainer's
inner loop with dmm's own pieces: trainer.step_plan / draw / _split_output,
losses.block_outputs / score_loss / feature_loss, StyleStudent, and an
Accelerator with bf16 autocast; teachers run in bf16 as TeacherBank places
them (eval, no grad, .to(device, dtype)); attention is SDPA (AttnProcessor2_0).
Reports samples/s (student samples, each with one teacher forward) and
torch.cuda.max_memory_allocated. The paper's anchor is 11.6 samples/s per
A100 (batch 320 on 16 A100s, 100k iterations in ~32 GPU-days); the goal here
is >= 35 per H100.

``--dry-run`` runs the same code on the CPU with the tiny SD1.5-like UNet for
two steps, so the script can be checked where there is no GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from bench_common import SD15_TINY_UNET, SD15_UNET, provenance  # noqa: E402

PAPER_SAMPLES_PER_S_A100 = 11.6
GOAL_SAMPLES_PER_S_H100 = 35.0


def build(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from dmm.distill.trainer import TeacherData
    from dmm.student.model import StyleStudent
    from dmm.zoo.models import SCHEDULE

    unet_cfg = SD15_TINY_UNET if args.tiny else SD15_UNET
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    base = UNet2DConditionModel(**unet_cfg)
    names = [f"t{i}" for i in range(args.teachers)]
    student = StyleStudent.from_base(base, names, seed=0).to(device)
    if args.gradient_checkpointing:
        student.unet.enable_gradient_checkpointing()
    student.unet.set_attn_processor(AttnProcessor2_0())
    student.train()
    teachers = []
    for i in range(args.teachers):
        # A fine-tune stand-in: the base plus a small perturbation (a copy, not a
        # second random init, which takes ~10 s at SD1.5 size on the host).
        t = copy.deepcopy(base)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for v in t.parameters():
                v.add_(torch.randn(v.shape, generator=g, dtype=v.dtype), alpha=0.01)
        t.requires_grad_(False)
        t.eval()
        t = t.to(device, dtype=teacher_dtype)
        t.set_attn_processor(AttnProcessor2_0())
        teachers.append(t)
    del base
    c, s = unet_cfg["in_channels"], unet_cfg["sample_size"]
    text_len, width = 77, unet_cfg["cross_attention_dim"]
    n = max(4 * args.batch, 64)
    g = torch.Generator().manual_seed(0)
    data = [
        TeacherData(
            latents=torch.randn(n, c, s, s, generator=g),
            teacher_embeds=torch.randn(n, text_len, width, generator=g),
            base_embeds=torch.randn(n, text_len, width, generator=g),
            uncond_teacher=torch.randn(1, text_len, width, generator=g),
            uncond_base=torch.randn(1, text_len, width, generator=g),
        )
        for _ in names
    ]
    alphas = DDPMScheduler(**SCHEDULE).alphas_cumprod.float()
    return {
        "student": student,
        "teachers": teachers,
        "teacher_dtype": teacher_dtype,
        "data": data,
        "alphas": alphas,
        "names": names,
        "unet": unet_cfg,
    }


def train(args: argparse.Namespace, parts: dict[str, Any], device: torch.device) -> dict:
    """The trainer's inner loop (dmm/distill/trainer.py) for one process."""
    from accelerate import Accelerator

    from dmm.distill.losses import block_outputs, feature_loss, score_loss
    from dmm.distill.trainer import _seed_for, _split_output, draw, step_plan

    mixed = "bf16" if device.type == "cuda" else "no"
    accelerator = Accelerator(mixed_precision=mixed, cpu=device.type != "cuda")
    student, teachers = parts["student"], parts["teachers"]
    params = [p for p in student.parameters() if p.requires_grad]
    opt_kwargs: dict[str, Any] = {"fused": True} if args.fused_adamw else {}
    optimizer = torch.optim.AdamW(
        params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, **opt_kwargs
    )
    student, optimizer = accelerator.prepare(student, optimizer)
    n_teachers = len(teachers)
    dtype = parts["teacher_dtype"]

    def step(i: int) -> float:
        plan = step_plan(n_teachers, 1, i)[0]
        total = 0.0
        for ti, rep in plan:
            gen = torch.Generator().manual_seed(_seed_for(0, i, ti, rep))
            mb = draw(parts["data"][ti], args.batch, gen, parts["alphas"], 0.1)
            x_t, t = mb.x_t.to(device, non_blocking=True), mb.t.to(device, non_blocking=True)
            with torch.no_grad(), block_outputs(teachers[ti]) as t_feats:
                eps_t = teachers[ti](x_t.to(dtype), t, mb.teacher_cond.to(device, dtype)).sample
            with accelerator.autocast():
                out = student(x_t, t, mb.student_cond.to(device), style=ti, return_features=True)
                eps_s, s_feats = _split_output(out)
                loss = score_loss(eps_s, eps_t) + 0.001 * feature_loss(s_feats, t_feats)
            accelerator.backward(loss / n_teachers)
            total += float(loss.detach()) / n_teachers
        accelerator.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(args.warmup):
        step(i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    losses = []
    for i in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        losses.append(step(i))  # float(loss) syncs every micro-batch, as in the trainer
        sync()
        times.append(time.perf_counter() - t0)
        if args.deadline and time.perf_counter() > args.deadline:
            break
    times.sort()
    med = times[len(times) // 2]
    samples_per_step = n_teachers * args.batch
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
    args = ap.parse_args(argv)
    if args.dry_run:
        args.tiny, args.steps, args.warmup, args.batch = True, 2, 1, 2
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.tiny:
        print("no CUDA device: use --dry-run (or --tiny) on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    args.deadline = t0 + args.budget_s
    parts = build(args, device)
    built_s = time.perf_counter() - t0
    result = train(args, parts, device)
    n_params = sum(p.numel() for p in parts["student"].parameters())
    report = {
        **provenance(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "config": {
            "unet": "sd15-tiny" if args.tiny else "sd15",
            "latent": [4, parts["unet"]["sample_size"], parts["unet"]["sample_size"]],
            "teachers": args.teachers,
            "batch_per_teacher": args.batch,
            "precision": "bf16 autocast, bf16 teachers" if cuda else "fp32",
            "attention": "SDPA (AttnProcessor2_0)",
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
