"""The distillation loop: every teacher into one style-promptable student.

One optimizer step visits every teacher. Teachers are split over processes
(``accelerate launch`` / torchrun); within a process they rotate over
micro-batches whose gradients accumulate, so any number of teachers merges on
one device. The randomness of a micro-batch (samples, caption drop, timesteps,
noise) is derived from (seed, step, teacher, repeat) alone: a resumed run, or
the same job on another process count, sees exactly the same batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from tqdm.auto import tqdm

from dmm.atomic import DmmError, atomic_dir
from dmm.distill import checkpoints as ckpt
from dmm.distill.config import DistillConfig
from dmm.distill.losses import (
    StyleDiscriminator,
    block_outputs,
    feature_loss,
    predict_x0,
    score_loss,
)
from dmm.distill.teachers import TeacherBank, architecture_diff, load_unet

log = logging.getLogger(__name__)


def assign_teachers(num_teachers: int, world: int) -> list[list[int]]:
    """Teachers owned by each process: round-robin, any N and process count."""
    if world <= num_teachers:
        return [list(range(r, num_teachers, world)) for r in range(world)]
    return [[r % num_teachers] for r in range(world)]


def step_plan(num_teachers: int, world: int, step: int) -> list[list[tuple[int, int]]]:
    """Per process, the (teacher, repeat) micro-batches of one optimizer step.

    Every process runs the same number of micro-batches (collectives must
    match). A process that owns fewer teachers repeats them, rotating with the
    step, and the loss weights below keep each teacher's share at 1/N.
    """
    owned = assign_teachers(num_teachers, world)
    slots = max(len(o) for o in owned)
    plan = []
    for teachers in owned:
        seen: Counter = Counter()
        mine = []
        for k in range(slots):
            t = teachers[k] if k < len(teachers) else teachers[(k + step) % len(teachers)]
            mine.append((t, seen[t]))
            seen[t] += 1
        plan.append(mine)
    return plan


def _seed_for(*parts: int) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class TeacherData:
    latents: torch.Tensor
    teacher_embeds: torch.Tensor
    base_embeds: torch.Tensor
    uncond_teacher: torch.Tensor
    uncond_base: torch.Tensor

    @classmethod
    def load(cls, path: Path, name: str) -> TeacherData:
        from dmm.data.samples import load_samples

        if not (Path(path) / "index.json").is_file():
            raise DmmError(f"no sample cache for teacher {name!r} at {path} (run `dmm sample`)")
        s = load_samples(path)
        u = load_file(Path(path) / "uncond.safetensors")
        return cls(
            s["latents"].float(),
            s["teacher_embeds"].float(),
            s["base_embeds"].float(),
            u["teacher_embeds"].float(),
            u["base_embeds"].float(),
        )


@dataclass
class MicroBatch:
    x_t: torch.Tensor
    t: torch.Tensor
    student_cond: torch.Tensor
    teacher_cond: torch.Tensor
    drop: torch.Tensor
    renoise: torch.Tensor


def draw(
    data: TeacherData, batch: int, gen: torch.Generator, alphas: torch.Tensor, p_drop: float
) -> MicroBatch:
    n = data.latents.shape[0]
    idx = torch.randint(0, n, (batch,), generator=gen)
    x0 = data.latents[idx]
    # One draw decides the caption drop for student AND teacher (the public
    # reference code draws twice, so ~18% of pairs disagree).
    drop = torch.rand(batch, generator=gen) < p_drop
    d = drop.view(-1, 1, 1)
    student_cond = torch.where(d, data.uncond_base, data.base_embeds[idx])
    teacher_cond = torch.where(d, data.uncond_teacher, data.teacher_embeds[idx])
    t = torch.randint(0, alphas.shape[0], (batch,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    renoise = torch.randn(x0.shape, generator=gen)
    return MicroBatch(x_t, t, student_cond, teacher_cond, drop, renoise)


class Progress:
    """The step counter, saved with every checkpoint."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def _split_output(out):
    if isinstance(out, tuple):
        return out[0], (out[1] if len(out) > 1 else None)
    return getattr(out, "sample", out), None


