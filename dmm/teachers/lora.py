"""LoRA teachers: the base plus a LoRA, fused into an ordinary teacher folder.

A LoRA stores, per adapted module, a low-rank pair (down: r x in, up: out x r)
and optionally an ``alpha``; the module's weight becomes
``W + scale * (alpha / r) * up @ down`` (a convolution's pair is flattened to
that product and reshaped back). Two key conventions are read:

- kohya (sd-scripts): ``lora_unet_<module with _ for .>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``; the text encoder is ``lora_te_`` (``lora_te1_``
  in SDXL files), and UNet names may be diffusers' or the original LDM ones
  (``lora_unet_input_blocks_1_1_...``);
- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (and the
  older ``lora.down`` / ``lora.up``), ``text_encoder.<module>...``; alpha is a
  per-module ``.alpha`` key or the ``lora_adapter_metadata`` diffusers writes,
  and r otherwise (a scaling of 1, PEFT's default).

kohya names replace dots by underscores, which is ambiguous (``to_q``,
``transformer_blocks``); they are resolved against the base's own module names,
as kohya's loader does. The components a family has, and their prefixes, are
one table (``FAMILY_COMPONENTS``), so another family adds rows, not code.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmm.atomic import DmmError

# component folder -> (PEFT/diffusers prefixes, kohya prefixes), per family
FAMILY_COMPONENTS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "sd15": {
        "unet": (("unet.",), ("lora_unet_",)),
        "text_encoder": (("text_encoder.",), ("lora_te_",)),
    },
}
# Names only one family's LoRAs hold (SDXL's kohya files say lora_te1_/lora_te2_,
# SD1.5's say lora_te_), and the width of the cross-attention keys and values.
_FAMILY_NAMES = (
    (re.compile(r"^(text_encoder_2\.|lora_te2_)|add_embedding|label_emb"), "sdxl"),
    (re.compile(r"^lora_te_"), "sd15"),
)
_CROSS_WIDTH = {2048: "sdxl", 768: "sd15"}
_CROSS_RE = re.compile(r"attn2[._]to_[kv]$")
# (module, part) of every key spelling: part is down, up or alpha.
_KEY_RE = re.compile(
    r"^(?P<module>.+?)\.(?:"
    r"(?P<kohya>lora_down|lora_up)\.weight"
    r"|(?P<peft>lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight"
    r"|(?:lora|lora_linear_layer)\.(?P<old>down|up)\.weight"
    r"|(?P<alpha>alpha)"
    r")$"
)
_PART = {"lora_down": "down", "lora_up": "up", "lora_A": "down", "lora_B": "up"}
_SHOWN = 3


def _listing(items: list[str]) -> str:
    more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


@dataclass
class LoraModule:
    """One adapted module of a LoRA file, as written (before it is matched)."""

    name: str
    down: Any = None
    up: Any = None
    alpha: float | None = None


def read_lora(path: Path, allow_pickle: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, safetensors metadata) of a LoRA file; pickles only with the opt-in."""
    from dmm.teachers.manifest import PICKLE_SUFFIXES
    from dmm.teachers.sources import read_checkpoint

    if path.suffix.lower() in PICKLE_SUFFIXES:
        return read_checkpoint(path, "pickle", allow_pickle), {}
    from dmm.student.export import read_single_file

    return read_single_file(path)


def group_modules(state: dict[str, Any], where: Path) -> dict[str, LoraModule]:
    """The file's keys grouped per module; unknown keys and half pairs are errors."""
    modules: dict[str, LoraModule] = {}
    unknown = []
    for key in sorted(state):
        m = _KEY_RE.match(key)
        if not m:
            unknown.append(key)
            continue
        mod = modules.setdefault(m["module"], LoraModule(m["module"]))
        tensor = state[key]
        if not tensor.is_floating_point():
            raise DmmError(f"{where}: LoRA tensor {key} is {tensor.dtype}, not floating point")
        if m["alpha"]:
            if tensor.numel() != 1:
                raise DmmError(f"{where}: LoRA alpha {key} has {tensor.numel()} values, not one")
            mod.alpha = float(tensor.float().item())
        else:
            part = _PART.get(m["kohya"] or m["peft"] or "", m["old"])
            setattr(mod, part, tensor)
    dora = [k for k in unknown if k.endswith(("dora_scale", "lora_magnitude_vector"))]
    if dora:
        raise DmmError(f"{where}: DoRA weights are not supported, only LoRA: {_listing(dora)}")
    if unknown:
        raise DmmError(f"{where}: not LoRA keys (not a LoRA file?): {_listing(unknown)}")
    half = [
        f"{n} has no {'up' if m.down is not None else 'down'}"
        for n, m in modules.items()
        if (m.down is None) != (m.up is None)
    ]
    if half:
        raise DmmError(f"{where}: incomplete LoRA pairs: {_listing(half)}")
    modules = {n: m for n, m in modules.items() if m.down is not None}
    if not modules:
        raise DmmError(f"{where}: holds no LoRA weights (no lora_down/lora_A keys)")
    return modules


