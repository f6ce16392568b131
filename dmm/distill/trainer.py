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
import functools
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

from dmm.atomic import DmmError, atomic_dir, write_text_atomic
from dmm.distill import checkpoints as ckpt
from dmm.distill.config import DistillConfig
from dmm.distill.live import LiveMetrics
from dmm.distill.losses import (
    StyleDiscriminator,
    block_outputs,
    feature_loss,
    predict_x0,
    score_loss,
)
from dmm.distill.teachers import TeacherBank, architecture_diff, load_unet
from dmm.names import LINEAGE_FILE as LINEAGE
from dmm.student.model import STYLE_PREFIX

log = logging.getLogger(__name__)


def assign_teachers(num_teachers: int, world: int) -> list[list[int]]:
    """Sources (teachers) owned by each process: round-robin, any N and process count."""
    if world <= num_teachers:
        return [list(range(r, num_teachers, world)) for r in range(world)]
    return [[r % num_teachers] for r in range(world)]


def step_plan(num_teachers: int, world: int, step: int) -> list[list[tuple[int, int]]]:
    """Per process, the (source, repeat) micro-batches of one optimizer step.

    Every process runs the same number of micro-batches (collectives must
    match). A process that owns fewer sources repeats them, rotating with the
    step; the loss weights in the loop keep each source's share fixed.
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


def _seed_for(*parts: int | str) -> int:
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

    # For old-style data: the old style (index into the old styles) of each x0,
    # or None when any old style may be asked of any x0.
    styles: torch.Tensor | None = None

    def for_style(self, k: int) -> TeacherData:
        """x0 for old style ``k`` alone: its replayed images, or the whole pool."""
        if self.styles is None:
            return self
        keep = self.styles == k
        return TeacherData(
            self.latents[keep],
            self.teacher_embeds[keep],
            self.base_embeds[keep],
            self.uncond_teacher,
            self.uncond_base,
            styles=self.styles[keep],
        )

    @classmethod
    def concat(cls, parts: list[TeacherData]) -> TeacherData:
        """Pooled x0 for old styles: conditioned on the base encoder for both sides."""
        latents = torch.cat([p.latents for p in parts])
        base = torch.cat([p.base_embeds for p in parts])
        return cls(latents, base, base, parts[0].uncond_base, parts[0].uncond_base)


@torch.no_grad()
def replay_old_styles(
    previous,
    pool: TeacherData,
    n_old: int,
    old_prev_index: torch.Tensor,
    cfg: DistillConfig,
    device: torch.device,
    dtype: torch.dtype,
    batch: int = 128,
) -> TeacherData:
    """x0 of every old style, sampled from the frozen previous student.

    Prompts (base-encoder embeddings) come from the pool of new-teacher samples;
    each old style gets ``old_style_samples`` of them, chosen by ``seed``.
    """
    from diffusers import DPMSolverMultistepScheduler

    sched_cfg = DPMSolverMultistepScheduler.load_config(Path(cfg.base) / "scheduler")
    gen = torch.Generator().manual_seed(_seed_for(cfg.seed, "replay"))
    per_style = min(cfg.old_style_samples, pool.latents.shape[0])
    picks = [torch.randperm(pool.latents.shape[0], generator=gen)[:per_style] for _ in range(n_old)]
    idx = torch.cat(picks)
    styles = torch.arange(n_old).repeat_interleave(per_style)
    embeds = pool.base_embeds[idx]
    latents = []
    for i in range(0, len(idx), batch):
        cond = embeds[i : i + batch]
        b = cond.shape[0]
        style = torch.nn.functional.one_hot(
            old_prev_index[styles[i : i + batch]], previous.style_codebook.num_styles
        ).float()
        sched = DPMSolverMultistepScheduler.from_config(sched_cfg, algorithm_type="dpmsolver++")
        sched.set_timesteps(cfg.old_style_sample_steps)
        x = torch.randn((b, *pool.latents.shape[1:]), generator=gen) * sched.init_noise_sigma
        x = x.to(device)
        c = torch.cat([pool.uncond_base.expand(b, -1, -1), cond]).to(device, dtype)
        s2 = torch.cat([style, style]).to(device)
        for t in sched.timesteps:
            eps = previous(torch.cat([x, x]).to(dtype), t, c, style=s2).float()
            e_u, e_c = eps.chunk(2)
            x = sched.step(e_u + cfg.old_style_guidance * (e_c - e_u), t, x).prev_sample
        latents.append(x.cpu())
    return TeacherData(
        torch.cat(latents), embeds, embeds, pool.uncond_base, pool.uncond_base, styles=styles
    )


@dataclass
class MicroBatch:
    idx: torch.Tensor
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
    return MicroBatch(idx, x_t, t, student_cond, teacher_cond, drop, renoise)


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


@dataclass
class Source:
    """One kind of micro-batch: a teacher, or the frozen previous student for old styles."""

    name: str
    weight: float  # share of each optimizer step's loss
    teacher_index: int | None  # index into cfg.teachers, None for the previous student
    old_style: int | None = None  # previous student, one old style only (index into old styles)


def plan_styles(cfg: DistillConfig, previous: list[str] | None) -> tuple[list[str], list[str]]:
    """(final style names, old styles taught by the previous student)."""
    new = cfg.style_names
    if previous is None:
        return new, []
    unknown = sorted(set(cfg.retire) - set(previous))
    if unknown:
        raise DmmError(
            f"cannot retire unknown styles: {', '.join(unknown)} (known: {', '.join(previous)})"
        )
    unknown = sorted(set(cfg.replace) - set(previous))
    if unknown:
        raise DmmError(f"cannot replace unknown styles: {', '.join(unknown)}")
    clash = sorted((set(new) & set(previous)) - set(cfg.replace))
    if clash:
        raise DmmError(
            f"teacher names collide with existing styles: {', '.join(clash)} "
            "(list them under `replace` to retrain them from the new teacher)"
        )
    kept = [n for n in previous if n not in cfg.retire]
    final = kept + [n for n in new if n not in previous]
    old = [n for n in kept if n not in cfg.replace]
    return final, old


def make_sources(cfg: DistillConfig, old_styles: list[str]) -> list[Source]:
    n_new = len(cfg.teachers)
    r = cfg.old_share(len(old_styles))
    sources = [Source(t.name, (1 - r) / n_new, i) for i, t in enumerate(cfg.teachers)]
    if r > 0 and cfg.old_style_batches == "per_style":
        share = r / len(old_styles)
        sources += [
            Source(f"previous-student:{n}", share, None, k) for k, n in enumerate(old_styles)
        ]
    elif r > 0:
        sources.append(Source("previous-student", r, None))
    return sources


def is_style_param(name: str) -> bool:
    """The style pathway: the codebook and the UNet's style MLP (class_embedding)."""
    return name.startswith("style_codebook.") or f".{STYLE_PREFIX}" in f".{name}"


