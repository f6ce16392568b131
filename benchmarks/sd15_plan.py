"""SD1.5 at full size, with no download: one distillation step on the CPU, and a
GPU memory plan for merging 8 SD1.5 teachers on one 80 GB card.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd15_plan.py            # step + plan
    .venv/bin/python benchmarks/sd15_plan.py --no-step                    # plan only (seconds)
    .venv/bin/python benchmarks/sd15_plan.py --latent 32 --json out.json  # 256 px step
    .venv/bin/python benchmarks/sd15_plan.py --tiny --latent 8            # quick check

The step is the product's own: ``trainer.setup`` builds the training state
from a DistillConfig over a random-weight SD1.5 base and one perturbed
teacher written to a temp folder (configs from dmm/teachers/sd15.py), and
``trainer.train_step`` runs one optimizer step on it (fp32 on the CPU, score +
feature losses, clipping, AdamW with its learning-rate groups). Hooks time
its teacher forward, student forward and AdamW update, and count what the
student's forward keeps for backward. It runs in a child process so that its
peak RSS is its own (which includes the trainer's set-up copies of the UNet).
``--tiny`` runs it on a tiny SD1.5-like UNet, as a quick check of the script.

The plan counts bytes from parameter counts (weights, gradients, AdamW
states) and from activation bytes measured here on the CPU: the tensors the
student's forward pass keeps for its backward pass, per 512 px sample, with and
without gradient checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

GIB = 1024**3
CARD_GIB = 80.0
# CUDA context, cuBLAS/cuDNN workspaces and allocator fragmentation.
RESERVED_GIB = 3.0
NUM_TEACHERS = 8
# fp16 autocast keeps most saved activations in half precision; norms and the
# losses stay fp32, so take 0.55 of the fp32 bytes rather than 0.5.
FP16_ACTIVATION_FACTOR = 0.55
PCIE_GIB_S = 20.0
RECOMMENDED_MICRO_BATCH = 20  # effective host->device copy rate of pinned memory, PCIe 4.0 x16

# Measured by this script (CPU, fp32, batch 1, 64x64 latents = 512 px, torch
# 2.13 / diffusers 0.42); used by --no-step. Rerun without --no-step to remeasure.
MEASURED_512PX = {
    "saved_activation_bytes": 1_871_088_160,
    "saved_activation_bytes_checkpointed": 436_158_496,
    "largest_recompute_bytes": 147_594_752,
    "teacher_feature_bytes_fp32": 25_231_360,
}


def _rss_bytes() -> int:
    """Current resident set size (not the peak)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def param_counts(num_styles: int = NUM_TEACHERS) -> dict[str, int]:
    from dmm.teachers.sd15 import sd15_text_encoder, sd15_unet, sd15_vae, style_params

    def count(m) -> int:
        return sum(p.numel() for p in m.parameters())

    unet = count(sd15_unet(meta=True))
    return {
        "unet": unet,
        "text_encoder": count(sd15_text_encoder(meta=True)),
        "vae": count(sd15_vae(meta=True)),
        "student": unet + style_params(num_styles),
        "style_extra": style_params(num_styles),
    }


