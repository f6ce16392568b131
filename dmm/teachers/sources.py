"""Turn a manifest entry into a checked diffusers teacher folder.

Every source kind ends as the same thing: a StableDiffusionPipeline folder with
the base's architecture, written atomically, validated against the base before
it appears. Single files and pickles are converted offline with diffusers' own
LDM -> diffusers conversion, using the base folder's configs, tokenizer and
scheduler, so nothing is fetched from the Hub. Pickles are refused unless the
entry opts in, and even then only ``torch.load(weights_only=True)`` reads them.
No source can make dmm run code: only known component classes are loaded and
``trust_remote_code`` is never set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dmm.atomic import DmmError, atomic_dir
from dmm.hashing import unet_sha256
from dmm.teachers.manifest import (
    TEACHER_NAME_RE,
    TeacherEntry,
    check_inside,
    hub_parts,
    local_path,
    source_kind,
)

log = logging.getLogger(__name__)

TEACHER_JSON = "teacher.json"
CORE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors"),
}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def zoo_path(source: str, zoo_dir: Path) -> Path:
    """The folder of ``zoo:<style>`` (``zoo:base`` is the zoo's base)."""
    style = source.removeprefix("zoo:")
    zoo_dir = Path(zoo_dir)
    path = zoo_dir / "base" if style == "base" else zoo_dir / "teachers" / style
    if not (path / "model_index.json").is_file():
        tdir = zoo_dir / "teachers"
        known = (
            sorted(p.name for p in tdir.iterdir() if p.is_dir() and not p.name.startswith("."))
            if tdir.is_dir()
            else []
        )
        hint = f"known: {', '.join(known)}" if known else "run `dmm zoo build` first"
        raise DmmError(f"{path}: zoo model {style!r} not found ({hint})")
    return path


def _sha256(path: Path) -> str:
    from dmm.merge.stream import sha256_file

    return sha256_file(path)


def _check_pin(entry: TeacherEntry, path: Path) -> str:
    actual = _sha256(path)
    if entry.sha256 is not None and actual != entry.sha256:
        raise DmmError(
            f"{path}: sha256 mismatch for teacher {entry.name!r}: expected {entry.sha256}, "
            f"actual {actual}"
        )
    return actual


def weights_in(folder: Path, comp: str) -> Path:
    from dmm.teachers.validate import _Problem, weights_file

    try:
        return weights_file(folder / comp, WEIGHT_NAMES[comp])
    except _Problem as exc:
        raise DmmError(f"{folder}: {exc}") from None


def _local(source: str, repo_root: Path | None, what: str) -> Path:
    path = local_path(source, repo_root)
    if repo_root is not None:
        check_inside(path, repo_root, what, source)
    if not path.exists():
        raise DmmError(f"{path}: {what} not found")
    return path


# --- reading checkpoints ---------------------------------------------------------------------


def read_checkpoint(path: Path, kind: str, allow_pickle: bool) -> dict[str, Any]:
    """The tensors of a .safetensors file or (opt-in) a weights-only pickle."""
    import torch

    from dmm.student.export import read_single_file

    path = Path(path)
    if kind == "single_file":
        return read_single_file(path)[0]
    if not allow_pickle:
        raise DmmError(
            f"{path}: refusing to unpickle (a pickle can run code); set allow_pickle: true "
            "for this teacher to load it with torch.load(weights_only=True)"
        )
    if path.stat().st_size == 0:
        raise DmmError(f"{path}: empty file (0 bytes)")
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DmmError(
            f"{path}: refused by torch.load(weights_only=True): the pickle holds more than "
            f"tensors ({unpickling_cause(exc)})"
        ) from None
    except (EOFError, RuntimeError, OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise DmmError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt: {reason})"
        ) from None
    # Lightning / LDM checkpoints nest the weights under "state_dict".
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise DmmError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not tensors:
        raise DmmError(f"{path}: holds no tensors")
    return tensors