@torch.no_grad()
def teacher_mean_state(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the teachers' UNet weights, one teacher in memory at a time."""
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        for k, v in load_unet(path).state_dict().items():
            if k in total:
                total[k] += v.float()
            else:
                total[k] = v.float().clone()
    return {k: v / len(paths) for k, v in total.items()}


def lr_factor(step: int, cfg: DistillConfig) -> float:
    """The learning-rate multiplier before optimizer step ``step + 1``: warmup, then the schedule."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_schedule == "constant":
        return warm
    if cfg.lr_schedule == "wsd":
        decay = max(1, round(cfg.decay_fraction * cfg.steps))
        return warm * min(1.0, (cfg.steps - step) / decay)
    done = max(0, step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def unet_lr_factor(step: int, cfg: DistillConfig) -> float:
    """The UNet's multiplier: 0 during style warmup, then warmed up again.

    While it is 0 only the style pathway moves, so a new style's first large
    gradients do not drag the shared weights (and every old style) along.
    """
    k = cfg.style_warmup_steps
    if step < k:
        return 0.0
    return lr_factor(step, cfg) * min(1.0, (step - k + 1) / max(1, cfg.warmup_steps))


def base_fingerprint(base_dir: Path) -> str:
    """The base's UNet hash, as the plan and the registry record it."""
    from dmm.hashing import unet_sha256

    return unet_sha256(base_dir)


class MetricsLog:
    """A run's metrics.jsonl, consistent across crashes and restarts.

    A resumed run keeps the records up to its checkpoint's step (the steps a
    crash makes it redo are dropped, so none is logged twice). A fresh run
    replaces the previous run's log only with its own first record: a run that
    fails while setting up leaves the last log as it was.
    """

    def __init__(self, path: Path, step: int) -> None:
        self.path = path
        self.fresh = step == 0
        if self.fresh or not path.exists():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(keep) < len(lines):
            write_text_atomic(path, "".join(line + "\n" for line in keep))

    def append(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if self.fresh:
            write_text_atomic(self.path, line)
            self.fresh = False
        else:
            with open(self.path, "a") as fh:
                fh.write(line)


def distill(cfg: DistillConfig) -> Path:
    """Run distillation (full, or incremental with ``init_from``); returns the student folder."""
    import os

    from dmm.atomic import exclusive_lock

    # Only the first process of a launch takes the lock (ranks share the folder).
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
        with exclusive_lock(cfg.output_dir, "distillation"):
            return _distill(cfg)
    return _distill(cfg)


def _distill(cfg: DistillConfig) -> Path:
    state = setup(cfg)
    bar = tqdm(
        total=cfg.steps,
        initial=state.progress.step,
        desc="distill",
        disable=not (cfg.progress and state.accelerator.is_local_main_process),
        mininterval=2,
    )
    try:
        while state.progress.step < cfg.steps:
            record = train_step(state)
            bar.update(1)
            if state.progress.step % cfg.log_every == 0 or state.progress.step == cfg.steps:
                log_record(state, record)
                bar.set_postfix(loss=f"{record['loss/total']:.4f}")
            if state.progress.step % cfg.checkpoint_every == 0 or state.progress.step == cfg.steps:
                save_checkpoint(state)
    finally:  # a failed run's last records reach MLflow too
        if state.live is not None:
            state.live.flush()
    bar.close()
    return finalize(state)


@dataclass
class TrainState:
    """One process's training run: what setup() builds and every step reads or updates."""

    cfg: DistillConfig
    accelerator: Accelerator
    student: torch.nn.Module  # as prepared by the accelerator (DDP-wrapped on several processes)
    previous: torch.nn.Module | None  # the frozen previous student of an incremental merge
    sources: list[Source]
    owned: list[int]  # indices into sources of this process's micro-batches
    bank: TeacherBank
    data: dict[int, TeacherData]  # by source index
    alphas: torch.Tensor
    final_names: list[str]
    old_styles: list[str]
    old_prev_index: torch.Tensor | None  # old style -> index among the previous student's styles
    old_new_index: torch.Tensor | None  # old style -> index among the final styles
    weight_dtype: torch.dtype
    optimizer: torch.optim.Optimizer
    lr_sched: torch.optim.lr_scheduler.LRScheduler
    disc: torch.nn.Module | None
    disc_opt: torch.optim.Optimizer | None
    ema: object | None
    progress: Progress
    base_sha: str
    last_good: Path | None  # the newest sealed checkpoint, named when training fails
    processed: Counter
    fingerprint: str  # of the config: checkpoints are sealed with it, resumes match it
    metrics: MetricsLog | None = None  # on the main process only
    live: LiveMetrics | None = None  # the orchestrator's MLflow run, main process only
    t_start: float = 0.0
    resumed_from_step: int | None = None  # the sealed checkpoint's step, when resumed

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    @property
    def style_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.final_names)}


