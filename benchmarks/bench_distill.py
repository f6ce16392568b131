"""Distillation: the real training step vs its compute floor, and scaling in N teachers.

The real step is ``dmm.distill.trainer.distill`` itself, timed per step from
its metrics.jsonl ``elapsed_s`` (the first steps are warm-up and are dropped).
The floor is built from the same pieces the trainer builds (StyleStudent.from_base,
AdamW with the config's settings, the teachers' UNets, trainer.draw batches)
and times, alone and on the same inputs, the work no trainer can skip:
student forward (with block features) + backward + optimizer step, and one
teacher forward per micro-batch. Real and floor alternate in rounds, and the
ratio is the median of the per-round ratios.

Run as a script, this module is the scaling child (one N per process, so its
peak RSS is its own): ``bench_distill.py scale N FIXTURE_DIR OUT_DIR BATCH STEPS``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    BENCH_DIR,
    build_distill_fixture,
    distill_config,
    median,
    module_bytes,
    paired_ratio,
    peak_rss_bytes,
    run_child,
    step_times_from_metrics,
    summary,
)

WARMUP_STEPS = 2


@contextlib.contextmanager
def capture_trainer_objects() -> Iterator[dict[str, list]]:
    """Record the TeacherBank, StyleStudent and AdamW that distill() builds.

    The trainer looks these names up at call time (its module's TeacherBank,
    torch.optim.AdamW, StyleStudent.from_base), so recording subclasses or
    wrappers see the very objects of the real run; the trainer is not edited.
    """
    import dmm.distill.trainer as trainer
    from dmm.student import model as student_model

    seen: dict[str, list] = {"banks": [], "students": [], "optimizers": []}
    original_bank, original_adamw = trainer.TeacherBank, torch.optim.AdamW
    original_from_base = student_model.StyleStudent.__dict__["from_base"]

    class Bank(original_bank):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            seen["banks"].append(self)

    class AdamW(original_adamw):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            seen["optimizers"].append(self)

    def from_base(cls, *a: Any, **k: Any):
        student = original_from_base.__func__(cls, *a, **k)
        seen["students"].append(student)
        return student

    trainer.TeacherBank = Bank
    torch.optim.AdamW = AdamW  # type: ignore[misc]
    student_model.StyleStudent.from_base = classmethod(from_base)  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        trainer.TeacherBank = original_bank
        torch.optim.AdamW = original_adamw  # type: ignore[misc]
        student_model.StyleStudent.from_base = original_from_base  # type: ignore[method-assign]


class Floor:
    """The work no trainer can skip, run on the real run's own student, AdamW and
    teachers (so caches, memory layout and optimizer state are the trainer's)."""

    def __init__(self, cfg: Any, seen: dict[str, list], seed: int = 0) -> None:
        from diffusers import DDPMScheduler

        from dmm.distill.losses import block_outputs
        from dmm.distill.trainer import TeacherData, _seed_for, draw

        self.cfg = cfg
        self.student = seen["students"][0]
        self.optimizer = seen["optimizers"][0]
        bank = seen["banks"][0]
        if bank.placement != "device":
            raise RuntimeError("the floor needs every teacher resident (placement 'device')")
        self.teachers = [bank.get(name) for name in cfg.style_names]
        sched = DDPMScheduler.from_config(DDPMScheduler.load_config(Path(cfg.base) / "scheduler"))
        self.alphas = sched.alphas_cumprod.float()
        self.batch = cfg.batch_size
        self.data = []
        self.batches = []
        for i, spec in enumerate(cfg.teachers):
            data = TeacherData.load(spec.samples, spec.name)
            self.data.append(data)
            gen = torch.Generator().manual_seed(_seed_for(seed, 0, i, 0))
            self.batches.append(draw(data, self.batch, gen, self.alphas, cfg.caption_dropout))
        # Teacher targets are computed once: the student's timed pass only needs them.
        self.targets = []
        with torch.no_grad():
            for teacher, mb in zip(self.teachers, self.batches, strict=True):
                with block_outputs(teacher) as feats:
                    eps = teacher(mb.x_t, mb.t, mb.teacher_cond).sample
                self.targets.append((eps, list(feats)))

    def student_step(self) -> None:
        """Forward + backward for every teacher's micro-batch, then one optimizer step."""
        from dmm.distill.losses import feature_loss, score_loss

        n = len(self.batches)
        use_feat = self.cfg.losses.feature > 0
        for i, (mb, (eps_t, feats_t)) in enumerate(zip(self.batches, self.targets, strict=True)):
            out = self.student(mb.x_t, mb.t, mb.student_cond, style=i, return_features=use_feat)
            eps_s, feats_s = out if use_feat else (out, None)
            loss = score_loss(eps_s, eps_t)
            if use_feat:
                loss = loss + self.cfg.losses.feature * feature_loss(feats_s, feats_t)
            (loss / n).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def teacher_forwards(self) -> None:
        for teacher, mb in zip(self.teachers, self.batches, strict=True):
            teacher(mb.x_t, mb.t, mb.teacher_cond)


def trainer_pieces(floor: Floor, reps: int = 5) -> dict[str, float]:
    """Median ms of the step's parts that are not UNet compute, on the floor's objects.

    clip and draw are what the trainer adds to the floor; the AdamW variants
    show how much of the floor itself is the optimizer's per-tensor loop.
    """
    from bench_common import timeit

    from dmm.distill.trainer import draw

    mb = floor.batches[0]
    eps_t, feats_t = floor.targets[0]
    out = floor.student(mb.x_t, mb.t, mb.student_cond, style=0, return_features=True)
    from dmm.distill.losses import feature_loss, score_loss

    (score_loss(out[0], eps_t) + 0.001 * feature_loss(out[1], feats_t)).backward()
    params = [p for p in floor.student.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)

    def ms(fn) -> float:
        return round(median(timeit(fn, reps, warmup=1)) * 1e3, 2)

    res = {
        "clip_grad_norm": ms(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)),
        "clip_grad_norm_foreach": ms(
            lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        ),
        "draw_microbatch": ms(
            lambda: draw(floor.data[0], floor.batch, gen, floor.alphas, floor.cfg.caption_dropout)
        ),
        "adamw_step_default": ms(floor.optimizer.step),
    }
    fused = torch.optim.AdamW(
        params, lr=floor.cfg.lr, weight_decay=floor.cfg.weight_decay, fused=True
    )
    res["adamw_step_fused"] = ms(fused.step)
    floor.optimizer.zero_grad(set_to_none=True)
    return res


