"""Add a teacher of a style the zoo does not have to the demo's champion, by the CLI.

For each seed, a copy of the demo checkout (after `make demo`: champion v1 of the
zoo's teachers) gains the teacher ``duotone`` (the zoo's scenes in two tones,
fine-tuned from the zoo's base with the zoo's own training settings) and runs the
documented re-merge, `dmm plan && dvc repro && dmm register`: an incremental merge
from the champion. One more copy merges all N+1 teachers from scratch at the same
settings (`full_merge`), for the cost ratio and the old styles' FD. Writes
benchmarks/out/unseen_style.json and prints a table.

    .venv/bin/python benchmarks/unseen_style.py --demo . --seeds 1 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

NAME = "duotone"
DARK, LIGHT = np.array([0.10, 0.12, 0.35]), np.array([1.00, 0.62, 0.20])
BIN = Path(sys.executable).parent
SKIP = shutil.ignore_patterns(".venv", ".dagster", "__pycache__", "benchmarks")


def duotone(images: np.ndarray) -> np.ndarray:
    """Luminance mapped onto navy -> orange: a look none of the zoo's styles has."""
    lum = images @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return (DARK + lum[..., None] * (LIGHT - DARK)).astype(np.float32)


def make_teacher(zoo: Path, out: Path) -> dict:
    """Fine-tune the zoo's base on duotone renders, as build_zoo trains its teachers."""
    import copy

    from diffusers import StableDiffusionPipeline

    import dmm  # noqa: F401  (registers the zoo's autoencoder class with diffusers)
    from dmm.zoo import scenes as S
    from dmm.zoo.build import make_pipeline, read_manifest, to_model_space
    from dmm.zoo.config import ZooConfig
    from dmm.zoo.models import make_train_scheduler
    from dmm.zoo.training import tokenize, train_denoiser

    if (out / "model_index.json").exists():
        return json.loads((out / "teacher_info.json").read_text())
    cfg = ZooConfig(**read_manifest(zoo)["config"])
    base = StableDiffusionPipeline.from_pretrained(zoo / "base", local_files_only=True)
    rng = np.random.default_rng(cfg.seed + 101)
    train_combos, _ = S.split_combos(cfg.seed, cfg.held_out_combos)
    scenes = S.sample_scenes(train_combos, cfg.train_images, rng)
    images = to_model_space(duotone(S.render_batch(scenes, "base", supersample=2)))
    with torch.no_grad():
        latents = base.vae.encode(images).latent_dist.mode() * base.vae.config.scaling_factor
    unet, text = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    t0 = time.perf_counter()
    losses = train_denoiser(
        unet, text, latents, tokenize(base.tokenizer, [s.caption for s in scenes]),
        tokenize(base.tokenizer, [""])[0], make_train_scheduler(),
        steps=cfg.teacher_steps, batch_size=cfg.batch_size, lr=cfg.teacher_lr,
        train_text_encoder=False, seed=cfg.seed + 101, desc=NAME,
    )  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make_pipeline(unet, text, base.tokenizer, base.vae).save_pretrained(tmp)
    info = {"final_loss": float(np.mean(losses[-10:])), "seconds": time.perf_counter() - t0}
    (tmp / "teacher_info.json").write_text(json.dumps(info))
    tmp.rename(out)
    return info


def _run(cmd: list[str], cwd: Path, log) -> tuple[int, float]:
    t0 = time.perf_counter()
    print(f"  $ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    return proc.returncode, time.perf_counter() - t0


def remerge(demo: Path, work: Path, teacher: Path, request: dict) -> dict:
    """A copy of the demo checkout with the new teacher, re-merged by the documented commands."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(demo, work, symlinks=True, ignore=SKIP)
    shutil.copytree(teacher, work / "data" / "imports" / NAME)
    manifest = work / "data" / "teachers.yaml"
    manifest.write_text(
        manifest.read_text() + f"  - {{name: {NAME}, source: data/imports/{NAME}}}\n"
    )
    (work / "data" / "plan" / "request.json").write_text(json.dumps(request))
    times, codes = {}, {}
    with open(work / "remerge.log", "w") as log:
        for name, cmd in (
            ("plan", [str(BIN / "dmm"), "plan"]),
            ("repro", [str(BIN / "dvc"), "repro"]),
            ("register", [str(BIN / "dmm"), "register"]),
        ):
            codes[name], times[name] = _run(cmd, work, log)
            if codes[name] not in (0, 1) or (name != "register" and codes[name]):
                break
    plan = json.loads((work / "data/plan/merge_plan.json").read_text())
    summary = json.loads((work / "data/student/summary.json").read_text())
    metrics = _read(work / "data/evaluation/metrics.json")
    evaluation = _read(work / "data/evaluation/evaluation.json")
    return {
        "request": request,
        "kind": plan.get("kind"),
        "parent_version": plan.get("parent_version"),
        "codes": codes,
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "train_seconds": summary.get("seconds"),
        "steps": summary.get("steps"),
        "gate_passed": codes.get("register") == 0,
        "gate": _tail(work / "remerge.log"),
        "diag_fd": evaluation.get("per_style_fd", {}) if evaluation else {},
        "metrics": metrics,
    }


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _tail(log: Path, n: int = 12) -> list[str]:
    return log.read_text().splitlines()[-n:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("."), help="checkout after `make demo`")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--work", type=Path, default=Path("benchmarks/out/unseen_style"))
    ap.add_argument("--skip-full", action="store_true", help="no from-scratch merge")
    args = ap.parse_args()
    demo, work = args.demo.resolve(), args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    info = make_teacher(demo / "data" / "zoo", work / "teacher")
    print(f"teacher {NAME}: final loss {info['final_loss']:.4f}", flush=True)
    runs = {}
    for seed in args.seeds:
        print(f"incremental merge, seed {seed}", flush=True)
        runs[f"incremental_{seed}"] = remerge(
            demo, work / f"inc_{seed}", work / "teacher", {"distill": {"seed": seed}}
        )
        (work.parent / "unseen_style.json").write_text(json.dumps(runs, indent=2))
    if not args.skip_full:
        print("full merge of every teacher", flush=True)
        runs["full"] = remerge(
            demo, work / "full", work / "teacher",
            {"full_merge": True, "distill": {"seed": args.seeds[0]}},
        )  # fmt: skip
    (work.parent / "unseen_style.json").write_text(json.dumps(runs, indent=2))
    for name, run in runs.items():
        print(
            f"{name:16s} kind={run['kind']} train={run['train_seconds']} s "
            f"steps={run['steps']} gate={'pass' if run['gate_passed'] else 'FAIL'} "
            f"fd={ {k: round(v, 2) for k, v in run['diag_fd'].items()} }"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