def metadata_alpha(metadata: dict[str, str], component: str, where: Path) -> float | None:
    """The ``lora_alpha`` diffusers writes into the file's metadata for a component."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except json.JSONDecodeError:
        raise DmmError(f"{where}: lora_adapter_metadata is not valid JSON") from None
    if info.get(f"{component}.alpha_pattern") or info.get(f"{component}.rank_pattern"):
        raise DmmError(f"{where}: per-module alpha/rank patterns are not supported")
    alpha = info.get(f"{component}.lora_alpha")
    return float(alpha) if alpha is not None else None


def _kohya(name: str) -> str:
    return name.replace(".", "_")


def module_index(weight_keys: list[str], ldm_names: dict[str, str]) -> dict[str, str]:
    """{every spelling of a module: its weight key in the base file}.

    Spellings: the diffusers name (with and without the ``text_model.`` level
    transformers 5 dropped), its kohya form, and the kohya form of its LDM name.
    """
    index: dict[str, str] = {}
    for key in weight_keys:
        if not key.endswith(".weight"):
            continue
        module = key.removesuffix(".weight")
        bare = module.removeprefix("text_model.")
        for spelling in (bare, "text_model." + bare):
            index[spelling] = key
            index[_kohya(spelling)] = key
        if key in ldm_names:
            ldm = ldm_names[key].removesuffix(".weight").split(".", 2)[-1]
            index[_kohya(ldm)] = key
    return index


def lora_family(modules: dict[str, LoraModule]) -> tuple[str, str] | None:
    """(family, the module that shows it) when the LoRA's names or shapes tell."""
    for name, mod in modules.items():
        for pattern, family in _FAMILY_NAMES:
            if pattern.search(name):
                return family, name
        if _CROSS_RE.search(name) and mod.down.ndim == 2:
            family = _CROSS_WIDTH.get(int(mod.down.shape[1]))
            if family:
                return family, name
    return None


def check_family(modules: dict[str, LoraModule], family: str, where: Path) -> None:
    """A LoRA of another family is refused by name, before any name matching."""
    from dmm.teachers.validate import FAMILY_NAMES

    found = lora_family(modules)
    if found and found[0] != family:
        raise DmmError(
            f"{where}: LoRA for {FAMILY_NAMES[found[0]]} offered against an "
            f"{FAMILY_NAMES[family]} base ({found[1]})"
        )
    if family not in FAMILY_COMPONENTS:
        raise DmmError(
            f"{where}: LoRA teachers on an {FAMILY_NAMES[family]} base are not supported yet"
        )


def split_components(
    modules: dict[str, LoraModule], family: str
) -> dict[str, dict[str, LoraModule]]:
    """The modules per component of the family, prefixes removed."""
    out: dict[str, dict[str, LoraModule]] = {c: {} for c in FAMILY_COMPONENTS[family]}
    for name, mod in modules.items():
        bare = name.removeprefix("base_model.model.")
        for comp, (peft, kohya) in FAMILY_COMPONENTS[family].items():
            prefix = next((p for p in (*peft, *kohya) if bare.startswith(p)), None)
            if prefix is not None:
                out[comp][bare[len(prefix) :]] = mod
                break
        else:
            out["unet"][bare] = mod  # PEFT's own state dicts of a UNet carry no prefix
    return out


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    # A 1x1 convolution and a Linear layer are the same map: trainers write
    # either shape for the projections of an attention block.
    return tuple(shape[:2]) if len(shape) == 4 and tuple(shape[2:]) == (1, 1) else tuple(shape)