def real_steps(fixture: dict[str, Any], out: Path, batch: int, steps: int, **cfg: Any) -> list:
    from dmm.distill.trainer import distill

    distill(distill_config(fixture, out, steps=steps, batch_size=batch, **cfg))
    return step_times_from_metrics(out / "metrics.jsonl", skip=WARMUP_STEPS)


@contextlib.contextmanager
def after_each_step(callback: Callable[[], None]) -> Iterator[list[float]]:
    """Run ``callback`` inside distill() after each step's metrics record.

    The trainer stamps ``elapsed_s`` before ``accelerator.log``, so the
    callback's time lands in the next step's difference; its durations are
    yielded so that the caller can subtract them. This pairs every real step
    with a floor measurement taken right next to it: on a shared machine whose
    load changes by the second, pairs a whole run apart would not compare.
    """
    from accelerate import Accelerator

    original = Accelerator.log
    spent: list[float] = []

    def log(self, values, step=None, log_kwargs=None):
        original(self, values, step=step, log_kwargs=log_kwargs or {})
        t0 = time.perf_counter()
        callback()
        spent.append(time.perf_counter() - t0)

    Accelerator.log = log  # type: ignore[method-assign]
    try:
        yield spent
    finally:
        Accelerator.log = original  # type: ignore[method-assign]


