"""One-file export of a student (or any SD pipeline folder) in the original LDM layout.

Diffusers reads LDM single files (``from_single_file``) but has no writer, so the
diffusers -> LDM key mapping lives here; reading goes back through diffusers' own
LDM -> diffusers conversion, so a file we write is one that diffusers (and the
A1111 / ComfyUI family, which share the layout) understands.

Layout of a file written by ``export_single_file``:

- ``model.diffusion_model.*``: the UNet, in LDM names.
- ``model.diffusion_model.label_emb.0.0.*`` / ``label_emb.0.2.*``: the style MLP
  (Linear -> SiLU -> Linear). LDM already names a vector embedding that is added
  to the timestep embedding ``label_emb``, and diffusers maps it to
  ``class_embedding`` for ``class_embed_type="projection"``: reusing the name
  keeps the file loadable by diffusers with a student UNet config, and a plain
  SD1.5 loader that drops unknown keys still gets the base network.
- ``dmm.style_codebook.vectors``: the (N, 1280) style vectors.
- ``cond_stage_model.transformer.text_model.*``: the CLIP text encoder.
- ``first_stage_model.*``: the VAE, only when it is a real ``AutoencoderKL``.
  The toy zoo's ``PatchAutoencoder`` has no LDM counterpart, so it is stored
  under ``dmm.patch_autoencoder.*`` where no LDM tool mistakes it for a VAE.
- Metadata ``dmm``: a JSON string with the format version, dmm version, style
  names, component classes and the UNet / VAE configs.

Tensors are streamed one at a time from the folder's safetensors files into the
output, so exporting an SD1.5 student needs little more memory than its largest
tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dmm.atomic import DmmError, atomic_file

LDM_UNET = "model.diffusion_model."
LDM_TEXT = "cond_stage_model.transformer."
LDM_VAE = "first_stage_model."
PATCH_VAE = "dmm.patch_autoencoder."
CODEBOOK_KEY = "dmm.style_codebook.vectors"
METADATA_KEY = "dmm"
FORMAT = "dmm-ldm-single-file"
FORMAT_VERSION = 1

_DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# --- diffusers -> LDM key names --------------------------------------------------------------

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}
_SD_DOWN = {"CrossAttnDownBlock2D", "DownBlock2D"}
_SD_UP = {"CrossAttnUpBlock2D", "UpBlock2D"}


def _check_sd_unet_config(config: Mapping[str, Any]) -> int:
    """The layers per block of an SD1.x-style UNet; DmmError for other layouts."""
    lpb = config.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        raise DmmError(f"cannot map a UNet with per-block layers_per_block={lpb!r} to LDM names")
    odd = [b for b in config.get("down_block_types", ()) if b not in _SD_DOWN]
    odd += [b for b in config.get("up_block_types", ()) if b not in _SD_UP]
    mid = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid != "UNetMidBlock2DCrossAttn":
        odd.append(mid)
    if odd:
        raise DmmError(
            f"cannot map UNet blocks {sorted(set(odd))} to LDM names (SD1.x layout only)"
        )
    return lpb


def _resnet(name: str, rest: str) -> str:
    if name not in _RESNET:
        raise KeyError(name)
    return f"{_RESNET[name]}.{rest}"


def unet_ldm_name(key: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without ``model.diffusion_model.``) of diffusers UNet weight ``key``."""
    n = _check_sd_unet_config(config)
    for prefix, ldm in _UNET_FIXED.items():
        if key.startswith(prefix + "."):
            return ldm + key[len(prefix) :]
    up_has_attn = ["CrossAttn" in b for b in config["up_block_types"]]
    # Down block b holds LDM input_blocks 1 + b*(n+1) .. : n resnet(+attention)
    # layers, then its downsampler; up block u holds n+1 layers from u*(n+1).
    patterns: list[tuple[str, Callable[..., str]]] = [
        (
            r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
            lambda b, i, name, rest: f"input_blocks.{1 + b * (n + 1) + i}.0." + _resnet(name, rest),
        ),
        (
            r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
            lambda b, i, rest: f"input_blocks.{1 + b * (n + 1) + i}.1.{rest}",
        ),
        (
            r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
            lambda b, rest: f"input_blocks.{1 + b * (n + 1) + n}.0.op.{rest}",
        ),
        (
            r"mid_block\.resnets\.(\d+)\.(\w+)\.(.+)",
            lambda r, name, rest: f"middle_block.{2 * r}." + _resnet(name, rest),
        ),
        (r"mid_block\.attentions\.0\.(.+)", lambda rest: f"middle_block.1.{rest}"),
        (
            r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
            lambda u, i, name, rest: f"output_blocks.{u * (n + 1) + i}.0." + _resnet(name, rest),
        ),
        (
            r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
            lambda u, i, rest: f"output_blocks.{u * (n + 1) + i}.1.{rest}",
        ),
        (
            r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
            lambda u, rest: (
                f"output_blocks.{u * (n + 1) + n}.{2 if up_has_attn[u] else 1}.conv.{rest}"
            ),
        ),
    ]
    for pattern, build in patterns:
        m = re.fullmatch(pattern, key)
        if m:
            args = [int(g) if g.isdigit() else g for g in m.groups()]
            try:
                return build(*args)
            except (KeyError, IndexError):
                break
    raise DmmError(f"UNet weight {key!r} has no LDM name (not an SD1.x-style UNet?)")


