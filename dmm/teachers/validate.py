"""Is a teacher pipeline folder something the student can be distilled from?

A teacher must be the base's architecture with other weights: the same UNet
(config and every key and shape), the same VAE config (the latents are shared),
the same noise schedule and prediction type, a CLIP text encoder of the base's
shape (its weights may differ: whether they do is recorded), and finite
floating-point weights. Every problem found is reported, in one line.

Weights are streamed one tensor at a time from the safetensors files, so an SD1.5
teacher is checked in bounded memory. Folder weights are never unpickled.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dmm.atomic import DmmError

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_CLASSES: dict[str, set[tuple[str, str]]] = {
    "unet": {("diffusers", "UNet2DConditionModel")},
    "text_encoder": {("transformers", "CLIPTextModel")},
    "vae": {("diffusers", "AutoencoderKL"), ("dmm", "PatchAutoencoder")},
    "tokenizer": {("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")},
}
# The noise schedule and target the teacher was trained with: a mismatch makes
# its epsilon mean something else. The scheduler class and inference options
# (spacing, offset, solver) are sampling choices and may differ.
SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)
# Default resolution and fp16 upcasting do not change what the network computes.
_IGNORED_CONFIG = {"sample_size", "force_upcast"}
UNET_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
TEXT_FILES = ("model.safetensors", "model.fp16.safetensors")
_SHOWN = 3


def _listing(items: list[str]) -> str:
    more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise _Problem(f"missing {path.parent.name}/{path.name}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Problem(f"{path.parent.name}/{path.name} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _Problem(f"{path.parent.name}/{path.name} is not a JSON object")
    return data


class _Problem(Exception):
    """One thing wrong with the teacher; collected, then reported together."""


def weights_file(folder: Path, names: tuple[str, ...] = UNET_FILES) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.bin")) or any(folder.glob("*.ckpt")):
        raise _Problem(
            f"{folder.name} weights are only a pickle (.bin); convert them to safetensors "
            "(folder weights are never unpickled)"
        )
    raise _Problem(f"no {folder.name} weights (expected {folder.name}/{names[0]})")


def _defaults(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {
        k: p.default
        for k, p in params.items()
        if k != "self" and p.default is not inspect.Parameter.empty
    }


def _normal(v: Any) -> Any:
    # JSON turns tuples into lists; compare both spellings as equal.
    return [_normal(x) for x in v] if isinstance(v, (tuple, list)) else v


def config_diff(
    teacher: Mapping[str, Any],
    base: Mapping[str, Any],
    defaults: Mapping[str, Any],
    keys: tuple[str, ...] | None = None,
) -> list[str]:
    """'key teacher_value vs base base_value' for each differing config entry.

    Entries missing from a config take the class default, so a config written by
    an older diffusers (fewer keys) still compares equal.
    """
    names = keys or sorted(
        (set(teacher) | set(base)) - _IGNORED_CONFIG - {k for k in {*teacher, *base} if k[0] == "_"}
    )
    out = []
    for k in names:
        t = _normal(teacher.get(k, defaults.get(k)))
        b = _normal(base.get(k, defaults.get(k)))
        if t != b and not (isinstance(t, float) and isinstance(b, float) and math.isclose(t, b)):
            out.append(f"{k} {t!r} vs base {b!r}")
    return out


def _present(entry: Any) -> bool:
    """A model_index.json component entry that names a class (not [null, null])."""
    return isinstance(entry, list) and len(entry) == 2 and bool(entry[0])


def is_sdxl_config(index: Mapping[str, Any], unet_cfg: Mapping[str, Any]) -> bool:
    return (
        "XL" in str(index.get("_class_name", ""))
        or _present(index.get("text_encoder_2"))
        or unet_cfg.get("addition_embed_type") == "text_time"
        or unet_cfg.get("cross_attention_dim") == 2048
    )


# --- families ----------------------------------------------------------------------------------
# A teacher must be of its base's family. SDXL is recognised (folders, original
# single files, the refiner) so that it is refused by name, in both directions,
# before anything is converted.

FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner"}
# Width of SDXL's added (text_time) embedding input: the pooled text embedding
# (1280) plus six size/crop time ids x 256; the refiner has five (an aesthetic
# score replaces the target size).
SDXL_ADM = 2816
REFINER_ADM = 2560
REFINER = (
    "SDXL refiner offered as a teacher: a refiner only denoises the last low-noise steps "
    "(no first text encoder, aesthetic-score conditioning), so it cannot teach a whole sampling run"
)
MISSING_TEXT_ENCODER_2 = (
    "SDXL single file without its second text encoder (no conditioner.embedders.1.* keys)"
)
_ADM_KEYS = ("model.diffusion_model.label_emb.0.0.weight", "add_embedding.linear_1.weight")


def config_family(index: Mapping[str, Any], unet_cfg: Mapping[str, Any]) -> str:
    """sd15, sdxl or sdxl-refiner, from a folder's model_index.json and UNet config."""
    refiner = (
        index.get("requires_aesthetics_score") is True
        or (_present(index.get("text_encoder_2")) and not _present(index.get("text_encoder")))
        or unet_cfg.get("projection_class_embeddings_input_dim") == REFINER_ADM
        and unet_cfg.get("addition_embed_type") == "text_time"
    )
    if refiner:
        return "sdxl-refiner"
    return "sdxl" if is_sdxl_config(index, unet_cfg) else "sd15"