def step_vs_floor(
    kind: str, n_teachers: int, batch: int, steps: int, work: Path, log=print
) -> dict[str, Any]:
    """Real distill() steps vs the floor, measured alternately step by step."""
    from dmm.distill.trainer import distill

    fixture = build_distill_fixture(work / f"fx-{kind}", kind, n_teachers)
    out = work / f"run-{kind}"
    cfg = distill_config(fixture, out, steps=steps, batch_size=batch)
    student_s: list[float] = []
    teacher_s: list[float] = []
    state: dict[str, Floor] = {}

    def measure() -> None:
        if "floor" not in state:  # after step 1: the trainer's objects exist now
            state["floor"] = Floor(cfg, seen)
        floor = state["floor"]
        # Alternate the order, so neither part always runs on the other's caches.
        parts = [(floor.student_step, student_s), (floor.teacher_forwards, teacher_s)]
        for fn, sink in parts if len(student_s) % 2 == 0 else parts[::-1]:
            t0 = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - t0)

    with capture_trainer_objects() as seen, after_each_step(measure) as spent:
        distill(cfg)
    floor = state["floor"]
    raw = step_times_from_metrics(out / "metrics.jsonl", skip=0)
    # Step k+1's difference holds the measurement made after step k.
    real = [raw[0]] + [d - c for d, c in zip(raw[1:], spent, strict=False)]
    real, student_s, teacher_s = (x[WARMUP_STEPS:steps] for x in (real, student_s, teacher_s))
    # Pair step k with the floor measured right before it (after step k - 1).
    pairs = list(zip(real[1:], student_s, teacher_s, strict=False))
    floor_s = [s + t for _, s, t in pairs]
    ratio = paired_ratio([r for r, _, _ in pairs], floor_s)
    log(
        f"  {kind}: step {median(real) * 1e3:.0f} ms, floor {median(floor_s) * 1e3:.0f} ms "
        f"(student {median(student_s) * 1e3:.0f} + teacher {median(teacher_s) * 1e3:.0f}), "
        f"ratio {ratio:.3f} over {len(pairs)} paired steps"
    )
    n_params = sum(p.numel() for p in floor.student.parameters())
    pieces = trainer_pieces(floor)
    log("    pieces (ms): " + ", ".join(f"{k} {v:g}" for k, v in pieces.items()))
    return {
        "ratio": round(ratio, 3),
        "pieces_ms": pieces,
        "step_s": summary(real),
        "floor_s": summary(floor_s),
        "student_fwd_bwd_opt_s": summary(student_s),
        "teacher_fwd_s": summary(teacher_s),
        "setup": {
            "model": kind,
            "teachers": n_teachers,
            "batch_per_teacher": batch,
            "latent": list(floor.batches[0].x_t.shape[1:]),
            "student_params": n_params,
            "steps": steps,
            "warmup_steps_dropped": WARMUP_STEPS,
            "paired_steps": len(pairs),
            "losses": "score + feature (0.001), no adversarial",
            "precision": "fp32 (CPU)",
            "pairing": "floor measured between real steps inside the same distill() run",
        },
    }


def profile_step(kind: str, batch: int, steps: int, work: Path, top: int = 15) -> dict[str, Any]:
    """torch.profiler over real distill() steps: the ops with the most self CPU time,
    and the share of time outside the UNet forward/backward."""
    from torch.profiler import ProfilerActivity, profile

    fixture = build_distill_fixture(work / f"fx-prof-{kind}", kind, 1)
    real_steps(fixture, work / "prof-warm", batch, 3)  # imports, allocator, kernels
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        real_steps(fixture, work / "prof-run", batch, steps)
    events = prof.key_averages()
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    table = [
        {
            "op": e.key,
            "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1),
            "share": round(e.self_cpu_time_total / total, 4),
            "calls": e.count,
        }
        for e in rows[:top]
    ]
    by_name = {e.key: e for e in events}

    def total_ms(name: str) -> float | None:
        e = by_name.get(name)
        return round(e.cpu_time_total / 1e3, 1) if e else None

    return {
        "top_self_cpu": table,
        "named_totals_ms": {
            k: total_ms(k)
            for k in (
                "Optimizer.step#AdamW.step",
                "aten::_foreach_norm",
                "aten::linalg_vector_norm",
                "aten::randn",
                "aten::randint",
                "aten::index",
            )
        },
        "profiled_steps": steps,
        "note": "includes distill() setup and teardown (loading, final save) of the profiled run",
    }


# --- scaling in N (one process per N) ----------------------------------------------


def scale_child(n: int, fixture_dir: Path, out: Path, batch: int, steps: int) -> dict[str, Any]:
    """distill() with teacher_placement='offload' and the first ``n`` teachers."""
    fixture = json.loads((fixture_dir / "fixture.json").read_text())
    fixture["teachers"] = fixture["teachers"][:n]
    teacher_device = [0]

    def probe() -> None:
        # Device side of the bank after each step: the modules it runs (the one
        # slot when offloading, every teacher otherwise).
        bank = seen["banks"][0]
        mods = [bank.slot] if bank.placement == "offload" else list(bank.modules.values())
        teacher_device[0] = max(teacher_device[0], sum(module_bytes(m, bank.device) for m in mods))

    with capture_trainer_objects() as seen, after_each_step(probe) as spent:
        cfg = distill_config(
            fixture, out, steps=steps, batch_size=batch, teacher_placement="offload"
        )
        from dmm.distill.trainer import distill

        distill(cfg)
    raw = step_times_from_metrics(out / "metrics.jsonl", skip=0)
    times = [raw[0]] + [d - c for d, c in zip(raw[1:], spent, strict=False)]
    times = times[WARMUP_STEPS:]
    bank, student, opt = seen["banks"][0], seen["students"][0], seen["optimizers"][0]
    host = sum(v.nbytes for s in bank.host_states.values() for v in s.values())
    opt_state = sum(
        v.nbytes for st in opt.state.values() for v in st.values() if torch.is_tensor(v)
    )
    trainable = sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad)
    student_bytes = module_bytes(student)
    return {
        "n": n,
        "placement": bank.placement,
        "step_s": median(times),
        "step_times": times,
        "peak_rss": peak_rss_bytes(),
        "teacher_device_bytes": teacher_device[0],
        "teacher_host_bytes": host,
        "student_bytes": student_bytes,
        "optimizer_state_bytes": opt_state,
        "grad_bytes": trainable,
        # Everything the trainer keeps on the device: teacher slot, student,
        # its gradients (alive during a step) and AdamW's moments.
        "device_resident_bytes": teacher_device[0] + student_bytes + trainable + opt_state,
    }


