"""Distillation: loss wiring, CFG drop, resume equivalence, multi-process, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dmm.atomic import DmmError
from dmm.distill import checkpoints as ckpt
from dmm.distill.config import DistillConfig
from dmm.distill.trainer import TeacherData, assign_teachers, distill, draw, step_plan

STUDENT_UNET = "student/unet/diffusion_pytorch_model.safetensors"


def make_cfg(data, out: Path, names: list[str], **kw) -> DistillConfig:
    zoo, root, teachers = data
    specs = [{"name": n, "path": teachers[n], "samples": root / "samples" / n} for n in names]
    base = dict(
        base=zoo / "base", teachers=specs, output_dir=out, steps=4, batch_size=4,
        checkpoint_every=2, log_every=1, warmup_steps=0, progress=False,
    )  # fmt: skip
    base.update(kw)
    return DistillConfig(**base)


def student_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / STUDENT_UNET)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("n", range(1, 8))
@pytest.mark.parametrize("world", range(1, 5))
def test_every_teacher_gets_exactly_one_nth_of_each_step(n, world):
    for step in range(3):
        plan = step_plan(n, world, step)
        assert len({len(p) for p in plan}) == 1  # collectives line up
        count = Counter(t for p in plan for t, _ in p)
        assert set(count) == set(range(n))
        # Each micro-batch is weighted world / (n * count); DDP divides by world.
        share = {
            t: sum(world / (n * count[t]) for p in plan for u, _ in p if u == t) / world
            for t in count
        }
        assert all(abs(v - 1 / n) < 1e-12 for v in share.values())
    owned = assign_teachers(n, world)
    if world <= n:
        assert sorted(t for o in owned for t in o) == list(range(n))


def test_caption_drop_is_shared_by_student_and_teacher():
    L, D = 5, 3
    data = TeacherData(
        latents=torch.randn(10, 4, 2, 2),
        teacher_embeds=torch.randn(10, L, D) + 5,
        base_embeds=torch.randn(10, L, D) - 5,
        uncond_teacher=torch.full((1, L, D), 7.0),
        uncond_base=torch.full((1, L, D), -7.0),
    )
    alphas = torch.linspace(0.99, 0.01, 1000)
    mb = draw(data, 256, torch.Generator().manual_seed(0), alphas, 0.5)
    s_dropped = (mb.student_cond == -7.0).all(-1).all(-1)
    t_dropped = (mb.teacher_cond == 7.0).all(-1).all(-1)
    assert torch.equal(s_dropped, mb.drop) and torch.equal(t_dropped, mb.drop)
    assert 0.3 < mb.drop.float().mean() < 0.7


def test_loss_is_exactly_zero_when_the_teacher_is_the_base(distill_data, tmp_path):
    out = tmp_path / "run"
    distill(make_cfg(distill_data, out, ["base"], steps=1))
    first = records(out)[0]
    assert first["loss/score"] == 0.0
    assert first["loss/feature"] == 0.0


def test_losses_are_logged_separately_and_student_loads(distill_data, tmp_path):
    from dmm.student.pipeline import DMMStudentPipeline

    out = tmp_path / "run"
    distill(make_cfg(distill_data, out, ["pastel", "neon"], steps=2, checkpoint_every=5))
    rec = records(out)[-1]
    for key in ("loss/score", "loss/feature", "loss/total", "loss_score/pastel", "loss_score/neon"):
        assert key in rec and rec[key] > 0
    pipe = DMMStudentPipeline.from_pretrained(out / "student", local_files_only=True)
    assert pipe.style_names == ["pastel", "neon"]
    # The final step is always checkpointed, and only sealed ones are listed.
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2]


def test_adversarial_loss_runs_and_is_logged(distill_data, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(distill_data, out, ["pastel", "neon"], steps=2)
    cfg.losses.adversarial = 0.01
    distill(cfg)
    rec = records(out)[-1]
    assert rec["loss/adversarial"] > 0 and rec["loss/discriminator"] > 0


def test_resumed_run_matches_uninterrupted_run(distill_data, tmp_path):
    names = ["pastel", "neon", "sepia"]
    full = tmp_path / "full"
    distill(make_cfg(distill_data, full, names, steps=4, ema=True))
    # A crash after checkpoint 2 of the same 4-step run: the decaying rate
    # depends on the total steps, so the restart must pick its schedule up too.
    part = tmp_path / "part"
    distill(make_cfg(distill_data, part, names, steps=4, ema=True))
    shutil.rmtree(part / "checkpoints" / "checkpoint-4")
    shutil.rmtree(part / "student")
    distill(make_cfg(distill_data, part, names, steps=4, ema=True, resume="latest"))
    assert max_diff(student_weights(full), student_weights(part)) <= 1e-6


def test_torn_checkpoint_is_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    good = root / "checkpoint-2"
    good.mkdir(parents=True)
    (good / "model.safetensors").write_bytes(b"x" * 10)
    ckpt.seal(good, 2, "f")
    torn = root / "checkpoint-4"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"x")
    truncated = root / "checkpoint-6"
    truncated.mkdir()
    (truncated / "model.safetensors").write_bytes(b"x" * 10)
    ckpt.seal(truncated, 6, "f")
    (truncated / "model.safetensors").write_bytes(b"x" * 3)  # torn after sealing
    assert ckpt.resolve_resume(root, "latest", "f") == good
    with pytest.raises(DmmError, match="incomplete"):
        ckpt.resolve_resume(root, str(torn), "f")


def test_nan_loss_stops_with_clear_message_and_keeps_last_checkpoint(distill_data, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(
        distill_data, out, ["pastel"], steps=6, checkpoint_every=1, lr=1e30, grad_clip=1e30
    )
    with pytest.raises(DmmError, match=r"NaN/inf at step \d+.*last good checkpoint"):
        distill(cfg)
    assert ckpt.list_checkpoints(out / "checkpoints")
    assert not (out / "student").exists()


def test_teacher_with_other_architecture_is_rejected(distill_data, tmp_path):
    from dmm.zoo.models import make_unet

    zoo, root, teachers = distill_data
    odd = tmp_path / "odd"
    import shutil

    shutil.copytree(teachers["pastel"], odd)
    unet = make_unet(8)
    unet.conv_in = torch.nn.Conv2d(4, 16, 3, padding=1)
    unet.save_pretrained(odd / "unet")
    data = (zoo, root, {**teachers, "odd": odd})
    specs_dir = root / "samples" / "pastel"
    cfg = make_cfg(data, tmp_path / "run", ["odd"], steps=1)
    cfg.teachers[0].samples = specs_dir
    with pytest.raises(
        DmmError, match=r"teacher 'odd' UNet differs from the base: .*conv_in.weight"
    ):
        distill(cfg)


def test_missing_samples_and_missing_teacher_are_clear(distill_data, tmp_path):
    cfg = make_cfg(distill_data, tmp_path / "run", ["pastel"], steps=1)
    cfg.teachers[0].samples = tmp_path / "nope"
    with pytest.raises(DmmError, match="no sample cache for teacher 'pastel'"):
        distill(cfg)
    cfg = make_cfg(distill_data, tmp_path / "run", ["pastel"], steps=1)
    cfg.teachers[0].path = tmp_path / "missing"
    with pytest.raises(DmmError, match="pipeline folder not found"):
        distill(cfg)


def _launch_two(cfg_file: Path, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(port), "-m", "dmm.cli", "distill", "--config", str(cfg_file),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_two_processes_share_the_work_and_match_one_process(distill_data, tmp_path):
    """Two ranks (gloo): each trains its own teachers, gradients are averaged."""
    import yaml

    names = ["pastel", "neon", "sepia", "stripes"]
    # The rate decays every step, so a schedule stepped once per process
    # (accelerate's default) would show here.
    sched = dict(steps=3, lr_schedule="wsd", decay_fraction=1.0)
    single = tmp_path / "single"
    distill(make_cfg(distill_data, single, names, **sched))

    double = tmp_path / "double"
    cfg = make_cfg(distill_data, double, names, **sched)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({"distill": json.loads(cfg.model_dump_json())}))
    r = _launch_two(cfg_file, 29511)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((double / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [x["world"] for x in ranks] == [2, 2]
    assert ranks[0]["teachers"] == [0, 2] and ranks[1]["teachers"] == [1, 3]
    assert set(ranks[0]["samples"]) == {"pastel", "sepia"}
    assert set(ranks[1]["samples"]) == {"neon", "stripes"}
    lrs = [[r["lr"] for r in records(out) if "lr" in r] for out in (single, double)]
    assert lrs[0] == lrs[1] and len(set(lrs[0])) == 3
    # Same batches, averaged gradients: the same student up to float reduction order.
    assert max_diff(student_weights(single), student_weights(double)) < 1e-5


def test_two_processes_with_a_teacher_count_they_do_not_divide(distill_data, tmp_path):
    import yaml

    out = tmp_path / "odd"
    cfg = make_cfg(distill_data, out, ["pastel", "neon", "sepia"], steps=2)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({"distill": json.loads(cfg.model_dump_json())}))
    r = _launch_two(cfg_file, 29512)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((out / f"rank-{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["teachers"] == [0, 2] and ranks[1]["teachers"] == [1]
    assert (out / STUDENT_UNET).is_file()


def test_learning_rate_warms_up_then_stays_flat_or_decays():
    from dmm.distill.config import DistillConfig
    from dmm.distill.trainer import lr_factor

    teachers = [{"name": "a", "path": "t", "samples": "s"}]
    cfg = DistillConfig(
        base="b", teachers=teachers, steps=100, warmup_steps=10, lr_schedule="cosine"
    )
    factors = [lr_factor(s, cfg) for s in range(cfg.steps)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[55] == pytest.approx(0.5, abs=0.02) and factors[-1] < 1e-3
    flat = cfg.model_copy(update={"lr_schedule": "constant"})
    assert [lr_factor(s, flat) for s in (10, 50, 99)] == [1.0, 1.0, 1.0]
    # wsd: flat until the last 20 steps, then a straight line down to 1/20.
    wsd = cfg.model_copy(update={"lr_schedule": "wsd", "decay_fraction": 0.2})
    got = [lr_factor(s, wsd) for s in range(cfg.steps)]
    assert got[0] == pytest.approx(0.1) and got[10:81] == [1.0] * 71
    assert got[90] == pytest.approx(0.5) and got[-1] == pytest.approx(0.05)
    assert all(a > b for a, b in zip(got[80:], got[81:], strict=False))


def test_teacher_mean_init_starts_from_the_average_of_the_teachers(distill_data, tmp_path):
    # lr ~0 leaves the weights where they started: the element-wise teacher mean.
    from dmm.distill.teachers import load_unet

    _, _, teachers = distill_data
    out = tmp_path / "run"
    distill(make_cfg(distill_data, out, ["pastel", "neon"], steps=1, lr=1e-30, init="teacher_mean"))
    got = student_weights(out)
    a, b = (load_unet(teachers[n]).state_dict() for n in ("pastel", "neon"))
    key = "conv_in.weight"
    assert torch.allclose(got[key], (a[key] + b[key]) / 2, atol=1e-6)
    assert not torch.allclose(a[key], b[key])  # the test could tell base init apart
    # and the style MLP still starts with no effect (zero last layer).
    assert got["class_embedding.linear_2.weight"].abs().max() < 1e-20


def test_style_parameters_get_their_own_learning_rate():
    from dmm.distill.trainer import is_style_param

    assert is_style_param("style_codebook.vectors")
    assert is_style_param("unet.class_embedding.linear_1.weight")
    assert is_style_param("module.unet.class_embedding.linear_2.bias")
    assert not is_style_param("unet.time_embedding.linear_1.weight")
    assert not is_style_param("unet.conv_in.weight")
