"""Import a checkpoint in the official DMM layout (MCG-NJU/DMM) as a dmm student.

The reference code's pipeline folder is a Stable Diffusion folder whose UNet
(``DMMUNet2DConditionModel``) has ``addition_embed_type: "model_merge"`` and
``num_models: N`` in ``unet/config.json``, and two extra weights:

- ``model_embedding.weight`` (N, D): one style vector per integer model id;
- ``add_embedding.linear_1/linear_2``: a TimestepEmbedding (Linear -> SiLU ->
  Linear, D -> D) whose output is added to the timestep embedding.

Our student has the same two pieces under other names: the vectors are the
style codebook (``style_codebook/``, one name per id) and the MLP is the UNet's
``class_embedding`` (diffusers' projection class embedding, also added to the
timestep embedding). The rest of the UNet and every other component are
copied unchanged, so ``style=i`` reproduces ``model_id=i`` up to float rounding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dmm.atomic import DmmError

if TYPE_CHECKING:  # torch loads on use: `dmm --help` must stay fast
    import torch

OFFICIAL_EMBED_TYPE = "model_merge"
TABLE_KEY = "model_embedding.weight"
MLP_PREFIX = "add_embedding."
# The official UNet's own config keys, which a diffusers UNet does not take.
_OFFICIAL_CONFIG_KEYS = ("addition_embed_type", "num_models")
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def _read_config(folder: Path) -> dict:
    if not (folder / "model_index.json").is_file():
        raise DmmError(f"not a pipeline folder (no model_index.json): {folder}")
    path = folder / "unet" / "config.json"
    if not path.is_file():
        raise DmmError(f"missing file: {path}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DmmError(f"{path} is not valid JSON: {exc.msg}") from exc
    kind = cfg.get("addition_embed_type")
    if kind != OFFICIAL_EMBED_TYPE:
        raise DmmError(
            f"{path}: addition_embed_type is {kind!r}, not {OFFICIAL_EMBED_TYPE!r}: "
            "not an official-layout SD1.5 DMM checkpoint"
        )
    return cfg


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for name in _WEIGHT_NAMES:
        path = folder / "unet" / name
        if path.is_file():
            try:
                return load_file(path)
            except Exception as exc:  # SafetensorError: keep its first line, name the file
                raise DmmError(f"{path} is not a readable safetensors file: {exc}") from exc
    raise DmmError(
        f"no safetensors UNet weights in {folder / 'unet'} (pickled .bin weights are not loaded)"
    )


def _check_table(state: dict[str, torch.Tensor], num_models: int, where: Path) -> torch.Tensor:
    table = state.get(TABLE_KEY)
    if table is None or table.dim() != 2:
        raise DmmError(f"{where}: no 2-D style table {TABLE_KEY!r} in the UNet weights")
    width = int(state["time_embedding.linear_1.weight"].shape[0])
    mlp_in = state.get(MLP_PREFIX + "linear_1.weight")
    if mlp_in is None:
        raise DmmError(f"{where}: no style MLP ({MLP_PREFIX}linear_1/linear_2) in the UNet weights")
    if table.shape[1] != width or mlp_in.shape[1] != width:
        raise DmmError(
            f"{where}: style table {TABLE_KEY} is {table.shape[1]} wide (MLP input "
            f"{mlp_in.shape[1]}), but the UNet's time embedding is {width} wide"
        )
    if table.shape[0] != num_models:
        raise DmmError(
            f"{where}: style table has {table.shape[0]} rows, config num_models is {num_models}"
        )
    return table


def official_student(folder: Path | str, style_names: Sequence[str] | None = None):
    """The StyleStudent equivalent to the official checkpoint in ``folder``."""
    import torch

    from dmm.student.codebook import validate_style_names
    from dmm.student.model import STYLE_PREFIX, StyleStudent, student_unet_config

    folder = Path(folder)
    cfg = _read_config(folder)
    state = _read_weights(folder)
    num_models = int(cfg.get("num_models", 0))
    table = _check_table(state, num_models, folder)
    if cfg.get("act_fn", "silu") != "silu":
        # The official MLP is always SiLU; ours follows the UNet's act_fn.
        raise DmmError(f"{folder}: act_fn {cfg.get('act_fn')!r} is not 'silu'; cannot convert")
    names = list(style_names) if style_names else [f"style{i}" for i in range(num_models)]
    if len(names) != num_models:
        raise DmmError(f"got {len(names)} style names for {num_models} styles in {folder}")
    try:
        names = validate_style_names(names)
    except ValueError as exc:
        raise DmmError(str(exc)) from exc
    base_cfg = {k: v for k, v in cfg.items() if k not in _OFFICIAL_CONFIG_KEYS}
    base_cfg["addition_embed_type"] = None
    student = StyleStudent(
        unet_config=student_unet_config(base_cfg, table.shape[1]), style_names=names
    )
    unet_state = {
        (STYLE_PREFIX + k[len(MLP_PREFIX) :] if k.startswith(MLP_PREFIX) else k): v
        for k, v in state.items()
        if k != TABLE_KEY
    }
    try:
        student.unet.load_state_dict(unet_state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise DmmError(f"{folder}: UNet weights do not fit its config: {first}") from exc
    with torch.no_grad():
        student.style_codebook.vectors.copy_(table.float())
    return student


# Libraries a component may name in model_index.json: importing whatever module a
# downloaded file names would run arbitrary code.
_LIBRARIES = ("diffusers", "transformers", "dmm")
_COMPONENTS = (
    "vae", "text_encoder", "tokenizer", "scheduler",
    "safety_checker", "feature_extractor", "image_encoder",
)  # fmt: skip


def _components(folder: Path) -> dict:
    """Every component but the UNet, loaded from its subfolder.

    Not ``StableDiffusionPipeline.from_pretrained``: it validates every entry of
    model_index.json, and the official one names the reference code's UNet module.
    """
    import importlib

    index = json.loads((folder / "model_index.json").read_text())
    out: dict = {"requires_safety_checker": index.get("requires_safety_checker", False)}
    for name in _COMPONENTS:
        library, cls_name = (index.get(name) or [None, None])[:2]
        if library is None or cls_name is None:
            out[name] = None
            continue
        if library.split(".")[0] not in _LIBRARIES:
            raise DmmError(f"{folder}: component {name} comes from {library!r}; not loaded")
        cls = getattr(importlib.import_module(library), cls_name, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise DmmError(f"{folder}: component {name}: {library}.{cls_name} cannot be loaded")
        try:
            out[name] = cls.from_pretrained(folder / name, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DmmError(f"{folder / name}: {str(exc).splitlines()[0]}") from exc
    missing = [n for n in ("vae", "text_encoder", "tokenizer", "scheduler") if out[n] is None]
    if missing:
        raise DmmError(f"{folder}: model_index.json has no {', '.join(missing)}")
    return out


def import_official(
    folder: Path | str, out_dir: Path | str, style_names: Sequence[str] | None = None
) -> Path:
    """Convert the official-layout pipeline ``folder`` into a student pipeline folder."""
    from diffusers import StableDiffusionPipeline

    from dmm.atomic import atomic_dir
    from dmm.student.edit import LINEAGE
    from dmm.student.pipeline import build_student_pipeline

    folder, out_dir = Path(folder), Path(out_dir)
    if out_dir.resolve() == folder.resolve() or folder.resolve() in out_dir.resolve().parents:
        raise DmmError("--out must be outside the official folder")
    student = official_student(folder, style_names)
    components = _components(folder)
    base = StableDiffusionPipeline(
        unet=student.unet,
        requires_safety_checker=bool(components.pop("requires_safety_checker", False)),
        **components,
    )
    pipe = build_student_pipeline(student, base)
    lineage = {
        "merge_kind": "imported",
        "source": str(folder),
        "source_layout": f"MCG-NJU/DMM addition_embed_type={OFFICIAL_EMBED_TYPE}",
        "styles": student.style_names,
        "model_ids": {name: i for i, name in enumerate(student.style_names)},
        "base_sha256": None,  # the official folder does not say which base it was merged on
        "parent": None,
    }
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp)
        (tmp / LINEAGE).write_text(json.dumps(lineage, indent=2))
    return out_dir


def import_dmm_command(
    folder: Annotated[Path, typer.Argument(help="Official-layout DMM pipeline folder.")],
    out: Annotated[Path, typer.Option(help="Output student pipeline folder.")],
    names: Annotated[
        str | None,
        typer.Option(help="Comma-separated style names, one per model id. Default: style0, ..."),
    ] = None,
) -> None:
    """Import an official DMM checkpoint (MCG-NJU/DMM layout) as a student pipeline."""
    style_names = [n.strip() for n in names.split(",")] if names is not None else None
    try:
        out_dir = import_official(folder, out, style_names)
    except DmmError as exc:
        typer.echo(f"error: {str(exc).splitlines()[0] if str(exc) else 'failed'}", err=True)
        raise typer.Exit(2) from None
    lineage = json.loads((out_dir / "dmm_lineage.json").read_text())
    ids = ", ".join(f"{i}={n}" for n, i in lineage["model_ids"].items())
    typer.echo(f"imported {folder} -> {out_dir} (model ids: {ids})")