def lora_delta(mod: LoraModule, target_shape: tuple[int, ...], where: Path) -> Any:
    """``(alpha / r) * up @ down`` in the target's shape (float32); DmmError on a
    rank or shape mismatch."""
    down, up = mod.down.float(), mod.up.float()
    rank = down.shape[0]
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != rank:
        raise DmmError(
            f"{where}: LoRA rank mismatch in {mod.name}: down {tuple(down.shape)}, "
            f"up {tuple(up.shape)}"
        )
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise DmmError(f"{where}: LoRA {mod.name}: up {tuple(up.shape)} is not a 1x1 projection")
    got = (up.shape[0], *down.shape[1:])
    if _squeezed(got) != _squeezed(target_shape):
        raise DmmError(
            f"{where}: LoRA shape mismatch in {mod.name}: it makes {tuple(got)}, "
            f"the base weight is {tuple(target_shape)}"
        )
    alpha = rank if mod.alpha is None else mod.alpha
    return (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(target_shape)


def fuse_component(
    base_state: dict[str, Any],
    modules: dict[str, LoraModule],
    index: dict[str, str],
    scale: float,
    where: Path,
) -> dict[str, Any]:
    """The base state with every LoRA module fused in (a new dict; the base's
    tensors that no module targets are shared, not copied)."""
    import torch

    fused = dict(base_state)
    for name, mod in modules.items():
        key = index[name]
        weight = base_state[key]
        delta = lora_delta(mod, tuple(weight.shape), where)
        if not bool(torch.isfinite(delta).all()):
            raise DmmError(f"{where}: NaN/inf in LoRA module {mod.name}")
        fused[key] = (weight.float() + scale * delta).to(weight.dtype)
    return fused


def unmatched(
    parts: dict[str, dict[str, LoraModule]], indexes: dict[str, dict[str, str]], where: Path
) -> None:
    """Every LoRA module must name a module of the base: a LoRA that half applies is
    made for another model, and fusing the half that matches would hide it."""
    total = sum(len(mods) for mods in parts.values())
    missing = [m.name for c, mods in parts.items() for n, m in mods.items() if n not in indexes[c]]
    if len(missing) == total:
        raise DmmError(
            f"{where}: none of the LoRA's {total} modules matches a module of the base "
            f"(e.g. {_listing(missing)})"
        )
    if missing:
        raise DmmError(
            f"{where}: {len(missing)} of the LoRA's {total} modules match no module of the "
            f"base: {_listing(missing)}"
        )


def lora_teacher_digest(lora_sha256: str, base_files: list[Path], scale: float) -> str:
    """What a LoRA teacher is: the LoRA file, the base's weights it is fused into,
    and the scale."""
    from dmm.merge.stream import sha256_file

    h = hashlib.sha256(f"dmm-lora-teacher:1:{lora_sha256}:{scale!r}".encode())
    for f in base_files:
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def fuse_lora_teacher(
    lora_path: Path,
    scale: float,
    allow_pickle: bool,
    base_dir: Path,
    out: Path,
    family: str,
) -> dict[str, Any]:
    """Write base + LoRA as a pipeline folder at ``out`` (existing, empty).

    Returns {component: number of modules fused}. Every check runs before the
    first write, so a refused LoRA leaves ``out`` as it was.
    """
    from safetensors.torch import load_file, save_file

    from dmm.student import export as X
    from dmm.teachers.sources import WEIGHT_NAMES, copy_pipeline, weights_in

    state, metadata = read_lora(lora_path, allow_pickle)
    modules = group_modules(state, lora_path)
    check_family(modules, family, lora_path)
    parts = split_components(modules, family)
    base_states, indexes = {}, {}
    for comp, mods in parts.items():
        base_states[comp] = load_file(str(weights_in(base_dir, comp))) if mods else {}
        ldm = {}
        if comp == "unet" and mods:
            cfg = json.loads((base_dir / "unet" / "config.json").read_text())
            ldm = X.unet_ldm_key_map(list(base_states[comp]), cfg)
        indexes[comp] = module_index(list(base_states[comp]), ldm)
    unmatched(parts, indexes, lora_path)
    fused = {}
    for comp, mods in parts.items():
        if mods:
            alpha = metadata_alpha(metadata, comp, lora_path)
            for mod in mods.values():
                mod.alpha = mod.alpha if mod.alpha is not None else alpha
            fused[comp] = fuse_component(base_states[comp], mods, indexes[comp], scale, lora_path)
    copy_pipeline(base_dir, out, without_weights=tuple(fused))
    for comp, tensors in fused.items():
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(out / comp / WEIGHT_NAMES[comp][0]),
            metadata={"format": "pt"},
        )
    return {comp: len(mods) for comp, mods in parts.items()}