def keys_family(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """sd15, sdxl or sdxl-refiner, from the keys and shapes of a state dict.

    SDXL's added embedding (LDM ``label_emb``, diffusers ``add_embedding``) is
    told by its input width: a dmm student stores its style MLP under
    ``label_emb`` too, at the timestep width.
    """
    for key in _ADM_KEYS:
        shape = shapes.get(key)
        if shape is not None and len(shape) == 2 and shape[1] in (SDXL_ADM, REFINER_ADM):
            return "sdxl-refiner" if shape[1] == REFINER_ADM else "sdxl"
    # The refiner's only text encoder is OpenCLIP bigG, at index 0.
    if any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
        return "sdxl-refiner"
    for key, shape in shapes.items():
        if key.startswith("conditioner.embedders.") or "add_embedding." in key:
            return "sdxl"
        if key.endswith("attn2.to_k.weight") and len(shape) == 2 and shape[1] == 2048:
            return "sdxl"
    return "sd15"


def single_file_problem(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """What makes an SDXL single file unusable as a teacher on any base."""
    family = keys_family(shapes)
    if family == "sdxl-refiner":
        return REFINER
    encoders = {k.split(".")[2] for k in shapes if k.startswith("conditioner.embedders.")}
    if family == "sdxl" and encoders and "1" not in encoders:
        return MISSING_TEXT_ENCODER_2
    return None


def family_problem(teacher: str, base: str) -> str | None:
    """Why a teacher of ``teacher``'s family cannot be merged on a ``base`` one."""
    if teacher == "sdxl-refiner":
        return REFINER
    if base == "sdxl-refiner":
        return "the base is an SDXL refiner; give the SDXL base model"
    if teacher != base:
        return f"{FAMILY_NAMES[teacher]} checkpoint offered against an {FAMILY_NAMES[base]} base"
    if base != "sd15":
        return f"{FAMILY_NAMES[base]} teachers and bases are not supported yet"
    return None


def folder_family(folder: Path) -> str:
    """The family of a pipeline folder (its model_index.json and UNet config)."""
    index = _read_json(Path(folder) / "model_index.json")
    unet = Path(folder) / "unet" / "config.json"
    return config_family(index, _read_json(unet) if unet.is_file() else {})


def base_family(base_dir: Path) -> str:
    try:
        return folder_family(base_dir)
    except _Problem as exc:
        raise DmmError(f"{base_dir}: the base is not a usable pipeline folder: {exc}") from None


def folder_problem(folder: Path, base_dir: Path) -> str | None:
    """Family, then layout, problems of a teacher folder against the base."""
    try:
        problem = family_problem(folder_family(folder), base_family(base_dir))
    except _Problem as exc:
        return str(exc)
    return problem or layout_problem(folder)


def _spec(handle: Any, key: str) -> tuple[str, tuple[int, ...]]:
    sl = handle.get_slice(key)
    return sl.get_dtype(), tuple(int(d) for d in sl.get_shape())


def _open(path: Path) -> Any:
    from safetensors import safe_open

    if path.stat().st_size == 0:
        raise _Problem(f"{path.parent.name}/{path.name} is empty (0 bytes)")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # SafetensorError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _Problem(
            f"{path.parent.name}/{path.name} is not a valid safetensors file "
            f"(truncated or corrupt: {reason})"
        ) from None


def compare_weights(teacher_file: Path, base_file: Path, what: str) -> tuple[list[str], int, str]:
    """(problems, number of tensors that differ from the base, main dtype) of one component.

    Checks keys, shapes, dtypes (floating point only) and finiteness, one tensor
    at a time.
    """
    import torch

    problems: list[str] = []
    with _open(teacher_file) as t, _open(base_file) as b:
        t_specs = {k: _spec(t, k) for k in t.keys()}
        b_specs = {k: _spec(b, k) for k in b.keys()}
        if what == "UNet":
            found = keys_family({k: s for k, (_, s) in t_specs.items()})
            problem = family_problem(found, "sd15")
            if problem:
                raise _Problem(problem)
        missing = sorted(set(b_specs) - set(t_specs))
        extra = sorted(set(t_specs) - set(b_specs))
        shapes = [
            f"{k} {t_specs[k][1]} vs base {b_specs[k][1]}"
            for k in sorted(set(t_specs) & set(b_specs))
            if t_specs[k][1] != b_specs[k][1]
        ]
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", extra),
            ("shape mismatches", shapes),
        ):
            if items:
                problems.append(f"{what} {label}: {_listing(items)}")
        bad_dtype = [
            f"{k} is {d}" for k, (d, _) in sorted(t_specs.items()) if d not in FLOAT_DTYPES
        ]
        if bad_dtype:
            problems.append(
                f"{what} wrong dtype ({_listing(bad_dtype)}; weights must be float16/bfloat16/float32)"
            )
        nonfinite: list[str] = []
        changed = 0
        common = [
            k
            for k in sorted(set(t_specs) & set(b_specs))
            if t_specs[k][1] == b_specs[k][1] and t_specs[k][0] in FLOAT_DTYPES
        ]
        for k in common:
            tt = t.get_tensor(k)
            if not bool(torch.isfinite(tt).all()):
                nonfinite.append(k)
                continue
            bt = b.get_tensor(k)
            if bt.dtype.is_floating_point and not torch.equal(tt, bt.to(tt.dtype)):
                changed += 1
        if nonfinite:
            problems.append(f"{what} has NaN/inf weights in {_listing(nonfinite)}")
        dtypes = [d for d, _ in t_specs.values()]
        main = max(set(dtypes), key=dtypes.count) if dtypes else "?"
    return problems, changed, main