def unpickling_cause(exc: Exception) -> str:
    """The cause in torch's weights-only refusal, in a few words.

    torch's message is a paragraph of advice with terminal escapes; the cause is
    one sentence in it ("Unsupported global: GLOBAL getattr was not an allowed
    global ..."), reduced here to what the pickle asked for.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    named = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if named:
        return f"it asks for {named.group(1)}, not an allowed global"
    for line in (ln.strip() for ln in text.splitlines()):
        if line.startswith("WeightsUnpickler error:"):
            # The first sentence names the cause; the rest is advice.
            return line.removeprefix("WeightsUnpickler error:").strip().split(". ")[0].rstrip(".")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__).split(". ")[0].rstrip(".")


def _check_tensors(state: dict[str, Any], keys: list[str], where: Path, what: str) -> None:
    import torch

    bad = [f"{k} is {state[k].dtype}" for k in keys if not state[k].is_floating_point()]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DmmError(
            f"{where}: wrong dtype in {what} ({', '.join(bad[:3])}{more}); "
            "weights must be float16/bfloat16/float32"
        )
    nonfinite = [k for k in keys if not bool(torch.isfinite(state[k]).all())]
    if nonfinite:
        more = f" (+{len(nonfinite) - 3} more)" if len(nonfinite) > 3 else ""
        raise DmmError(f"{where}: NaN/inf weights in {what}: {', '.join(nonfinite[:3])}{more}")


# --- conversion ------------------------------------------------------------------------------


def _write_index(src_index: dict[str, Any], dst: Path) -> None:
    """The source's model_index.json with every component but the five SD ones nulled.

    A safety checker or feature extractor plays no part in distillation, and
    copying one (1.2 GB for SD1.5) into every teacher would be waste.
    """
    index = dict(src_index)
    for k, v in src_index.items():
        if isinstance(v, list) and k not in CORE_COMPONENTS:
            index[k] = [None, None]
    index["requires_safety_checker"] = False
    (dst / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _copy_component(
    src: Path, dst: Path, comp: str, repo_root: Path | None, weights_too: bool = True
) -> None:
    """Copy one component folder: configs and tokenizer files, and (unless
    ``weights_too`` is false) the one safetensors weights file under its
    canonical (non-variant) name."""
    (dst / comp).mkdir(parents=True, exist_ok=True)
    weights = weights_in(src, comp) if comp in WEIGHT_NAMES else None
    for f in sorted((src / comp).iterdir()):
        if not f.is_file() or f.suffix in _PICKLE_SUFFIXES or f.suffix == ".py":
            continue
        if f.suffix == ".safetensors" and (f != weights or not weights_too):
            continue  # other variants (fp16 / non-EMA copies) are not needed
        if repo_root is not None:
            check_inside(f, repo_root, "file")
        name = WEIGHT_NAMES[comp][0] if f == weights else f.name
        shutil.copyfile(f, dst / comp / name)


def copy_pipeline(
    src: Path, dst: Path, repo_root: Path | None = None, without_weights: tuple[str, ...] = ()
) -> None:
    """The five SD components of ``src`` into ``dst`` (existing, empty); the
    components in ``without_weights`` get their configs only (the caller writes
    their weights)."""
    index = json.loads((src / "model_index.json").read_text())
    for comp in CORE_COMPONENTS:
        _copy_component(src, dst, comp, repo_root, comp not in without_weights)
    _write_index(index, dst)


def convert_checkpoint(state: dict[str, Any], base_dir: Path, out: Path, where: Path) -> dict:
    """Write a teacher folder at ``out`` from an LDM-layout checkpoint, offline.

    The UNet must be in the file; the text encoder and VAE are taken from it when
    present and from the base otherwise. Tokenizer and scheduler are the base's.
    Returns which parts came from the file.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dmm.student import export as X
    from dmm.teachers.validate import base_family, family_problem, keys_family, single_file_problem
    from dmm.zoo.autoencoder import PatchAutoencoder

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    problem = single_file_problem(shapes) or family_problem(
        keys_family(shapes), base_family(base_dir)
    )
    if problem:
        raise DmmError(f"{where}: {problem}")
    unet_keys = sorted(k for k in state if k.startswith(X.LDM_UNET))
    if not unet_keys:
        raise DmmError(f"{where}: no UNet weights (no {X.LDM_UNET}* keys): not an SD checkpoint")
    base_cfg = UNet2DConditionModel.load_config(base_dir, subfolder="unet")
    from safetensors import safe_open

    with safe_open(str(weights_in(base_dir, "unet")), framework="pt") as fh:
        base_shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    expected = {
        ldm: base_shapes[k] for k, ldm in X.unet_ldm_key_map(list(base_shapes), base_cfg).items()
    }
    missing = sorted(set(expected) - set(unet_keys))
    extra = sorted(set(unet_keys) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs base {expected[k]}"
        for k in unet_keys
        if k in expected and tuple(state[k].shape) != expected[k]
    ]
    parts = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", extra),
        ("shape mismatches", shapes),
    ):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"UNet {label}: {', '.join(items[:3])}{more}")
    if parts:
        raise DmmError(f"{where}: {'; '.join(parts)}")
    _check_tensors(state, unet_keys, where, "the UNet")
    unet = X.unet_from_state(X.ldm_to_unet_state(state, base_cfg), base_cfg, where)
    unet.save_pretrained(out / "unet")
    del unet
    facts = {"text_encoder": "base", "vae": "base"}

    text_keys = [k for k in state if k.startswith(X.LDM_TEXT) and not k.endswith("position_ids")]
    if text_keys:
        _check_tensors(state, text_keys, where, "the text encoder")
        cfg = CLIPTextConfig.from_pretrained(base_dir / "text_encoder", local_files_only=True)
        with torch.random.fork_rng(devices=[]):
            text_encoder = CLIPTextModel(cfg)
        flat = not hasattr(text_encoder, "text_model")
        converted = {
            k: v
            for k, v in X.ldm_to_text_encoder_state(state, flat).items()
            if not k.endswith("position_ids")
        }
        X.load_strict(text_encoder, converted, "text encoder", where)
        text_encoder.save_pretrained(out / "text_encoder")
        facts["text_encoder"] = "file"
    else:
        shutil.copytree(base_dir / "text_encoder", out / "text_encoder")

    base_vae = json.loads((base_dir / "vae" / "config.json").read_text())
    vae_class = base_vae.get("_class_name")
    ldm_vae = [k for k in state if k.startswith(X.LDM_VAE)]
    patch_vae = {k[len(X.PATCH_VAE) :]: v for k, v in state.items() if k.startswith(X.PATCH_VAE)}
    file_class = "AutoencoderKL" if ldm_vae else "PatchAutoencoder" if patch_vae else None
    if file_class is not None and file_class != vae_class:
        raise DmmError(f"{where}: VAE class {file_class} vs base {vae_class}")
    if ldm_vae:
        _check_tensors(state, ldm_vae, where, "the VAE")
        from accelerate import init_empty_weights

        with init_empty_weights():
            vae = AutoencoderKL.from_config(base_vae)
        X.load_strict(vae, X.ldm_to_vae_state(state, base_vae), "VAE", where)
        vae.save_pretrained(out / "vae")
        facts["vae"] = "file"
    elif patch_vae:
        _check_tensors(patch_vae, list(patch_vae), where, "the VAE")
        vae = PatchAutoencoder.from_config(base_vae)
        X.load_strict(vae, patch_vae, "VAE", where)
        vae.save_pretrained(out / "vae")
        facts["vae"] = "file"
    else:
        shutil.copytree(base_dir / "vae", out / "vae")
    for comp in ("tokenizer", "scheduler"):
        shutil.copytree(base_dir / comp, out / comp)
    _write_index(json.loads((base_dir / "model_index.json").read_text()), out)
    return facts