def _make_accelerator(cfg: DistillConfig) -> Accelerator:
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=cfg.log_with or None,
        project_dir=str(cfg.output_dir),
        # One optimizer step is one global step (every process's teachers
        # together), so the schedule advances once per step. Accelerate's
        # default advances it once per process, which would run warmup and
        # decay `world` times too fast.
        step_scheduler_with_optimizer=False,
    )


def _load_previous(cfg: DistillConfig, base_unet, base_sha: str):
    """The frozen previous student of an incremental merge (None for a full merge)."""
    from dmm.student.model import StyleStudent

    if cfg.init_from is None:
        return None
    if not (Path(cfg.init_from) / "model_index.json").is_file():
        raise DmmError(f"previous student not found: {cfg.init_from}")
    lineage_file = Path(cfg.init_from) / LINEAGE
    if lineage_file.is_file():
        parent = json.loads(lineage_file.read_text())
        if parent.get("base_sha256") not in (None, base_sha):
            raise DmmError(
                f"previous student {cfg.init_from} was merged on another base; run a full merge"
            )
    previous = StyleStudent.from_pipeline(cfg.init_from)
    try:
        previous.validate_base(base_unet)
    except ValueError as exc:
        raise DmmError(str(exc).splitlines()[0]) from exc
    return previous


