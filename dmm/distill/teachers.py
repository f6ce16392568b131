"""Teachers for distillation: frozen UNets that live on the device or in host RAM.

With ``offload`` placement a single device-resident UNet is reused for every
teacher: the teacher's weights (kept in host RAM, pinned when a GPU is used)
are copied into it before its micro-batch. Device memory then stays flat in
the number of teachers, at the price of one host-to-device copy per
micro-batch, which overlaps poorly only for very small batches.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from dmm.atomic import DmmError

log = logging.getLogger(__name__)

UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def unet_weights_file(pipeline_dir: Path) -> Path:
    for name in UNET_WEIGHTS:
        f = Path(pipeline_dir) / "unet" / name
        if f.is_file():
            return f
    raise DmmError(f"no UNet weights in {pipeline_dir}/unet (expected {UNET_WEIGHTS[0]})")


def load_unet(pipeline_dir: Path) -> UNet2DConditionModel:
    if not (Path(pipeline_dir) / "unet" / "config.json").is_file():
        raise DmmError(f"missing file: {pipeline_dir}/unet/config.json")
    try:
        return UNet2DConditionModel.from_pretrained(
            Path(pipeline_dir) / "unet", local_files_only=True
        )
    except OSError as exc:  # diffusers' message names the file (e.g. a truncated one)
        raise DmmError(str(exc).strip().splitlines()[0]) from exc


def read_teacher_state(pipeline_dir: Path, name: str) -> dict[str, torch.Tensor]:
    """A teacher's UNet weights, checked readable and finite (NaN would only show as
    a NaN loss, with no teacher named)."""
    path = unet_weights_file(pipeline_dir)
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DmmError(f"teacher {name!r}: cannot read {path} ({reason})") from exc
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DmmError(f"teacher {name!r} has NaN/inf weights: {bad[0]}{more} in {path}")
    return state


def architecture_diff(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> str:
    """Describe how two state dicts differ in keys and shapes ('' if they match)."""
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    shapes = [
        f"{k} {tuple(reference[k].shape)} vs {tuple(other[k].shape)}"
        for k in sorted(set(reference) & set(other))
        if reference[k].shape != other[k].shape
    ]
    parts = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", extra),
        ("shape mismatches", shapes),
    ):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    return "; ".join(parts)


class TeacherBank:
    """Holds the teachers a process needs and runs them without gradients."""

    def __init__(
        self,
        names: list[str],
        dirs: list[Path],
        base_state: dict[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        placement: str = "auto",
    ):
        self.names = list(names)
        self.device = device
        self.dtype = dtype
        states = {}
        for name, d in zip(names, dirs, strict=True):
            state = read_teacher_state(d, name)
            diff = architecture_diff(base_state, state)
            if diff:
                raise DmmError(f"teacher {name!r} UNet differs from the base: {diff}")
            states[name] = state
        self.placement = self._choose(placement, states)
        template = load_unet(dirs[0]) if dirs else None
        self.modules: dict[str, UNet2DConditionModel] = {}
        self.host_states: dict[str, dict[str, torch.Tensor]] = {}
        if self.placement == "device":
            for name in names:
                unet = load_unet(dirs[names.index(name)])
                self.modules[name] = self._freeze(unet)
        else:
            pin = device.type == "cuda"
            for name, state in states.items():
                self.host_states[name] = {
                    k: (v.to(dtype).pin_memory() if pin else v.to(dtype)) for k, v in state.items()
                }
            self.slot = self._freeze(template)
            self.slot_holds: str | None = None
        log.info("teachers %s placed on %s (%s)", ", ".join(names), device, self.placement)

    def _choose(self, placement: str, states: dict) -> str:
        if placement != "auto":
            return placement
        if self.device.type != "cuda":
            return "device"
        need = sum(v.numel() * self.dtype.itemsize for s in states.values() for v in s.values())
        free, _ = torch.cuda.mem_get_info(self.device)
        # Leave room for the student, its optimizer state and activations.
        return "device" if need < 0.4 * free else "offload"

    def _freeze(self, unet: UNet2DConditionModel) -> UNet2DConditionModel:
        unet.requires_grad_(False)
        unet.eval()
        unet = unet.to(self.device)
        return unet if unet.dtype == self.dtype else unet.to(dtype=self.dtype)

    def get(self, name: str) -> UNet2DConditionModel:
        if self.placement == "device":
            return self.modules[name]
        if self.slot_holds != name:
            self.slot.load_state_dict(self.host_states[name], strict=True, assign=False)
            self.slot_holds = name
        return self.slot
