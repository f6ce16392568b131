"""Student vs teacher inference: DMMStudentPipeline vs StableDiffusionPipeline.

Both pipelines share the base's VAE, text encoder, tokenizer and scheduler
config; the student's UNet is the base UNet plus the style MLP (as
StyleStudent.from_base builds it). Same prompts, steps, guidance, resolution
and seeds; calls alternate (teacher, student, student, teacher, ...) and the
figure is the median of the per-pair time ratios.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from bench_common import build_base_pipeline, median, paired_ratio, summary

PROMPTS = [
    "a large red circle in the center",
    "a small blue square at the top left",
    "a large green triangle at the bottom right",
    "a small yellow circle at the top right",
]


def run(
    work: Path, repeats: int, steps: int = 20, batch: int = 8, guidance: float = 3.0, log=print
) -> dict[str, Any]:
    from diffusers import StableDiffusionPipeline

    from dmm.student.model import StyleStudent
    from dmm.student.pipeline import build_student_pipeline

    base_dir = build_base_pipeline(work / "infer-base", "zoo")
    teacher = StableDiffusionPipeline.from_pretrained(
        base_dir, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    student_model = StyleStudent.from_base(teacher.unet, ["a", "b", "c", "d"], seed=0)
    student_model.eval()
    # A fresh scheduler object for the student: a shared one would carry state
    # (step index, model outputs) from one pipeline's call into the other's.
    student = build_student_pipeline(student_model, teacher)
    student.scheduler = type(teacher.scheduler).from_config(teacher.scheduler.config)
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    prompts = (PROMPTS * batch)[:batch]

    def call(pipe, **extra: Any) -> None:
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="pt",
            **extra,
        )

    def run_teacher() -> None:
        call(teacher)

    def run_student() -> None:
        call(student, style="b")

    run_teacher()  # warm-up both: allocator, kernels
    run_student()
    t_times: list[float] = []
    s_times: list[float] = []
    for r in range(repeats):
        order = [(run_teacher, t_times), (run_student, s_times)]
        for fn, sink in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - t0)
    ratio = paired_ratio(s_times, t_times)
    size = teacher.unet.config.sample_size * teacher.vae_scale_factor
    log(
        f"  inference: teacher {median(t_times) * 1e3:.0f} ms, student "
        f"{median(s_times) * 1e3:.0f} ms, ratio {ratio:.3f} over {repeats} pairs"
    )
    return {
        "ratio": round(ratio, 4),
        "ratio_of_medians": round(median(s_times) / median(t_times), 4),
        "student_s": summary(s_times),
        "teacher_s": summary(t_times),
        "setup": {
            "model": "zoo (random init)",
            "images_per_call": batch,
            "steps": steps,
            "guidance_scale": guidance,
            "resolution_px": size,
            "latent": [teacher.unet.config.in_channels] + [teacher.unet.config.sample_size] * 2,
            "scheduler": type(teacher.scheduler).__name__,
            "repeats": repeats,
        },
    }