def _build_student(cfg: DistillConfig, base_unet, previous, final_names: list[str]):
    """The student in training mode: from the base (or the teachers' mean), or the previous one."""
    import copy

    from dmm.student.model import StyleStudent

    if previous is None:
        student = StyleStudent.from_base(base_unet, final_names, seed=cfg.seed)
        if cfg.init == "teacher_mean":
            mean = teacher_mean_state([t.path for t in cfg.teachers])
            student.unet.load_state_dict(mean, strict=False)
    else:
        student = copy.deepcopy(previous)
        book = previous.style_codebook
        if cfg.retire:
            book = book.drop_styles(cfg.retire)
        added = [n for n in final_names if n not in book.style_names]
        if added:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                book = book.append_styles(added)
        student.set_codebook(book)
        previous.requires_grad_(False)
        previous.eval()
    if cfg.gradient_checkpointing:
        student.unet.enable_gradient_checkpointing()
    student.train()
    return student


def _load_source_data(
    cfg: DistillConfig,
    sources: list[Source],
    owned: list[int],
    previous,
    old_styles: list[str],
    old_prev_index: torch.Tensor | None,
    device: torch.device,
    weight_dtype: torch.dtype,
) -> dict[int, TeacherData]:
    """The x0 pool of each source this process owns, by source index."""
    loaded: dict[int, TeacherData] = {}  # a process owning the previous student needs them all

    def teacher_data(i: int) -> TeacherData:
        if i not in loaded:
            loaded[i] = TeacherData.load(cfg.teachers[i].samples, cfg.teachers[i].name)
        return loaded[i]

    @functools.cache  # one pool (and one replay) for every old-style source
    def old_style_data() -> TeacherData:
        pool = TeacherData.concat([teacher_data(i) for i in range(len(cfg.teachers))])
        previous.to(device, dtype=weight_dtype)
        if cfg.old_style_x0 == "previous_student":
            t0 = time.perf_counter()
            pool = replay_old_styles(
                previous, pool, len(old_styles), old_prev_index, cfg, device, weight_dtype
            )
            log.info(
                "replayed %d x0 of old styles %s in %.1f s",
                pool.latents.shape[0], ", ".join(old_styles), time.perf_counter() - t0,
            )  # fmt: skip
        return pool

    data: dict[int, TeacherData] = {}
    for si in owned:
        src = sources[si]
        if src.teacher_index is not None:
            data[si] = teacher_data(src.teacher_index)
        elif src.old_style is None:
            data[si] = old_style_data()
        else:
            data[si] = old_style_data().for_style(src.old_style)
    return data


def _check_latent_shapes(data: dict[int, TeacherData], sources: list[Source], base_unet) -> None:
    c = base_unet.config
    want = (c.in_channels, c.sample_size, c.sample_size)
    for si, d in data.items():
        if tuple(d.latents.shape[1:]) != want:
            raise DmmError(
                f"samples of {sources[si].name!r} have latent shape {tuple(d.latents.shape[1:])}, "
                f"the base expects {want}"
            )


def _make_optimizer(cfg: DistillConfig, student) -> tuple[torch.optim.Optimizer, object]:
    """AdamW with the UNet and the style pathway as groups, each with its own lr schedule."""
    style_params = [
        p for n, p in student.named_parameters() if p.requires_grad and is_style_param(n)
    ]
    unet_params = [
        p for n, p in student.named_parameters() if p.requires_grad and not is_style_param(n)
    ]
    groups = [{"params": unet_params, "lr": cfg.lr}]
    if style_params:
        groups.append({"params": style_params, "lr": cfg.lr * cfg.style_lr_scale})
    optimizer = torch.optim.AdamW(groups, betas=cfg.betas, weight_decay=cfg.weight_decay)
    lambdas = [lambda s: unet_lr_factor(s, cfg)]
    if style_params:
        lambdas.append(lambda s: lr_factor(s, cfg))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def _make_discriminator(cfg: DistillConfig, n_styles: int, device, weight_dtype, accelerator):
    """The adversarial loss's discriminator and its optimizer, or (None, None) when it is off."""
    if cfg.losses.adversarial <= 0:
        return None, None
    disc = StyleDiscriminator(load_unet(cfg.base).to(device, weight_dtype), n_styles)
    disc_opt = torch.optim.AdamW(disc.head.parameters(), lr=cfg.losses.discriminator_lr)
    return accelerator.prepare(disc, disc_opt)