def unet_ldm_key_map(keys: list[str] | Any, config: Mapping[str, Any]) -> dict[str, str]:
    """{diffusers key: full LDM key} for a UNet's state-dict keys."""
    out = {k: LDM_UNET + unet_ldm_name(k, config) for k in keys}
    if len(set(out.values())) != len(out):
        raise DmmError("internal: two UNet weights map to the same LDM name")
    return out


def text_encoder_ldm_name(key: str) -> str:
    # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level);
    # the LDM layout keeps it, so both spellings map to the same name.
    return LDM_TEXT + (key if key.startswith("text_model.") else "text_model." + key)


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_ldm_name(key: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without ``first_stage_model.``) of an AutoencoderKL weight."""
    n_up = len(config["up_block_types"])
    fixed = {
        "encoder.conv_norm_out": "encoder.norm_out",
        "decoder.conv_norm_out": "decoder.norm_out",
    }
    for prefix, ldm in fixed.items():
        if key.startswith(prefix + "."):
            return ldm + key[len(prefix) :]
    for exact in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out"):
        if key.startswith(exact + "."):
            return key
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        # LDM numbers the decoder's up blocks from the lowest resolution up.
        return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key)
    if m and m[2] in _VAE_ATTN:
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    raise DmmError(f"VAE weight {key!r} has no LDM name (not an SD-style AutoencoderKL?)")


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_ldm_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    # LDM's VAE attention uses 1x1 convolutions where diffusers uses Linear layers.
    if ".mid_block.attentions." in key and key.endswith(".weight") and len(shape) == 2:
        return (*shape, 1, 1)
    return shape


# --- streaming export ------------------------------------------------------------------------


@dataclass
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def _weights(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise DmmError(f"{folder}: no weights file (expected {names[0]})")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DmmError(f"{path}: file not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DmmError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DmmError(f"{path}: expected a JSON object")
    return data


def _component_entries(
    handle: Any,
    rename: Callable[[str], str],
    dtype: torch.dtype | None,
    reshape: Callable[[str, tuple[int, ...]], tuple[int, ...]] | None = None,
) -> list[_Entry]:
    from dmm.merge.stream import TensorSpec

    entries = []
    for key in handle.keys():
        sl = handle.get_slice(key)
        spec = TensorSpec(sl.get_dtype(), tuple(int(d) for d in sl.get_shape()))
        src_dtype = spec.torch_dtype()
        # Only floating weights are cast: integer buffers keep their meaning.
        out_dtype = dtype if dtype is not None and src_dtype.is_floating_point else src_dtype
        shape = reshape(key, spec.shape) if reshape else spec.shape

        def load(key=key, out_dtype=out_dtype, shape=shape) -> torch.Tensor:
            return handle.get_tensor(key).to(out_dtype).reshape(shape)

        entries.append(_Entry(rename(key), out_dtype, shape, load))
    return entries


def export_single_file(
    pipeline_dir: Path | str,
    out_file: Path | str,
    *,
    dtype: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``pipeline_dir`` (a student folder, or a plain SD pipeline folder) as one
    LDM-layout safetensors file; returns the ``dmm`` metadata written.

    ``dtype`` ("fp32", "fp16", "bf16") casts floating weights; None keeps them as
    stored, which is what makes ``import_single_file`` exact. ``progress`` shows a
    tqdm bar over the tensors written.
    """
    import contextlib

    from safetensors import safe_open

    from dmm import __version__
    from dmm.merge.stream import SafetensorsWriter, TensorSpec

    src = Path(pipeline_dir)
    out = Path(out_file)
    if out.suffix != ".safetensors":
        raise DmmError(f"{out}: the output must be a .safetensors file")
    if dtype is not None and dtype not in _DTYPE_NAMES:
        raise DmmError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPE_NAMES)}")
    cast = _DTYPE_NAMES.get(dtype) if dtype else None
    index = _read_json(src / "model_index.json")
    student = bool(index.get("style_codebook")) and index["style_codebook"][0] is not None
    unet_cfg = _read_json(src / "unet" / "config.json")
    vae_cfg = _read_json(src / "vae" / "config.json")
    vae_class = str(vae_cfg.get("_class_name"))
    if vae_class not in ("AutoencoderKL", "PatchAutoencoder"):
        raise DmmError(f"{src / 'vae'}: cannot export a {vae_class} VAE to the LDM layout")
    files = {
        "unet": _weights(
            src / "unet",
            ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
        ),
        "text_encoder": _weights(
            src / "text_encoder", ("model.safetensors", "model.fp16.safetensors")
        ),
        "vae": _weights(
            src / "vae",
            ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
        ),
    }
    style_names: list[str] = []
    if student:
        cb_cfg = _read_json(src / "style_codebook" / "config.json")
        style_names = list(cb_cfg.get("style_names") or [])
        files["style_codebook"] = _weights(
            src / "style_codebook", ("diffusion_pytorch_model.safetensors",)
        )
    elif unet_cfg.get("class_embed_type") is not None:
        raise DmmError(f"{src}: the UNet has class conditioning but no style_codebook component")

    with contextlib.ExitStack() as stack:
        handles = {}
        for part, path in files.items():
            try:
                handles[part] = stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as exc:  # safetensors raises its own error types
                raise DmmError(f"{path}: not a readable safetensors file ({exc})") from None
        unet_map = unet_ldm_key_map(list(handles["unet"].keys()), unet_cfg)
        entries = _component_entries(handles["unet"], unet_map.__getitem__, cast)
        entries += _component_entries(handles["text_encoder"], text_encoder_ldm_name, cast)
        if vae_class == "AutoencoderKL":
            entries += _component_entries(
                handles["vae"], lambda k: LDM_VAE + vae_ldm_name(k, vae_cfg), cast, vae_ldm_shape
            )
        else:
            entries += _component_entries(handles["vae"], lambda k: PATCH_VAE + k, cast)
        if student:
            book = _component_entries(handles["style_codebook"], lambda k: CODEBOOK_KEY, cast)
            if len(book) != 1 or book[0].shape[0] != len(style_names):
                raise DmmError(
                    f"{files['style_codebook']}: expected one (N={len(style_names)}, D) "
                    "tensor of style vectors"
                )
            entries += book
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise DmmError(f"{src}: two weights map to the same single-file key")
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dmm_version": __version__,
            "kind": "student" if student else "pipeline",
            "style_names": style_names,
            "style_mlp": LDM_UNET + "label_emb.0.{0,2}" if student else None,
            "vae": "autoencoder_kl" if vae_class == "AutoencoderKL" else "patch_autoencoder",
            "unet_config": _public(unet_cfg),
            "vae_config": _public(vae_cfg),
            "source": src.name,
        }
        specs = {e.name: TensorSpec(_st_dtype(e.dtype), e.shape) for e in entries}
        metadata = {"format": "pt", METADATA_KEY: json.dumps(info, sort_keys=True)}
        with atomic_file(out, "wb") as fh:
            writer = SafetensorsWriter(fh, specs, metadata)
            from tqdm.auto import tqdm

            for e in tqdm(entries, desc="export", unit="tensor", disable=not progress):
                writer.write(e.name, e.load())
    return info