def _check_index(folder: Path) -> dict:
    index = _read_json(folder / "model_index.json")
    problems: list[str] = []
    cls = str(index.get("_class_name"))
    if "XL" in cls or _present(index.get("text_encoder_2")):
        raise _Problem(str(family_problem("sdxl", "sd15")))
    if cls != "StableDiffusionPipeline":
        problems.append(f"pipeline class {cls} is not a StableDiffusionPipeline")
    for comp in COMPONENTS:
        entry = index.get(comp)
        if not _present(entry):
            problems.append(f"model_index.json has no {comp}")
            continue
        lib, name = entry
        allowed = _CLASSES.get(comp)
        ok = (lib, name) in allowed if allowed else lib == "diffusers"
        if not ok:
            # Only known classes are ever loaded: a folder cannot make us run its code.
            problems.append(f"{comp} is {lib}.{name}, not a supported class")
        elif not (folder / comp).is_dir():
            problems.append(f"missing folder {comp}/")
    if problems:
        raise _Problem("; ".join(problems))
    return index


def layout_problem(folder: Path) -> str | None:
    """What is wrong with a pipeline folder's model_index.json and component folders."""
    try:
        _check_index(Path(folder))
    except _Problem as exc:
        return str(exc)
    return None


def check_teacher(teacher_dir: Path, base_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """(facts, problems) about ``teacher_dir`` against ``base_dir``; no exception for
    teacher problems (they are returned), DmmError only if the base is unusable."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from dmm.zoo.autoencoder import PatchAutoencoder

    teacher_dir, base_dir = Path(teacher_dir), Path(base_dir)
    facts: dict[str, Any] = {}
    try:
        base_unet_cfg = _read_json(base_dir / "unet" / "config.json")
        base_vae_cfg = _read_json(base_dir / "vae" / "config.json")
        base_sched = _read_json(base_dir / "scheduler" / "scheduler_config.json")
        base_unet_file = weights_file(base_dir / "unet")
        base_text_file = weights_file(base_dir / "text_encoder", TEXT_FILES)
    except _Problem as exc:
        raise DmmError(f"{base_dir}: the base is not a usable pipeline folder: {exc}") from None
    if not teacher_dir.is_dir():
        return facts, [f"not a folder: {teacher_dir}"]
    problem = folder_problem(teacher_dir, base_dir)
    if problem:
        return facts, [problem]
    problems: list[str] = []

    try:
        unet_cfg = _read_json(teacher_dir / "unet" / "config.json")
        diff = config_diff(unet_cfg, base_unet_cfg, _defaults(UNet2DConditionModel))
        if diff:
            problems.append(f"UNet architecture differs: {_listing(diff)}")
        unet_file = weights_file(teacher_dir / "unet")
        found, changed, dtype = compare_weights(unet_file, base_unet_file, "UNet")
        problems += found
        facts.update(
            unet_file=str(unet_file.relative_to(teacher_dir)),
            unet_dtype=dtype,
            unet_changed_tensors=changed,
        )
    except _Problem as exc:
        problems.append(str(exc))

    try:
        vae_cfg = _read_json(teacher_dir / "vae" / "config.json")
        t_cls, b_cls = vae_cfg.get("_class_name"), base_vae_cfg.get("_class_name")
        facts["vae_class"] = t_cls
        if t_cls != b_cls:
            problems.append(f"VAE class {t_cls} vs base {b_cls}")
        else:
            cls = PatchAutoencoder if t_cls == "PatchAutoencoder" else AutoencoderKL
            diff = config_diff(vae_cfg, base_vae_cfg, _defaults(cls))
            if diff:
                problems.append(f"VAE config differs: {_listing(diff)}")
            vae_file = weights_file(teacher_dir / "vae")
            base_vae_file = weights_file(base_dir / "vae")
            # Other VAE weights with the same config (e.g. a fine-tuned decoder)
            # share the latent space: only broken or misshapen weights are errors.
            found, _, _ = compare_weights(vae_file, base_vae_file, "VAE")
            problems += found
    except _Problem as exc:
        problems.append(str(exc))

    try:
        sched = _read_json(teacher_dir / "scheduler" / "scheduler_config.json")
        diff = config_diff(sched, base_sched, _defaults(DDPMScheduler), SCHEDULE_KEYS)
        if diff:
            problems.append(f"scheduler config differs: {_listing(diff)}")
    except _Problem as exc:
        problems.append(str(exc))

    try:
        t_cfg = CLIPTextConfig.from_pretrained(
            teacher_dir / "text_encoder", local_files_only=True
        ).to_dict()
        b_cfg = CLIPTextConfig.from_pretrained(base_dir / "text_encoder", local_files_only=True)
        b_cfg = b_cfg.to_dict()
        keys = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "vocab_size",
            "hidden_act",
        )
        diff = config_diff(t_cfg, b_cfg, {}, keys)
        if diff:
            problems.append(f"text encoder config differs: {_listing(diff)}")
        text_file = weights_file(teacher_dir / "text_encoder", TEXT_FILES)
        found, changed, _ = compare_weights(text_file, base_text_file, "text encoder")
        problems += found
        facts["trained_text_encoder"] = changed > 0
        facts["text_encoder_changed_tensors"] = changed
    except _Problem as exc:
        problems.append(str(exc))
    except (OSError, ValueError) as exc:
        problems.append(f"text encoder config unreadable ({str(exc).splitlines()[0]})")
    return facts, problems


def validate_teacher(teacher_dir: Path, base_dir: Path, name: str) -> dict[str, Any]:
    """Check a teacher pipeline folder against the base; returns facts about it.

    Raises a one-line DmmError naming the folder and listing every difference
    (UNet architecture/keys/shapes, dtypes, NaN/inf, VAE and scheduler config,
    SDXL offered against an SD1.5 base).
    """
    from dmm.merge.stream import sha256_file

    teacher_dir = Path(teacher_dir)
    facts, problems = check_teacher(teacher_dir, base_dir)
    if problems:
        raise DmmError(f"{teacher_dir}: teacher {name!r}: {'; '.join(problems)}")
    unet_file = teacher_dir / facts["unet_file"]
    changed = facts["unet_changed_tensors"]
    return {
        "name": name,
        "status": "ok",
        "unet_sha256": sha256_file(unet_file),
        "trained_text_encoder": bool(facts["trained_text_encoder"]),
        "unet_dtype": facts["unet_dtype"],
        "unet_changed_tensors": changed,
        "text_encoder_changed_tensors": facts["text_encoder_changed_tensors"],
        "vae_class": facts.get("vae_class"),
        "detail": describe(facts),
    }


def describe(facts: dict[str, Any]) -> str:
    """A short line about a valid teacher, for tables and logs."""
    changed = facts["unet_changed_tensors"]
    if changed == 0:
        return "UNet identical to the base (is this really a fine-tune?)"
    return f"UNet {facts['unet_dtype']}, {changed} tensors differ from the base"