def scaling(
    kind: str, ns: list[int], batch: int, steps: int, repeats: int, work: Path, log=print
) -> dict[str, Any]:
    fixture = build_distill_fixture(work / f"fx-scale-{kind}", kind, max(ns), n_samples=32)
    fixture_dir = fixture["root"]
    (fixture_dir / "fixture.json").write_text(
        json.dumps({**fixture, "base": str(fixture["base"]), "root": str(fixture["root"]),
                    "teachers": [{k: str(v) for k, v in t.items()} for t in fixture["teachers"]]})
    )  # fmt: skip
    script = str(BENCH_DIR / "bench_distill.py")
    per_n: dict[int, list[dict[str, Any]]] = {n: [] for n in ns}
    for r in range(repeats):
        for n in ns if r % 2 == 0 else list(reversed(ns)):
            out = work / f"scale-{n}-{r}"
            res = run_child([script, "scale", str(n), str(fixture_dir), str(out), str(batch),
                             str(steps)])  # fmt: skip
            per_n[n].append(res)
            log(
                f"  N={n:>2} r{r}: step {res['step_s'] * 1e3:.0f} ms, device "
                f"{res['device_resident_bytes'] / 2**20:.2f} MiB (teacher slot "
                f"{res['teacher_device_bytes'] / 2**20:.2f}), peak RSS {res['peak_rss'] / 2**20:.0f} MiB"
            )
    rows = {}
    for n, rs in per_n.items():
        step = median([x["step_s"] for x in rs])
        rows[str(n)] = {
            "step_s": round(step, 4),
            "step_s_per_teacher": round(step / n, 4),
            "samples_per_s": round(n * batch / step, 1),
            "peak_rss_mib": round(median([x["peak_rss"] for x in rs]) / 2**20, 1),
            "device_resident_mib": round(rs[0]["device_resident_bytes"] / 2**20, 3),
            "teacher_device_mib": round(rs[0]["teacher_device_bytes"] / 2**20, 3),
            "teacher_host_mib": round(rs[0]["teacher_host_bytes"] / 2**20, 3),
            "student_mib": round(rs[0]["student_bytes"] / 2**20, 3),
            "optimizer_state_mib": round(rs[0]["optimizer_state_bytes"] / 2**20, 3),
            "placement": rs[0]["placement"],
        }
    lo, hi = str(min(ns)), str(max(ns))

    def growth(key: str) -> float:
        return round(rows[hi][key] / rows[lo][key] - 1.0, 4)

    return {
        "device_memory_growth": growth("device_resident_mib"),
        "teacher_device_memory_growth": growth("teacher_device_mib"),
        "host_rss_growth": growth("peak_rss_mib"),
        "step_time_per_teacher_growth": growth("step_s_per_teacher"),
        "device_placement_teacher_mib": {
            # What teacher_placement="device" would hold on the device: every teacher.
            n: round(rows[n]["teacher_host_mib"], 3)
            for n in rows
        },
        "per_n": rows,
        "setup": {
            "model": kind,
            "batch_per_teacher": batch,
            "steps": steps,
            "warmup_steps_dropped": WARMUP_STEPS,
            "repeats": repeats,
            "placement": "offload: one device-resident teacher slot, host copies per teacher",
            "device_bytes": "parameters + buffers of the modules on the device (teacher slot, "
            "student), plus the student's gradients and AdamW state",
        },
    }


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "scale":
        res = scale_child(
            int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]),
            int(sys.argv[6]),
        )  # fmt: skip
        print(json.dumps(res))
    else:
        sys.exit("usage: bench_distill.py scale N FIXTURE_DIR OUT_DIR BATCH STEPS")