def setup(cfg: DistillConfig) -> TrainState:
    """Build everything one process trains with, resumed from a checkpoint when asked."""
    accelerator = _make_accelerator(cfg)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    set_seed(cfg.seed)
    for spec in cfg.teachers:
        if not spec.path.is_dir():
            raise DmmError(f"teacher {spec.name!r}: pipeline folder not found: {spec.path}")
    base_unet = load_unet(cfg.base)
    base_sha = base_fingerprint(cfg.base)
    previous = _load_previous(cfg, base_unet, base_sha)
    final_names, old_styles = plan_styles(cfg, previous.style_names if previous else None)
    sources = make_sources(cfg, old_styles)
    student = _build_student(cfg, base_unet, previous, final_names)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        cfg.mixed_precision, torch.float32
    )
    owned = assign_teachers(len(sources), world)[rank]
    mine = [sources[i].teacher_index for i in owned if sources[i].teacher_index is not None]
    bank = TeacherBank(
        [cfg.teachers[i].name for i in mine],
        [cfg.teachers[i].path for i in mine],
        base_unet.state_dict(),
        device,
        weight_dtype,
        cfg.teacher_placement,
    )
    old_prev_index = (
        torch.tensor([previous.style_names.index(n) for n in old_styles]) if old_styles else None
    )
    data = _load_source_data(
        cfg, sources, owned, previous, old_styles, old_prev_index, device, weight_dtype
    )
    _check_latent_shapes(data, sources, base_unet)
    sched_cfg = DDPMScheduler.load_config(Path(cfg.base) / "scheduler")
    index = {n: i for i, n in enumerate(final_names)}
    optimizer, lr_sched = _make_optimizer(cfg, student)
    disc, disc_opt = _make_discriminator(cfg, len(final_names), device, weight_dtype, accelerator)
    student, optimizer, lr_sched = accelerator.prepare(student, optimizer, lr_sched)
    state = TrainState(
        cfg, accelerator, student, previous, sources, owned, bank, data,
        DDPMScheduler.from_config(sched_cfg).alphas_cumprod.float(),
        final_names, old_styles, old_prev_index,
        torch.tensor([index[n] for n in old_styles]) if old_styles else None,
        weight_dtype, optimizer, lr_sched, disc, disc_opt, _make_ema(cfg, accelerator, student),
        Progress(), base_sha, None, Counter(), cfg.fingerprint(),
    )  # fmt: skip
    _resume(state)
    return state


def _make_ema(cfg: DistillConfig, accelerator: Accelerator, student):
    if not cfg.ema:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(accelerator.unwrap_model(student).parameters(), decay=cfg.ema_decay)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    return ema


def _resume(state: TrainState) -> None:
    """Load the checkpoint ``resume`` names, open the trackers and the metrics log."""
    accelerator, cfg = state.accelerator, state.cfg
    accelerator.register_for_checkpointing(state.progress)
    resume_from = ckpt.resolve_resume(state.ckpt_root, cfg.resume, state.fingerprint)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        log.info("resumed from %s at step %d", resume_from, state.progress.step)
        state.resumed_from_step = state.progress.step
    state.last_good = resume_from
    if accelerator.is_main_process:
        state.out_dir.mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers("dmm-distill", config=json.loads(cfg.model_dump_json()))
        state.metrics = MetricsLog(state.metrics_file, state.progress.step)
        state.live = LiveMetrics.from_env()
    state.t_start = time.perf_counter()


def _teacher_for(state: TrainState, si: int, mb: MicroBatch, gen: torch.Generator):
    """(teacher, module to hook for features, student style, teacher style or None)."""
    src = state.sources[si]
    if src.teacher_index is not None:
        teacher = state.bank.get(src.name)
        return teacher, teacher, state.style_index[src.name], None
    # The previous student shows what an old style looked like before this
    # merge: the source's own style (per_style), or, in a shared micro-batch,
    # the style a replayed x0 shows or a random one.
    batch = state.cfg.batch_size
    if src.old_style is not None:
        pick = torch.full((batch,), src.old_style)
    elif state.data[si].styles is not None:  # replayed x0: ask for the style it shows
        pick = state.data[si].styles[mb.idx]
    else:
        pick = torch.randint(0, len(state.old_styles), (batch,), generator=gen)
    one_hot = torch.nn.functional.one_hot
    style = one_hot(state.old_new_index[pick], len(state.final_names)).float()
    prev_style = one_hot(state.old_prev_index[pick], len(state.previous.style_names)).float()
    return state.previous, state.previous.unet, style, prev_style