def distill(cfg: DistillConfig) -> Path:
    """Run distillation; returns the student pipeline folder."""
    from dmm.student.model import StyleStudent

    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=cfg.log_with or None,
        project_dir=str(out_dir),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    set_seed(cfg.seed)
    names = cfg.style_names
    n_teachers = len(names)
    owned = assign_teachers(n_teachers, world)[rank]

    for spec in cfg.teachers:
        if not spec.path.is_dir():
            raise DmmError(f"teacher {spec.name!r}: pipeline folder not found: {spec.path}")
    base_unet = load_unet(cfg.base)
    base_state = base_unet.state_dict()
    student = StyleStudent.from_base(base_unet, names, seed=cfg.seed)
    if cfg.gradient_checkpointing:
        student.unet.enable_gradient_checkpointing()
    student.train()

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        cfg.mixed_precision, torch.float32
    )
    bank = TeacherBank(
        [names[i] for i in owned],
        [cfg.teachers[i].path for i in owned],
        base_state,
        device,
        weight_dtype,
        cfg.teacher_placement,
    )
    data = {i: TeacherData.load(cfg.teachers[i].samples, names[i]) for i in owned}
    for i, d in data.items():
        want = (
            base_unet.config.in_channels,
            base_unet.config.sample_size,
            base_unet.config.sample_size,
        )
        if tuple(d.latents.shape[1:]) != want:
            raise DmmError(
                f"samples of teacher {names[i]!r} have latent shape {tuple(d.latents.shape[1:])}, "
                f"the base expects {want}"
            )
    sched_cfg = DDPMScheduler.load_config(Path(cfg.base) / "scheduler")
    alphas = DDPMScheduler.from_config(sched_cfg).alphas_cumprod.float()

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    )
    use_adv = cfg.losses.adversarial > 0
    disc = disc_opt = None
    if use_adv:
        disc = StyleDiscriminator(load_unet(cfg.base).to(device, weight_dtype), n_teachers)
        disc_opt = torch.optim.AdamW(disc.head.parameters(), lr=cfg.losses.discriminator_lr)
        disc, disc_opt = accelerator.prepare(disc, disc_opt)
    student, optimizer, lr_sched = accelerator.prepare(student, optimizer, lr_sched)
    ema = None
    if cfg.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(accelerator.unwrap_model(student).parameters(), decay=cfg.ema_decay)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)

    resume_from = ckpt.resolve_resume(ckpt_root, cfg.resume)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        log.info("resumed from %s at step %d", resume_from, progress.step)

    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers("dmm-distill", config=json.loads(cfg.model_dump_json()))
    metrics_file = out_dir / "metrics.jsonl"
    if resume_from is None and accelerator.is_main_process:
        metrics_file.unlink(missing_ok=True)  # a fresh run starts a fresh log
    use_feat = cfg.losses.feature > 0
    processed: Counter = Counter()
    bar = tqdm(
        total=cfg.steps,
        initial=progress.step,
        desc="distill",
        disable=not (cfg.progress and accelerator.is_local_main_process),
        mininterval=2,
    )
    t_start = time.perf_counter()
    last_good = resume_from
    while progress.step < cfg.steps:
        step = progress.step
        plan = step_plan(n_teachers, world, step)
        global_count = Counter(t for p in plan for t, _ in p)
        sums: Counter = Counter()
        per_teacher: dict[str, float] = {}
        for k, (ti, rep) in enumerate(plan[rank]):
            gen = torch.Generator().manual_seed(_seed_for(cfg.seed, step, ti, rep))
            mb = draw(data[ti], cfg.batch_size, gen, alphas, cfg.caption_dropout)
            x_t, t = mb.x_t.to(device), mb.t.to(device)
            sync = k == len(plan[rank]) - 1
            ctx = contextlib.nullcontext() if sync else accelerator.no_sync(student)
            teacher = bank.get(names[ti])
            with ctx:
                with torch.no_grad(), block_outputs(teacher) as t_feats:
                    eps_t = teacher(
                        x_t.to(weight_dtype), t, mb.teacher_cond.to(device, weight_dtype)
                    ).sample
                with accelerator.autocast():
                    out = student(
                        x_t, t, mb.student_cond.to(device), style=ti, return_features=use_feat
                    )
                    eps_s, s_feats = _split_output(out)
                    terms = {}
                    if cfg.losses.score:
                        terms["score"] = score_loss(eps_s, eps_t)
                    if use_feat:
                        terms["feature"] = feature_loss(s_feats, t_feats)
                    if use_adv:
                        a_t = alphas.to(device)[t]
                        x0_s = predict_x0(x_t, eps_s.float(), a_t)
                        x0_t = predict_x0(x_t, eps_t.float(), a_t)
                        renoise = mb.renoise.to(device)
                        cond = mb.student_cond.to(device)
                        fake = torch.full_like(t, n_teachers + ti)
                        real = torch.full_like(t, ti)
                        d_loss = torch.nn.functional.cross_entropy(
                            disc(x0_s.detach(), cond, alphas, renoise), fake
                        ) + torch.nn.functional.cross_entropy(
                            disc(x0_t, cond, alphas, renoise), real
                        )
                        terms["adversarial"] = torch.nn.functional.cross_entropy(
                            disc(x0_s, cond, alphas, renoise), real
                        )
                    loss = terms.get("score", 0.0) * 1.0
                    if use_feat:
                        loss = loss + cfg.losses.feature * terms["feature"]
                    if use_adv:
                        loss = loss + cfg.losses.adversarial * terms["adversarial"]
                if not torch.is_tensor(loss):
                    raise DmmError("every loss is switched off; enable at least one")
                # DDP averages over processes; this weight makes each teacher's
                # share of the step exactly 1/N whatever the process count.
                scale = world / (n_teachers * global_count[ti])
                accelerator.backward(loss * scale)
                if use_adv:
                    disc_opt.zero_grad(set_to_none=True)
                    accelerator.backward(d_loss * scale)
                    disc_opt.step()
                    terms["discriminator"] = d_loss
            for name, v in terms.items():
                sums[name] += float(v.detach()) / len(plan[rank])
            sums["total"] += float(loss.detach()) / len(plan[rank])
            per_teacher[names[ti]] = float(terms.get("score", loss).detach())
            processed[names[ti]] += cfg.batch_size

        finite = torch.tensor([math.isfinite(sums["total"])], device=device, dtype=torch.float32)
        if accelerator.gather(finite).min().item() < 1:
            accelerator.end_training()
            where = (
                f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written"
            )
            raise DmmError(f"loss is NaN/inf at step {step}; training stopped ({where})")
        accelerator.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(accelerator.unwrap_model(student).parameters())
        progress.step += 1
        bar.update(1)

        if progress.step % cfg.log_every == 0 or progress.step == cfg.steps:
            record = {f"loss/{k}": v for k, v in sums.items()}
            record.update({f"loss_score/{k}": v for k, v in per_teacher.items()})
            record["lr"] = lr_sched.get_last_lr()[0]
            record["step"] = progress.step
            record["elapsed_s"] = round(time.perf_counter() - t_start, 3)
            accelerator.log(record, step=progress.step)
            if accelerator.is_main_process:
                with open(metrics_file, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{sums['total']:.4f}")

        if progress.step % cfg.checkpoint_every == 0 or progress.step == cfg.steps:
            tmp = ckpt.tmp_dir_for(ckpt_root, progress.step)
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                last_good = ckpt.finalize(ckpt_root, progress.step, cfg.checkpoints_total_limit)
            accelerator.wait_for_everyone()
    bar.close()

    (out_dir / f"rank-{rank}.json").write_text(
        json.dumps({"rank": rank, "world": world, "teachers": owned, "samples": dict(processed)})
    )
    accelerator.wait_for_everyone()
    final = out_dir / "student"
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(student)
        if ema is not None:
            ema.copy_to(model.parameters())
        with atomic_dir(final) as tmp:
            model.save_pipeline(tmp, cfg.base)
        summary = {
            "steps": progress.step,
            "world_size": world,
            "styles": names,
            "seconds": round(time.perf_counter() - t_start, 2),
            "teacher_placement": bank.placement,
        }
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def check_teacher_architecture(base_dir: Path, teacher_dir: Path, name: str) -> None:
    """Raise a one-line error if a teacher's UNet does not match the base."""
    from safetensors.torch import load_file as _load

    from dmm.distill.teachers import unet_weights_file

    diff = architecture_diff(
        _load(unet_weights_file(base_dir)), _load(unet_weights_file(teacher_dir))
    )
    if diff:
        raise DmmError(f"teacher {name!r} UNet differs from the base: {diff}")