# --- the Hub ---------------------------------------------------------------------------------


def download_hub(source: str, allow_pickle: bool = False) -> Path:
    """``hub:<repo>@<revision>`` -> a local snapshot; refuses to run offline."""
    repo, revision = hub_parts(source)
    if hub_offline():
        raise DmmError(
            f"{source}: cannot download from the Hugging Face Hub while HF_HUB_OFFLINE=1; "
            "unset it, or download the model and point the manifest at the local folder/file"
        )
    from huggingface_hub import snapshot_download

    ignore = ["*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.pb", "*.xml", "*.py"]
    if not allow_pickle:
        ignore += [f"*{s}" for s in _PICKLE_SUFFIXES]
    try:
        return Path(snapshot_download(repo, revision=revision, ignore_patterns=ignore))
    except Exception as exc:  # the hub client raises many error types
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise DmmError(f"{source}: download failed ({reason})") from None


def _hub_single_file(snapshot: Path, source: str) -> Path:
    files = sorted(snapshot.glob("*.safetensors"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise DmmError(
            f"{source}: no model_index.json and not exactly one .safetensors file at the top "
            f"level (found: {found})"
        )
    return files[0]


# --- teachers --------------------------------------------------------------------------------


def _check_files_inside(folder: Path, repo_root: Path, name: str) -> None:
    """Every file a teacher folder's components hold resolves inside the project.

    The folder itself may be inside while a weights file is a symlink to
    elsewhere; checking and copying must read the same files, so both refuse it.
    """
    for comp in ("model_index.json", *CORE_COMPONENTS):
        path = folder / comp
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        for f in files:
            try:
                check_inside(f, repo_root, f"teacher {name!r} file")
            except DmmError as exc:
                raise DmmError(f"{folder}: {exc}") from None


def prepare_teacher(
    entry: TeacherEntry,
    base_dir: Path,
    scratch: Path,
    *,
    zoo_dir: Path,
    repo_root: Path | None = None,
) -> tuple[Path, Path, str]:
    """(folder to validate, path to name in errors, sha256 of the pinned thing).

    Folders are used in place; files are converted into ``scratch``.
    """
    kind = entry.kind
    if kind == "lora":
        return _prepare_lora(entry, Path(base_dir), scratch, repo_root)
    what = f"teacher {entry.name!r} source"
    if kind in ("zoo", "diffusers"):
        folder = (
            zoo_path(entry.source, zoo_dir)
            if kind == "zoo"
            else _local(entry.source, repo_root, what)
        )
        if not (folder / "model_index.json").is_file():
            raise DmmError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
        if kind == "diffusers" and repo_root is not None:
            _check_files_inside(folder, repo_root, entry.name)
        return folder, folder, _check_pin(entry, weights_in(folder, "unet"))
    if kind == "hub":
        snapshot = download_hub(entry.source, entry.allow_pickle)
        if (snapshot / "model_index.json").is_file():
            return snapshot, snapshot, _check_pin(entry, weights_in(snapshot, "unet"))
        path, kind = _hub_single_file(snapshot, entry.source), "single_file"
    else:
        path = _local(entry.source, repo_root, what)
        if not path.is_file():
            raise DmmError(f"{path}: expected a file for a {kind} source")
    # Hash before unpickling: a pin is the one check a hostile pickle cannot dodge.
    digest = _check_pin(entry, path)
    state = read_checkpoint(path, kind, entry.allow_pickle)
    scratch.mkdir(parents=True, exist_ok=True)
    convert_checkpoint(state, Path(base_dir), scratch, path)
    return scratch, path, digest


def _prepare_lora(
    entry: TeacherEntry, base_dir: Path, scratch: Path, repo_root: Path | None
) -> tuple[Path, Path, str]:
    """The base with the entry's LoRA fused, in ``scratch``; the digest covers the
    LoRA file, the base weights it was fused into and the scale."""
    from dmm.teachers.lora import fuse_lora_teacher, lora_teacher_digest
    from dmm.teachers.validate import base_family

    path = _local(str(entry.lora), repo_root, f"teacher {entry.name!r} lora")
    if not path.is_file():
        raise DmmError(f"{path}: expected a LoRA file")
    # Hash before unpickling, as for checkpoints.
    lora_digest = _check_pin(entry, path)
    scratch.mkdir(parents=True, exist_ok=True)
    family = base_family(base_dir)
    fuse_lora_teacher(path, entry.scale, entry.allow_pickle, base_dir, scratch, family)
    base_files = [weights_in(base_dir, "unet"), weights_in(base_dir, "text_encoder")]
    return scratch, path, lora_teacher_digest(lora_digest, base_files, entry.scale)


def validate_prepared(folder: Path, base_dir: Path, name: str, where: Path) -> dict[str, Any]:
    """``check_teacher`` facts, or a DmmError naming the user's source ``where``
    (not the converted or staged copy) and every problem."""
    from dmm.teachers.validate import check_teacher

    facts, problems = check_teacher(folder, base_dir)
    if problems:
        raise DmmError(f"{where}: teacher {name!r}: {'; '.join(problems)}")
    return facts


@contextlib.contextmanager
def _no_new_empty_folders(folder: Path) -> Iterator[None]:
    """On failure, remove the folders up to ``folder`` that this call created and
    that are still empty: a refused teacher leaves no trace, not even its parent."""
    made = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        made.append(p)
    try:
        yield
    except BaseException:
        for p in made:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def materialize_teacher(
    entry: TeacherEntry,
    base_dir: Path,
    out_dir: Path,
    *,
    zoo_dir: Path,
    repo_root: Path | None = None,
) -> dict[str, Any]:
    """Write the teacher's diffusers folder at ``out_dir`` (atomically) and return
    its metadata: name, source, kind, sha256 (of the UNet weights),
    trained_text_encoder, path, and a few more facts.

    Nothing appears at ``out_dir`` unless every check passed, and a failed run
    leaves a previous ``out_dir`` untouched.
    """
    from dmm.teachers.validate import describe, folder_problem

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if not TEACHER_NAME_RE.match(entry.name):
        raise DmmError(f"invalid teacher name {entry.name!r}")
    kind = entry.kind
    with _no_new_empty_folders(out_dir.parent), atomic_dir(out_dir) as tmp:
        scratch = tmp / ".convert"
        folder, where, source_digest = prepare_teacher(
            entry, base_dir, scratch, zoo_dir=zoo_dir, repo_root=repo_root
        )
        if folder == scratch:
            for item in scratch.iterdir():
                os.replace(item, tmp / item.name)
            scratch.rmdir()
        else:
            if folder.resolve() == out_dir.resolve():
                raise DmmError(f"{out_dir}: the output folder is the teacher's own source")
            problem = folder_problem(folder, base_dir)
            if problem:
                raise DmmError(f"{where}: teacher {entry.name!r}: {problem}")
            copy_pipeline(folder, tmp, repo_root if kind == "diffusers" else None)
        # The folder that gets published is the one validated.
        facts = validate_prepared(tmp, base_dir, entry.name, where)
        meta = {
            "name": entry.name,
            "source": entry.origin,
            "kind": kind,
            "sha256": _sha256(tmp / facts["unet_file"]),
            "source_sha256": source_digest,
            # The base it was validated against: its samples depend on it too.
            "base_unet_sha256": unet_sha256(base_dir),
            "trained_text_encoder": bool(facts["trained_text_encoder"]),
            "path": str(out_dir),
            "unet_dtype": facts["unet_dtype"],
            "unet_changed_tensors": facts["unet_changed_tensors"],
            "detail": describe(facts),
        }
        if entry.lora is not None:
            meta["lora_scale"] = entry.scale
        (tmp / TEACHER_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("teacher %s: %s -> %s", entry.name, entry.origin, out_dir)
    return meta


def resolve_base(
    source: str, *, zoo_dir: Path, repo_root: Path | None = None, work_dir: Path | None = None
) -> Path:
    """The base pipeline folder for a manifest's ``base``.

    zoo and diffusers bases are used in place; a hub base is downloaded; a
    single-file base is converted into ``work_dir`` with diffusers, which needs
    the SD1.5 configs and tokenizer from the Hub (or its cache).
    """
    kind = source_kind(source)
    if kind == "zoo":
        return zoo_path(source, zoo_dir)
    if kind == "diffusers":
        path = _local(source, repo_root, "base")
        if not (path / "model_index.json").is_file():
            raise DmmError(f"{path}: the base is not a diffusers pipeline folder")
        return path
    if kind == "hub":
        snapshot = download_hub(source)
        if not (snapshot / "model_index.json").is_file():
            raise DmmError(f"{source}: the base must be a diffusers repository (model_index.json)")
        return snapshot
    if kind == "single_file":
        if work_dir is None:
            raise DmmError(f"{source}: a single-file base needs a work folder to convert into")
        return _convert_single_file_base(_local(source, repo_root, "base"), Path(work_dir))
    raise DmmError(f"{source}: a {kind} file cannot be the base")


def _convert_single_file_base(path: Path, out: Path) -> Path:
    from diffusers import StableDiffusionPipeline

    if (out / "model_index.json").is_file():
        return out
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), local_files_only=hub_offline(), load_safety_checker=False
        )
    except Exception as exc:  # diffusers raises many error types here
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise DmmError(
            f"{path}: cannot convert the single-file base ({reason}); diffusers needs the SD1.5 "
            "configs and tokenizer from the Hub or its cache: give the base as a diffusers folder"
        ) from None
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp)
    return out