class SavedBytes:
    """Bytes autograd keeps for backward during a forward pass (parameters excluded),
    also attributed to the innermost checkpointable unit (resnet or transformer block)."""

    def __init__(self, module: torch.nn.Module, units: tuple[type, ...]):
        self.params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.seen: set[int] = set()
        self.total = 0
        self.per_unit: list[int] = []
        self.stack: list[int] = []
        self.unit_inputs: set[int] = set()
        self.unit_input_bytes = 0
        self.units = [m for m in module.modules() if isinstance(m, units)]

    def _pack(self, t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr in self.params or ptr in self.seen:
            return t
        self.seen.add(ptr)
        self.total += s.nbytes()
        if self.stack:
            self.per_unit[self.stack[-1]] += s.nbytes()
        return t

    def _enter(self, _module, args):
        self.per_unit.append(0)
        self.stack.append(len(self.per_unit) - 1)
        x = args[0] if args else None
        # What gradient checkpointing keeps of a unit: its input.
        if x is not None and torch.is_tensor(x):
            ptr = x.untyped_storage().data_ptr()
            if ptr not in self.unit_inputs and ptr not in self.params:
                self.unit_inputs.add(ptr)
                self.unit_input_bytes += x.untyped_storage().nbytes()

    def _leave(self, _module, _args, _out):
        self.stack.pop()

    def __enter__(self):
        self.handles = [u.register_forward_pre_hook(self._enter) for u in self.units]
        self.handles += [u.register_forward_hook(self._leave) for u in self.units]
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        for h in self.handles:
            h.remove()


class PhaseTimer:
    """Wall time inside a module's forward passes (hooks on the module itself)."""

    def __init__(self, module: torch.nn.Module):
        self.total = 0.0
        self.rss_delta = 0
        self.handles = [
            module.register_forward_pre_hook(self._start),
            module.register_forward_hook(self._stop),
        ]

    def _start(self, *_):
        self.t0, self.rss0 = time.perf_counter(), _rss_bytes()

    def _stop(self, *_):
        self.total += time.perf_counter() - self.t0
        self.rss_delta += _rss_bytes() - self.rss0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _fixture(work: Path, latent: int, tiny: bool) -> Any:
    """A DistillConfig over a random-init SD1.5 base and one perturbed teacher on disk."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import SD15_TINY_UNET, build_unet_fixture

    from dmm.distill.config import DistillConfig
    from dmm.teachers.sd15 import SD15_UNET

    unet_cfg = dict(SD15_TINY_UNET if tiny else SD15_UNET, sample_size=latent)
    fixture = build_unet_fixture(work, unet_cfg, n_teachers=1, n_samples=8)
    return DistillConfig(
        base=fixture["base"],
        teachers=fixture["teachers"],
        output_dir=work / "run",
        steps=2,
        lr=1e-5,
        warmup_steps=0,
        teacher_placement="device",
        checkpoint_every=10**6,
        progress=False,
    )


TIME_ORDER = (
    "build_models_s",
    "teacher_forward_s",
    "student_forward_s",
    "backward_and_rest_s",
    "optimizer_s",
    "step_total_s",
)


def distill_step(latent: int, batch: int, tiny: bool = False) -> dict[str, Any]:
    """One real DMM step (``trainer.train_step``) at SD1.5 size on the CPU; returns
    timings, memory and activation bytes."""
    import tempfile

    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    from dmm.distill.losses import block_outputs
    from dmm.distill.trainer import setup, train_step

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    times: dict[str, float] = {}
    rss: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="dmm-sd15-plan-") as work:
        cfg = _fixture(Path(work), latent, tiny).model_copy(update={"batch_size": batch})
        t0 = time.perf_counter()
        state = setup(cfg)
        times["build_models_s"] = time.perf_counter() - t0
    rss["after_models_gib"] = _rss_bytes() / GIB
    student = state.accelerator.unwrap_model(state.student)
    teacher = state.bank.get(cfg.teachers[0].name)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = state.optimizer.optimizer  # the torch optimizer inside accelerate's wrapper
    opt_time: dict[str, float] = {}
    grad_norm: list[float] = []

    def before_opt(*_):
        grad_norm.append(float(torch.nn.utils.get_total_norm([p.grad for p in params])))
        opt_time["t0"] = time.perf_counter()

    def after_opt(*_):
        times["optimizer_s"] = time.perf_counter() - opt_time["t0"]

    hooks = [opt.register_step_pre_hook(before_opt), opt.register_step_post_hook(after_opt)]
    t_timer, s_timer = PhaseTimer(teacher), PhaseTimer(student)
    units = (ResnetBlock2D, BasicTransformerBlock)
    t_step = time.perf_counter()
    with block_outputs(teacher) as t_feats, SavedBytes(student, units) as saved:
        record = train_step(state)
    times["step_total_s"] = time.perf_counter() - t_step
    times["teacher_forward_s"] = t_timer.total
    times["student_forward_s"] = s_timer.total
    # What the step spends outside the two forwards and AdamW: mostly the backward pass.
    times["backward_and_rest_s"] = times["step_total_s"] - sum(
        times[k] for k in ("teacher_forward_s", "student_forward_s", "optimizer_s")
    )
    rss["forward_graph_delta_gib"] = s_timer.rss_delta / GIB
    rss["peak_gib"] = _peak_rss_bytes() / GIB
    feat_bytes = sum(f.numel() * 4 for f in t_feats)  # as fp32, per the batch
    for h in (*hooks, t_timer, s_timer):
        h.remove()
    finite = all(bool(torch.isfinite(p).all()) for p in params)

    # The same step with gradient checkpointing: what its forward keeps for backward.
    student.unet.enable_gradient_checkpointing()
    with SavedBytes(student, units) as saved_ckpt:
        train_step(state)
    return {
        "latent": latent,
        "batch": batch,
        "unet": "sd15-tiny" if tiny else "sd15",
        "step": "dmm.distill.trainer.train_step",
        "threads": torch.get_num_threads(),
        "times": {k: round(times[k], 2) for k in TIME_ORDER},
        "rss": {k: round(v, 2) for k, v in rss.items()},
        "losses": {k.removeprefix("loss/"): v for k, v in record.items() if k.startswith("loss/")},
        "grad_norm": grad_norm[0],
        "weights_finite_after_step": finite,
        "saved_activation_bytes": saved.total,
        "saved_activation_bytes_checkpointed": saved_ckpt.total + saved_ckpt.unit_input_bytes,
        "largest_recompute_bytes": max(saved.per_unit, default=0),
        "teacher_feature_bytes_fp32": feat_bytes,
    }


# --- the GPU plan ----------------------------------------------------------------------------


def gpu_plan(
    counts: dict[str, int], act: dict[str, Any], batches: tuple[int, ...]
) -> dict[str, Any]:
    """Memory per device for 8 SD1.5 teachers + one student, in GiB."""
    fp16, fp32 = 2, 4
    per_sample = {
        "full": act["saved_activation_bytes"] * FP16_ACTIVATION_FACTOR / GIB,
        "checkpointed": (
            act["saved_activation_bytes_checkpointed"] + act["largest_recompute_bytes"]
        )
        * FP16_ACTIVATION_FACTOR
        / GIB,
    }
    # The teacher's block outputs are held (fp16) for the feature loss.
    teacher_feats = act["teacher_feature_bytes_fp32"] / 2 / GIB
    fixed = {
        "student weights fp32": counts["student"] * fp32 / GIB,
        "student gradients fp32": counts["student"] * fp32 / GIB,
        "AdamW exp_avg + exp_avg_sq fp32": 2 * counts["student"] * fp32 / GIB,
    }
    placements = {
        "device": NUM_TEACHERS * counts["unet"] * fp16 / GIB,
        "offload": counts["unet"] * fp16 / GIB,  # one slot, refilled per micro-batch
    }
    optional = {
        "EMA copy fp32": counts["student"] * fp32 / GIB,
        "adversarial: frozen UNet fp16 + head": counts["unet"] * fp16 / GIB + 0.25,
        "online text encoding: 8 tuned text encoders fp16": NUM_TEACHERS
        * counts["text_encoder"]
        * fp16
        / GIB,
        "online latents: VAE fp16": counts["vae"] * fp16 / GIB,
    }
    budget = CARD_GIB - RESERVED_GIB
    table = []
    for b in batches:
        row = {"batch": b}
        for place, teachers in placements.items():
            for mode, act_gib in per_sample.items():
                row[f"{place}/{mode}"] = (
                    sum(fixed.values()) + teachers + b * (act_gib + teacher_feats)
                )
        table.append(row)
    max_batch = {}
    for place, teachers in placements.items():
        for mode, act_gib in per_sample.items():
            free = budget - sum(fixed.values()) - teachers
            max_batch[f"{place}/{mode}"] = int(free // (act_gib + teacher_feats))
    return {
        "fixed": fixed,
        "placements": placements,
        "per_sample_activation_gib": per_sample,
        "teacher_feature_gib_per_sample": teacher_feats,
        "optional": optional,
        "budget_gib": budget,
        "table": table,
        "max_batch": max_batch,
        "offload_copy_s": placements["offload"] / PCIE_GIB_S,
    }


def print_report(counts: dict[str, int], step: dict[str, Any] | None, plan: dict) -> None:
    print("SD1.5 parameter counts (from the configs in dmm/teachers/sd15.py)")
    for k in ("unet", "text_encoder", "vae"):
        print(f"  {k:<14} {counts[k]:>13,}")
    print(f"  student        {counts['student']:>13,}  (UNet + style MLP + {NUM_TEACHERS} vectors)")
    if step is not None:
        px = step["latent"] * 8
        print(
            f"\nOne distillation step on the CPU ({step['threads']} thread(s), batch "
            f"{step['batch']}, {step['latent']}x{step['latent']} latents = {px} px)"
        )
        for k, v in step["times"].items():
            print(f"  {k:<22} {v:>8.1f} s")
        print(f"  peak RSS               {step['rss']['peak_gib']:>8.2f} GiB")
        print(f"  RSS after models       {step['rss']['after_models_gib']:>8.2f} GiB")
        print(f"  forward graph (RSS)    {step['rss']['forward_graph_delta_gib']:>8.2f} GiB")
        ls = step["losses"]
        print(
            f"  losses: score {ls['score']:.3e}, feature {ls['feature']:.3e}; "
            f"grad norm (clipped) {step['grad_norm']:.3e}; weights finite: "
            f"{step['weights_finite_after_step']}"
        )
        for k in (
            "saved_activation_bytes",
            "saved_activation_bytes_checkpointed",
            "largest_recompute_bytes",
            "teacher_feature_bytes_fp32",
        ):
            print(f"  {k:<38} {step[k] / GIB:>7.3f} GiB")
    print(
        f"\nGPU memory plan: {NUM_TEACHERS} SD1.5 teachers + 1 student on one {CARD_GIB:.0f} GiB "
        f"card ({plan['budget_gib']:.0f} GiB usable after {RESERVED_GIB:.0f} GiB for the CUDA "
        "context, workspaces and fragmentation), 512 px, fp16 autocast"
    )
    for k, v in plan["fixed"].items():
        print(f"  {k:<46} {v:>7.2f} GiB")
    print(f"  {'teachers fp16, all on the device':<46} {plan['placements']['device']:>7.2f} GiB")
    print(
        f"  {'teachers fp16, offload (one device slot)':<46} "
        f"{plan['placements']['offload']:>7.2f} GiB  (+{plan['placements']['device']:.1f} GiB "
        f"pinned host RAM; {plan['offload_copy_s'] * 1000:.0f} ms copy per teacher switch)"
    )
    ps = plan["per_sample_activation_gib"]
    print(
        f"  activations per sample: {ps['full']:.2f} GiB without, {ps['checkpointed']:.2f} GiB "
        f"with gradient checkpointing; teacher features {plan['teacher_feature_gib_per_sample']:.2f} GiB"
    )
    print("  optional extras:")
    for k, v in plan["optional"].items():
        print(f"    {k:<52} {v:>6.2f} GiB")
    cols = [c for c in plan["table"][0] if c != "batch"]
    print("\n  GiB per device (* = over budget)")
    print("  micro-batch" + "".join(f"{c:>22}" for c in cols))
    for row in plan["table"]:
        cells = "".join(
            f"{row[c]:>21.1f}{'*' if row[c] > plan['budget_gib'] else ' '}" for c in cols
        )
        print(f"  {row['batch']:>11}{cells}")
    print(
        "  largest micro-batch that fits: "
        + ", ".join(f"{k} {v}" for k, v in plan["max_batch"].items())
    )
    print(
        "  Teachers rotate over micro-batches with gradient accumulation (dmm distill), so the\n"
        "  activations scale with the micro-batch, never with the number of teachers."
    )
    b = RECOMMENDED_MICRO_BATCH
    row = plan["fixed"] | {"teachers": plan["placements"]["device"]}
    extras = (
        plan["optional"]["EMA copy fp32"] + plan["optional"]["adversarial: frozen UNet fp16 + head"]
    )
    act = b * (plan["per_sample_activation_gib"]["full"] + plan["teacher_feature_gib_per_sample"])
    total = sum(row.values()) + extras + act
    print(
        f"  Recommended: all {NUM_TEACHERS} teachers on the device, no checkpointing, fp16 "
        f"autocast, micro-batch {b} per teacher\n  (the paper's per-GPU batch: 320 over 16 GPUs), "
        f"with EMA and the adversarial loss: {total:.1f} of {plan['budget_gib']:.0f} GiB."
    )


def _run_step_in_child(latent: int, batch: int, tiny: bool) -> dict[str, Any]:
    """Run the step in a fresh interpreter, so the peak RSS is the step's alone."""
    cmd = [sys.executable, __file__, "--step-only", "--latent", str(latent), "--batch", str(batch)]
    cmd += ["--tiny"] if tiny else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64, help="latent size (64 = 512 px)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-step", action="store_true", help="plan only, from recorded figures")
    parser.add_argument(
        "--tiny", action="store_true", help="the step on a tiny SD1.5-like UNet (a quick check)"
    )
    parser.add_argument("--step-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.step_only:
        print(json.dumps(distill_step(args.latent, args.batch, args.tiny)))
        return 0
    counts = param_counts()
    step = None if args.no_step else _run_step_in_child(args.latent, args.batch, args.tiny)
    if step is not None and step["latent"] == 64 and step["batch"] == 1 and not args.tiny:
        act = step
    else:
        act = MEASURED_512PX
    plan = gpu_plan(counts, act, batches=(1, 4, 8, 16, 24, 32, 48, 64))
    print_report(counts, step, plan)
    if args.json:
        args.json.write_text(json.dumps({"counts": counts, "step": step, "plan": plan}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