def _adversarial(state: TrainState, mb: MicroBatch, x_t, t, eps_s, eps_t, style):
    """(generator's adversarial loss, discriminator's loss) of one teacher micro-batch."""
    ce = torch.nn.functional.cross_entropy
    device, alphas, disc = state.accelerator.device, state.alphas, state.disc
    a_t = alphas.to(device)[t]
    x0_s = predict_x0(x_t, eps_s.float(), a_t)
    x0_t = predict_x0(x_t, eps_t.float(), a_t)
    renoise = mb.renoise.to(device)
    cond = mb.student_cond.to(device)
    fake = torch.full_like(t, len(state.final_names) + style)
    real = torch.full_like(t, style)
    d_loss = ce(disc(x0_s.detach(), cond, alphas, renoise), fake) + ce(
        disc(x0_t, cond, alphas, renoise), real
    )
    return ce(disc(x0_s, cond, alphas, renoise), real), d_loss


def _micro_batch(state: TrainState, step: int, si: int, rep: int, scale: float, sync: bool):
    """Forward and backward of one source's micro-batch; returns (loss terms, total loss)."""
    cfg, accelerator, dtype = state.cfg, state.accelerator, state.weight_dtype
    device, losses = accelerator.device, cfg.losses
    gen = torch.Generator().manual_seed(_seed_for(cfg.seed, step, si, rep))
    mb = draw(state.data[si], cfg.batch_size, gen, state.alphas, cfg.caption_dropout)
    x_t, t = mb.x_t.to(device), mb.t.to(device)
    t_cond = mb.teacher_cond.to(device, dtype)
    teacher, hooked, style, prev_style = _teacher_for(state, si, mb, gen)
    use_feat = losses.feature > 0
    ctx = contextlib.nullcontext() if sync else accelerator.no_sync(state.student)
    with ctx:
        with torch.no_grad(), block_outputs(hooked) as t_feats:
            if prev_style is None:
                eps_t = teacher(x_t.to(dtype), t, t_cond).sample
            else:
                eps_t = teacher(x_t.to(dtype), t, t_cond, style=prev_style.to(device))
        style_arg = style.to(device) if torch.is_tensor(style) else style
        with accelerator.autocast():
            out = state.student(
                x_t, t, mb.student_cond.to(device), style=style_arg, return_features=use_feat
            )
            eps_s, s_feats = _split_output(out)
            terms = {}
            if losses.score:
                terms["score"] = score_loss(eps_s, eps_t)
            if use_feat:
                terms["feature"] = feature_loss(s_feats, t_feats)
            if losses.adversarial > 0 and state.sources[si].teacher_index is not None:
                terms["adversarial"], d_loss = _adversarial(state, mb, x_t, t, eps_s, eps_t, style)
            loss = terms.get("score", 0.0) * 1.0
            if use_feat:
                loss = loss + losses.feature * terms["feature"]
            if "adversarial" in terms:
                loss = loss + losses.adversarial * terms["adversarial"]
        if not torch.is_tensor(loss):
            raise DmmError("every loss is switched off; enable at least one")
        accelerator.backward(loss * scale)
        if "adversarial" in terms:
            state.disc_opt.zero_grad(set_to_none=True)
            accelerator.backward(d_loss * scale)
            state.disc_opt.step()
            terms["discriminator"] = d_loss
    return terms, loss