def _public(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}


def _st_dtype(dtype: torch.dtype) -> str:
    from dmm.merge.stream import _DTYPES

    for name, (attr, _) in _DTYPES.items():
        if getattr(torch, attr) == dtype:
            return name
    raise DmmError(f"cannot store dtype {dtype} in safetensors")


# --- reading single files --------------------------------------------------------------------


def read_single_file(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; DmmError naming the file if
    it is missing, empty, truncated or otherwise unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DmmError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DmmError(f"{path}: empty file (0 bytes)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # SafetensorError and friends
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DmmError(
            f"{path}: not a valid safetensors file (truncated or corrupt: {reason})"
        ) from None
    return state, metadata


def dmm_metadata(metadata: Mapping[str, str], where: Path | str) -> dict[str, Any]:
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        info = json.loads(raw)
    except json.JSONDecodeError:
        raise DmmError(f"{where}: the '{METADATA_KEY}' metadata is not valid JSON") from None
    return info if isinstance(info, dict) else {}


def ldm_to_unet_state(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Diffusers UNet weights from an LDM checkpoint, via diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_keys = {k: v for k, v in state.items() if k.startswith(LDM_UNET)}
    return {
        k: v
        for k, v in convert_ldm_unet_checkpoint(unet_keys, dict(config)).items()
        if v is not None
    }


def ldm_to_text_encoder_state(
    state: Mapping[str, torch.Tensor], flat: bool
) -> dict[str, torch.Tensor]:
    """CLIP text-encoder weights from an LDM checkpoint (diffusers' converter).

    ``flat``: the target CLIPTextModel has no ``text_model.`` level (transformers >= 5.6).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    text = {k: v for k, v in state.items() if k.startswith(LDM_TEXT)}
    converted = convert_ldm_clip_checkpoint(text)
    if flat:
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return converted


def ldm_to_vae_state(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = {k: v for k, v in state.items() if k.startswith(LDM_VAE)}
    return {k: v.contiguous() for k, v in convert_ldm_vae_checkpoint(vae, dict(config)).items()}


def load_strict(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, where: Path | str
) -> None:
    """Load ``state`` into ``module`` requiring the same keys and shapes; one-line DmmError."""
    from dmm.distill.teachers import architecture_diff

    reference = module.state_dict()
    diff = architecture_diff(reference, dict(state))
    if diff:
        raise DmmError(f"{where}: {what} weights do not fit the base architecture: {diff}")
    # assign=True keeps the file's tensors (and dtype) instead of copying into
    # the freshly allocated (or meta) parameters.
    module.load_state_dict(dict(state), strict=True, assign=True)


def unet_from_state(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any], where: Path | str
) -> Any:
    """A UNet2DConditionModel built without random init and filled from ``state``."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(dict(config))
    load_strict(unet, state, "UNet", where)
    return unet.eval()


def import_single_file(file: Path | str, base_dir: Path | str) -> Any:
    """Load a file written by ``export_single_file`` (a student) back as a
    ``DMMStudentPipeline``; the tokenizer, scheduler and component configs come
    from ``base_dir``, the pipeline the student was merged from."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dmm.student.codebook import StyleCodebook
    from dmm.student.model import student_unet_config
    from dmm.student.pipeline import DMMStudentPipeline

    file, base_dir = Path(file), Path(base_dir)
    state, metadata = read_single_file(file)
    info = dmm_metadata(metadata, file)
    if info.get("kind") != "student" or CODEBOOK_KEY not in state:
        raise DmmError(f"{file}: not a dmm student file (no '{CODEBOOK_KEY}' / student metadata)")
    if int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise DmmError(
            f"{file}: written by a newer dmm (format {info['format_version']}); upgrade dmm"
        )
    if not (base_dir / "model_index.json").is_file():
        raise DmmError(f"{base_dir}: not a diffusers pipeline folder (no model_index.json)")
    vectors = state[CODEBOOK_KEY]
    names = list(info.get("style_names") or [])
    if vectors.dim() != 2 or vectors.shape[0] != len(names):
        raise DmmError(
            f"{file}: {len(names)} style names but style vectors of shape {tuple(vectors.shape)}"
        )
    base_unet_cfg = UNet2DConditionModel.load_config(base_dir, subfolder="unet")
    config = student_unet_config(base_unet_cfg, int(vectors.shape[1]))
    unet = unet_from_state(ldm_to_unet_state(state, config), config, file)

    text_cfg = CLIPTextConfig.from_pretrained(base_dir / "text_encoder", local_files_only=True)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten below
        text_encoder = CLIPTextModel(text_cfg)
        codebook = StyleCodebook(names, int(vectors.shape[1]))
    flat = not hasattr(text_encoder, "text_model")
    load_strict(text_encoder, ldm_to_text_encoder_state(state, flat), "text encoder", file)
    text_encoder.eval()
    load_strict(codebook, {"vectors": vectors}, "style codebook", file)

    parts: dict[str, Any] = {"unet": unet, "text_encoder": text_encoder}
    vae = _vae_from_state(state, info, base_dir, file)
    if vae is not None:
        parts["vae"] = vae
    base = StableDiffusionPipeline.from_pretrained(base_dir, local_files_only=True, **parts)
    pipe = DMMStudentPipeline(
        **{k: v for k, v in base.components.items() if k != "style_codebook"},
        style_codebook=codebook,
        requires_safety_checker=bool(base.config.get("requires_safety_checker", False)),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _vae_from_state(
    state: Mapping[str, torch.Tensor], info: Mapping[str, Any], base_dir: Path, where: Path
) -> Any:
    """The VAE stored in the file, or None to use the base's."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    cfg_path = base_dir / "vae" / "config.json"
    if any(k.startswith(LDM_VAE) for k in state):
        cfg = _read_json(cfg_path)
        if cfg.get("_class_name") != "AutoencoderKL":
            raise DmmError(
                f"{where}: holds an AutoencoderKL but the base VAE is {cfg.get('_class_name')}"
            )
        with init_empty_weights():
            vae = AutoencoderKL.from_config(cfg)
        load_strict(vae, ldm_to_vae_state(state, cfg), "VAE", where)
        return vae.eval()
    patch = {k[len(PATCH_VAE) :]: v for k, v in state.items() if k.startswith(PATCH_VAE)}
    if patch:
        from dmm.zoo.autoencoder import PatchAutoencoder

        cfg = dict(info.get("vae_config") or _read_json(cfg_path))
        vae = PatchAutoencoder.from_config(cfg)
        load_strict(vae, patch, "VAE", where)
        return vae.eval()
    return None