def train_step(state: TrainState) -> dict[str, float]:
    """One optimizer step over this process's micro-batches; returns the step's record."""
    cfg, accelerator = state.cfg, state.accelerator
    world, step = accelerator.num_processes, state.progress.step
    plan = step_plan(len(state.sources), world, step)
    mine = plan[accelerator.process_index]
    global_count = Counter(t for p in plan for t, _ in p)
    sums: Counter = Counter()
    per_source: dict[str, float] = {}
    for k, (si, rep) in enumerate(mine):
        src = state.sources[si]
        # DDP averages over processes; this weight gives each source exactly
        # its share of the step whatever the process count.
        scale = world * src.weight / global_count[si]
        terms, loss = _micro_batch(state, step, si, rep, scale, sync=k == len(mine) - 1)
        for name, v in terms.items():
            sums[name] += float(v.detach()) / len(mine)
        sums["total"] += float(loss.detach()) / len(mine)
        per_source[src.name] = float(terms.get("score", loss).detach())
        state.processed[src.name] += cfg.batch_size
    _stop_unless_finite(state, sums["total"], step)
    accelerator.clip_grad_norm_(state.student.parameters(), cfg.grad_clip)
    state.optimizer.step()
    state.lr_sched.step()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.step(accelerator.unwrap_model(state.student).parameters())
    state.progress.step += 1
    record = {f"loss/{k}": v for k, v in sums.items()}
    record.update({f"loss_score/{k}": v for k, v in per_source.items()})
    record["lr"] = state.lr_sched.get_last_lr()[0]
    record["step"] = state.progress.step
    return record


def _stop_unless_finite(state: TrainState, total: float, step: int) -> None:
    """Stop every process when any one's loss is NaN/inf, naming the last good checkpoint."""
    accelerator = state.accelerator
    finite = torch.tensor([math.isfinite(total)], device=accelerator.device, dtype=torch.float32)
    if accelerator.gather(finite).min().item() < 1:
        accelerator.end_training()
        last = state.last_good
        where = f"last good checkpoint: {last}" if last else "no checkpoint was written"
        raise DmmError(f"loss is NaN/inf at step {step}; training stopped ({where})")


def log_record(state: TrainState, record: dict[str, float]) -> None:
    """Send a step's record to the trackers and, on the main process, to metrics.jsonl."""
    record = {**record, "elapsed_s": round(time.perf_counter() - state.t_start, 3)}
    state.accelerator.log(record, step=record["step"])
    if state.metrics is not None:
        state.metrics.append(record)
    if state.live is not None:
        state.live.add(record)


def save_checkpoint(state: TrainState) -> None:
    """Write, seal and publish the checkpoint of the current step (every process takes part)."""
    accelerator, step = state.accelerator, state.progress.step
    accelerator.save_state(str(ckpt.tmp_dir_for(state.ckpt_root, step)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        limit = state.cfg.checkpoints_total_limit
        state.last_good = ckpt.finalize(state.ckpt_root, step, limit, state.fingerprint)
    accelerator.wait_for_everyone()


def _lineage(state: TrainState) -> dict:
    cfg = state.cfg
    return {
        "base_sha256": state.base_sha,
        "styles": state.final_names,
        "merge_kind": "incremental" if state.previous is not None else "full",
        "parent": str(cfg.init_from) if cfg.init_from else None,
        "old_styles": state.old_styles,
        "new_styles": [n for n in cfg.style_names],
        "retired": list(cfg.retire),
        "old_style_ratio": cfg.old_share(len(state.old_styles)),
    }


def finalize(state: TrainState) -> Path:
    """Save the student folder with its lineage, and the run's summary; returns the folder."""
    accelerator, out_dir, sources = state.accelerator, state.out_dir, state.sources
    rank, world = accelerator.process_index, accelerator.num_processes
    (out_dir / f"rank-{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "world": world,
                "teachers": [sources[i].teacher_index for i in state.owned],
                "samples": dict(state.processed),
            }
        )
    )
    accelerator.wait_for_everyone()
    final = out_dir / "student"
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(state.student)
        if state.ema is not None:
            state.ema.copy_to(model.parameters())
        lineage = _lineage(state)
        with atomic_dir(final) as tmp:
            model.save_pipeline(tmp / "pipe", state.cfg.base)
            for item in (tmp / "pipe").iterdir():
                item.rename(tmp / item.name)
            (tmp / "pipe").rmdir()
            (tmp / LINEAGE).write_text(json.dumps(lineage, indent=2))
        summary = {
            "steps": state.progress.step,
            "resumed_from_step": state.resumed_from_step,
            "world_size": world,
            "styles": state.final_names,
            "merge_kind": lineage["merge_kind"],
            "seconds": round(time.perf_counter() - state.t_start, 2),
            "teacher_placement": state.bank.placement,
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
